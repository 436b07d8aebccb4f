"""Distributed-environment check (the logic behind test_distributed.py).

Reports what a multi-GPU run depends on -- Python, torch, CUDA, cuDNN and NCCL versions,
each GPU through NVML (pynvml) and torch, peer access between GPUs -- and then proves the
process group works with real processes: under torchrun in the launched group, otherwise
in processes it spawns itself (one per GPU, or two gloo processes on CPU). The in-group
checks live in groupcheck.py. Rank 0 prints one PASS/FAIL/SKIP line per check; any FAIL
makes the exit code 1. SKIP means "does not apply here" (no GPU, no NVML driver, a dtype
the backend lacks) and does not fail the check, so it runs green on a CPU-only machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys

import torch
import torch.multiprocessing as mp

from . import distributed as dist
from .config import DistConfig
from .groupcheck import COLLECTIVE_TIMEOUT_S, FAIL, PASS, SKIP, Check, first_line, run_checks

DEFAULT_SIZES = "1K,1M,64M"


def versions() -> str:
    nccl = "none"
    if torch.version.cuda:
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except (AttributeError, RuntimeError):  # a CUDA build without NCCL (e.g. Windows)
            pass
    backends = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in dist.available_backends().items())
    return (f"Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
            f"cuDNN {torch.backends.cudnn.version() or 'none'}, NCCL {nccl}; backends: {backends}")


def nvml_gpus() -> tuple[list[str], str | None]:
    """One line per GPU from NVML (name, memory, utilisation, temperature, driver, NVLink),
    or no lines and the reason NVML cannot be used."""
    try:
        import pynvml
    except ImportError:
        return [], "pynvml is not installed (pip install 'seqrec[gpu]')"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return [], f"NVML unavailable ({err}): no NVIDIA driver on this machine"

    def query(fn, *args):  # fields some GPUs or drivers do not report
        try:
            return fn(*args)
        except pynvml.NVMLError:
            return None

    lines = []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem, util = pynvml.nvmlDeviceGetMemoryInfo(h), query(pynvml.nvmlDeviceGetUtilizationRates, h)
            temp = query(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU)
            lines.append(f"GPU {i}: {_text(pynvml.nvmlDeviceGetName(h))}, "
                         f"{mem.used / 2**30:.1f}/{mem.total / 2**30:.1f} GiB used, "
                         f"util {'?' if util is None else util.gpu}%, {'?' if temp is None else temp} C, "
                         f"driver {driver}, NVLink {_nvlinks(pynvml, h)}")
        return lines, None if lines else f"NVML sees no GPU (driver {driver})"
    except pynvml.NVMLError as err:
        return lines, f"NVML query failed after {len(lines)} GPU(s): {err}"
    finally:
        pynvml.nvmlShutdown()


def _nvlinks(pynvml, handle) -> str:
    """Active NVLink links; 'not supported' where the GPU or driver has none (PCIe cards)."""
    active = 0
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            active += pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED
        except pynvml.NVMLError:
            if link == 0:
                return "not supported"
            break
    return f"{active} links active"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def torch_gpus() -> list[str]:
    """The GPUs torch can use (after CUDA_VISIBLE_DEVICES) and which pairs have peer (P2P) access."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lines = []
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    if n > 1:
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        missing = [f"{i}->{j}" for i, j in pairs if not torch.cuda.can_device_access_peer(i, j)]
        lines.append(f"P2P access: {len(pairs) - len(missing)}/{len(pairs)} GPU pairs"
                     + (f" (none for {', '.join(missing)})" if missing else ""))
    return lines


def environment(use_cuda: bool) -> tuple[list[str], list[Check]]:
    """Report lines and the checks that need no process group."""
    nvml, nvml_note = nvml_gpus()
    gpus = torch_gpus()
    lines = [versions(), *nvml, *(f"torch {g}" for g in gpus)]
    if not gpus:
        lines.append("note: torch sees no GPU, so the process-group checks run gloo on CPU processes")
    checks = [Check("NVML", SKIP, nvml_note) if nvml_note else Check("NVML", PASS, f"{len(nvml)} GPU(s)")]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        checks.append(Check("CUDA", PASS, f"{count} GPU(s) usable" + ("" if use_cuda else ", not used (--cpu)")))
    elif nvml and os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        checks.append(Check("CUDA", FAIL, f"NVML sees {len(nvml)} GPU(s) but torch {torch.__version__} cannot use "
                                          "them (a CPU-only torch build, or a driver too old for its CUDA)"))
    else:
        checks.append(Check("CUDA", SKIP, "no GPU"))
    if use_cuda:
        ok = dist.available_backends()["nccl"]
        checks.append(Check("NCCL", PASS if ok else FAIL, "available" if ok else "this torch build has no NCCL"))
    else:
        checks.append(Check("NCCL", SKIP, "CPU run (gloo)"))
    return lines, checks


def group_checks(device: torch.device, sizes: list[int]) -> list[Check]:
    """Join the group (torchrun's, or the one _worker describes), run the checks, leave it."""
    try:
        dist.init(device, None, DistConfig().master_port, timeout_s=COLLECTIVE_TIMEOUT_S)
    except Exception as err:  # unreachable peers, a port in use, a missing backend
        return [Check("process group init", FAIL, first_line(err))]
    try:
        n = dist.world_size()
        init = Check("process group init", PASS, f"{dist.backend()}, {n} process{'es' * (n > 1)} on {device.type}")
        return [init, *run_checks(device, sizes)]
    finally:
        dist.shutdown()


def _worker(rank: int, world: int, port: int, use_cuda: bool, sizes: list[int], queue) -> None:
    dist.become_local_rank(rank, world, port)
    results = group_checks(torch.device("cuda", rank) if use_cuda else torch.device("cpu"), sizes)
    if rank == 0:
        queue.put(results)


def spawn_group_checks(world: int, use_cuda: bool, sizes: list[int]) -> list[Check]:
    """Run the group checks in `world` freshly spawned processes; rank 0 sends back the results."""
    queue = mp.get_context("spawn").SimpleQueue()
    try:
        mp.start_processes(_worker, args=(world, dist.free_port(), use_cuda, sizes, queue), nprocs=world,
                           start_method="spawn")
    except Exception as err:  # a worker died (segfault, out of memory) instead of reporting
        return [Check("worker processes", FAIL, first_line(err))]
    if queue.empty():
        return [Check("worker processes", FAIL, "rank 0 ended without reporting")]
    return queue.get()


def summary(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{c.status}  {c.name:<{width}}  {c.detail}" for c in checks]
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, SKIP, FAIL)}
    verdict = "environment check FAILED" if counts[FAIL] else "environment OK"
    return "\n".join(lines + [f"{verdict}: " + ", ".join(f"{n} {s}" for s, n in counts.items())])


def parse_sizes(text: str) -> list[int]:
    """'1K,1M,64M' -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", part, re.IGNORECASE)
        if not m or int(m[1]) == 0:
            raise argparse.ArgumentTypeError(f"not a message size: {part!r} (e.g. 1K,1M,64M)")
        sizes.append(int(m[1]) * units[m[2].upper()])
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="test_distributed.py", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="test gloo on CPU processes even when GPUs exist")
    parser.add_argument("--nproc", type=int, default=None, help="processes to spawn (default: GPUs, or 2 on CPU)")
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES),
                        help=f"all_reduce message sizes to time (default: {DEFAULT_SIZES})")
    args = parser.parse_args(argv)
    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda and (args.nproc or 0) > torch.cuda.device_count():
        parser.error(f"--nproc {args.nproc}: only {torch.cuda.device_count()} GPU(s); use --cpu for more processes")
    if dist.launched():  # under torchrun this process is one rank of the group being checked
        group = group_checks(torch.device("cuda", dist.local_rank()) if use_cuda else torch.device("cpu"), args.sizes)
        printing = os.environ["RANK"] == "0"
    else:
        world = args.nproc or (torch.cuda.device_count() if use_cuda else 2)
        group, printing = spawn_group_checks(world, use_cuda, args.sizes), True
    lines, checks = environment(use_cuda)
    checks += group
    if printing:
        print("\n".join(lines) + "\n\n" + summary(checks), flush=True)
    return 1 if any(c.status == FAIL for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())

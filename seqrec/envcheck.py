"""Distributed-environment check (the logic behind test_distributed.py).

Reports what a multi-GPU run depends on -- torch and CUDA builds, visible GPUs (via
pynvml when installed, else torch), NCCL -- and proves collectives work by running
an all-reduce across real processes: under torchrun in the launched group, otherwise
in processes it spawns itself (one per GPU, or two gloo processes on CPU).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from . import distributed as dist


def gpu_inventory() -> list[str]:
    """GPU names and memory; pynvml is optional and imported only here."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            out = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else name
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
                out.append(f"{i}: {name}, {mem:.0f} GiB (nvml)")
            return out
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pynvml missing or no driver: fall back to torch
        return [f"{i}: {torch.cuda.get_device_name(i)} (torch)" for i in range(torch.cuda.device_count())]


def report() -> None:
    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
          f"CUDA available: {torch.cuda.is_available()}")
    nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
    print(f"NCCL: {'.'.join(map(str, nccl)) if nccl else 'not available'}; "
          f"gloo: {tdist.is_gloo_available()}")
    gpus = gpu_inventory()
    print(f"GPUs: {len(gpus)}" + "".join(f"\n  {g}" for g in gpus))


def all_reduce_check(device: torch.device) -> bool:
    """All-reduce rank+1 over the group and compare with n(n+1)/2."""
    n = dist.world_size()
    value = dist.all_reduce_sum(torch.tensor([dist.rank() + 1.0], device=device))
    ok = value.item() == n * (n + 1) / 2
    if dist.is_main():
        print(f"all-reduce over {n} processes ({tdist.get_backend()} on {device.type}): "
              f"{'ok' if ok else f'WRONG ({value.item()})'}")
    return ok


def _worker(rank: int, world: int, port: int, use_cuda: bool, result) -> None:
    dist.become_local_rank(rank, world, port)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    dist.init(device, None, port)
    try:
        result[rank] = int(all_reduce_check(device))
    finally:
        dist.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="test_distributed.py", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="test gloo on CPU processes even when GPUs exist")
    parser.add_argument("--nproc", type=int, default=None, help="processes to spawn (default: GPUs, or 2 on CPU)")
    args = parser.parse_args(argv)
    use_cuda = torch.cuda.is_available() and not args.cpu
    if dist.launched():
        device = torch.device("cuda", dist.local_rank()) if use_cuda else torch.device("cpu")
        dist.init(device, None, 29500)
        try:
            if dist.is_main():
                report()
            return 0 if all_reduce_check(device) else 1
        finally:
            dist.shutdown()
    report()
    world = args.nproc or (torch.cuda.device_count() if use_cuda else 2)
    result = mp.get_context("spawn").Array("i", world)
    mp.start_processes(_worker, args=(world, dist.free_port(), use_cuda, result), nprocs=world, start_method="spawn")
    ok = all(result)
    print("environment OK" if ok else "environment check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

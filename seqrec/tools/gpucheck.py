"""The GPU check: ``PYTHONPATH=. python -m seqrec.tools.gpucheck --out gpu_check.json [--optional]``.

Run once by a person with one CUDA GPU, from a checkout (no install, no network: torch,
numpy, pyyaml and tqdm only). It exercises the project's real entry points on the GPU and
writes ONE JSON file with a pass/fail/skipped record, an error line and figures per check,
then prints a short summary. Core part (a few minutes, at most ``--budget_s`` = 300 s):

* resume   the demo data (TiSASRec+mHC) trained 2 epochs with ``--save_every_steps 4``;
           the same run killed after step 6 (SEQREC_FAULT_AT_STEP) and resumed with
           ``--resume``; the two final checkpoints must hold the same parameters
* amp      one epoch of every variant under ``--amp bf16`` and ``--amp fp16``
* ddp      ``torchrun --nproc_per_node=1 main.py --multi_gpu --backend nccl`` against the
           same run in one process
* export   a checkpoint trained on CUDA exported by ``seqrec.export``, and the scoring model
           traced / torch.export-ed on CUDA, each loaded and scored in a process that sees
           no GPU, against the CUDA model's scores
* sync     ``torch.cuda.set_sync_debug_mode("error")`` around steady-state training steps
           (after 2 warm-up steps) of every variant in fp32, bf16 and fp16; where a step
           syncs, the "warn" mode then lists every line of the project that synced
* sdpa     which ``scaled_dot_product_attention`` backends (flash, efficient, cuDNN, math)
           accept each head size and dtype, and which one each variant's step runs
* epoch    one training epoch per variant, fp32 and ``--amp auto``, on ML-1M-sized
           synthetic data (``seqrec.tools.bench.synthetic_sequences``)

``--optional`` adds ``compile``: ``--compile`` per variant, its compile time and its
steady-state step against eager (several minutes). Every check has its own timeout and runs
in a worker process; a check that fails, hangs or crashes its worker is recorded and the
next one runs in a fresh worker. Without CUDA every check is "skipped: no CUDA" and the exit
code is 0; otherwise it is 1 when a check failed. ``--device cpu --small`` runs the checks
that can run on a CPU, at toy sizes (for developing this tool).

Depends only on the project's public entry points: ``seqrec.cli.main``,
``seqrec.config.parse_config``, ``Trainer(cfg, data, device, run_dir, item_ids).train_step``,
``SequenceTensors``, ``seqrec.tools.bench.make_trainer`` / ``synthetic_sequences`` and
``seqrec.export``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import io
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
DEMO_PRESET = REPO / "launch" / "configs" / "demo.yaml"
VARIANT_FLAGS = {"sasrec": ["--no_time", "--no_mhc"], "tisasrec": ["--time", "--no_mhc"],
                 "sasrec+mhc": ["--no_time", "--mhc"], "tisasrec+mhc": ["--time", "--mhc"]}
VARIANTS = tuple(VARIANT_FLAGS)
AMP_NAMES = {"off": "fp32", "bf16": "bf16", "fp16": "fp16", "auto": "amp-auto"}
FAULT_ENV = "SEQREC_FAULT_AT_STEP"
REPORT_VERSION = 1
STATUSES = ("pass", "fail", "skipped")


# ---------------------------------------------------------------------------- outcomes
class Skipped(Exception):
    """The check does not apply here (no CUDA, no bf16 on this GPU, ...)."""


class CheckFailed(Exception):
    """A check that ran and found something wrong; keeps the figures it measured."""

    def __init__(self, message: str, **figures):
        super().__init__(message)
        self.figures = figures


class ItemTimeout(BaseException):
    """Raised by SIGALRM in the worker's main thread (BaseException: `except Exception` in
    the code under test must not swallow it)."""


class Terminated(BaseException):
    """SIGTERM from the main process (the worker's time is up)."""


@dataclasses.dataclass(frozen=True)
class Options:
    device: str  # "cuda" (the check) or "cpu" (developing the tool)
    small: bool  # toy sizes
    workdir: Path
    only: tuple[str, ...] = ()  # check names (or group names) to run; empty: all


def plan_items(grp: "Group", opts: Options) -> list["Item"]:
    """The group's checks that --only selects (all of them when it names the group)."""
    items = grp.plan(opts)
    if not opts.only or grp.name in opts.only:
        return items
    return [item for item in items if item.name in opts.only]


@dataclasses.dataclass
class Item:
    name: str
    run: Callable[[], dict]
    timeout: float


@dataclasses.dataclass
class Group:
    name: str
    about: str
    optional: bool
    plan: Callable[[Options], list[Item]]


GROUPS: dict[str, Group] = {}


def group(name: str, about: str, optional: bool = False):
    def register(plan):
        GROUPS[name] = Group(name, about, optional, plan)
        return plan
    return register


# ---------------------------------------------------------------------------- helpers
def one_line(err: BaseException) -> str:
    """`Type: first line of the message (at seqrec/file.py:N in fn)`, at most 400 characters."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    where = project_frame(err.__traceback__)
    out = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return (out + (f" (at {where})" if where else ""))[:400]


def project_frame(tb) -> str | None:
    """The innermost traceback frame in the project's own code, other than this tool."""
    return project_frame_of(traceback.extract_tb(tb))


def project_frame_of(frames) -> str | None:
    found = None
    for frame in frames:
        path = Path(frame.filename)
        if REPO in path.parents and path.name != "gpucheck.py":
            found = f"{path.relative_to(REPO)}:{frame.lineno} in {frame.name}"
    return found


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process this tool starts: the checkout importable, no fault switch."""
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen, group_kill: bool = False, grace: float = 10.0) -> None:
    """SIGTERM (torchrun then stops its workers), SIGKILL after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig) if group_kill else proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass


def run_process(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command with output to `log`; (exit code, its last non-empty output line).
    Interrupted (timeout, SIGALRM, SIGTERM), the process is stopped before the error propagates."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env or child_env(), cwd=REPO)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            raise CheckFailed(f"timeout: a subprocess ran past {timeout:.0f} s; its last line: {last_line(log)}") from None
        except BaseException:
            stop_process(proc)
            raise
    return rc, last_line(log)


def last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.lines = stream, []

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.lines.extend(line for line in text.splitlines() if line.strip())
        del self.lines[:-20]
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def run_cli(argv: list[str]) -> tuple[int, str]:
    """seqrec.cli.main(argv) in this process: (exit code, its last stderr line)."""
    from seqrec.cli import main
    tee = _Tee(sys.stderr)
    with contextlib.redirect_stderr(tee):
        try:
            rc = main(argv)
        except SystemExit as exit_:  # argparse: an unknown flag or a bad value
            rc = exit_.code if isinstance(exit_.code, int) else 2
    return rc, tee.lines[-1][:300] if tee.lines else ""


CLI_SNIPPET = "import sys; from seqrec.cli import main; sys.exit(main(sys.argv[1:]))"


def run_cli_process(argv: list[str], log: Path, timeout: float, **env: str) -> tuple[int, str]:
    """seqrec.cli.main(argv) in a fresh process (for runs that exit hard, or so that this
    worker holds no CUDA context while another process uses the GPU)."""
    return run_process([sys.executable, "-c", CLI_SNIPPET, *argv], log, timeout, child_env(**env))


@functools.cache
def supported_flags(*flags: str) -> tuple[str, ...]:
    """Those of `flags` (booleans) this checkout's parser knows."""
    from seqrec.config import parse_config
    known = []
    for flag in flags:
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                parse_config([flag, "--dataset", "demo"])
            except SystemExit:
                continue
            except Exception:  # noqa: BLE001  (a validation error still means the flag exists)
                pass
        known.append(flag)
    return tuple(known)


def demo_argv(opts: Options, run_dir: Path, variant: str = "tisasrec+mhc", *extra: str) -> list[str]:
    """The demo preset on the embedded demo data, on the check's device, into run_dir."""
    return ["--config", str(DEMO_PRESET), "--dataset", "demo", "--train_dir", str(run_dir),
            "--device", opts.device, *VARIANT_FLAGS[variant], *extra]


def scratch(opts: Options, name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=name.replace("/", "_").replace("+", "_") + "_", dir=opts.workdir))
    return path


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def compare_parameters(a: dict, b: dict) -> dict:
    """Per-tensor ||a - b|| / ||a|| (the attention key bias left out: its gradient is 0 in
    exact arithmetic, so Adam turns rounding noise into full steps; see tests/conftest.py)."""
    if a.keys() != b.keys():
        raise CheckFailed(f"parameter names differ: {sorted(a.keys() ^ b.keys())[:4]}")
    worst, worst_name, identical = 0.0, None, True
    for name, x in a.items():
        y = b[name]
        identical = identical and torch.equal(x, y)
        if not x.is_floating_point():
            continue
        if name.endswith("qkv.bias"):
            d = x.numel() // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        rel = float((x.double() - y.double()).norm() / x.double().norm().clamp_min(1e-30))
        if rel > worst or worst_name is None:
            worst, worst_name = rel, name
    return {"max_rel_diff": worst, "worst_tensor": worst_name, "bit_identical": identical}


def cuda_required(opts: Options, what: str) -> None:
    if opts.device != "cuda":
        raise Skipped(f"{what} needs CUDA")


def amp_supported(opts: Options, amp: str) -> None:
    if amp == "bf16" and opts.device == "cuda" and torch.cuda.get_device_capability()[0] < 8:
        major, minor = torch.cuda.get_device_capability()
        raise Skipped(f"bf16 needs compute capability 8.0+ (this GPU: {major}.{minor})")
    if amp == "fp16" and opts.device == "cpu":
        raise Skipped("fp16 autocast is a GPU feature")


def synchronize(opts: Options) -> None:
    if opts.device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- (a) resume
@group("resume", "demo data trained 2 epochs vs the same run killed after step 6 and resumed: same parameters")
def plan_resume(opts: Options) -> list[Item]:
    return [Item("resume/tisasrec+mhc", functools.partial(check_resume, opts), 150)]


def check_resume(opts: Options) -> dict:
    det = supported_flags("--deterministic")
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if det else {}
    root = scratch(opts, "resume")
    full, cut = root / "uninterrupted", root / "interrupted"
    common = ["--num_epochs", "2", "--save_every_steps", "4", *det]
    figures: dict = {"deterministic": bool(det)}
    t0 = time.perf_counter()
    rc, tail = run_cli_process(demo_argv(opts, full, "tisasrec+mhc", *common), root / "log.txt", 90, **env)
    figures["uninterrupted_s"] = round(time.perf_counter() - t0, 2)
    if rc != 0:
        raise CheckFailed(f"uninterrupted run exited {rc}: {tail}", **figures)
    t0 = time.perf_counter()
    rc, tail = run_cli_process(demo_argv(opts, cut, "tisasrec+mhc", *common), root / "log.txt", 90,
                               **env, **{FAULT_ENV: "6:0"})
    if rc != 17:
        raise CheckFailed(f"the run meant to die after step 6 exited {rc}, not 17 (the fault switch): {tail}",
                          **figures)
    if not (cut / "latest.pt").exists():
        raise CheckFailed("the killed run left no latest.pt", **figures)
    figures["killed_at_step"], figures["checkpoint_step"] = 6, load_state(cut / "latest.pt")["step"]
    rc, tail = run_cli_process(demo_argv(opts, cut, "tisasrec+mhc", *common, "--resume"), root / "log.txt", 90,
                               **env)
    figures["killed_and_resumed_s"] = round(time.perf_counter() - t0, 2)
    if rc != 0:
        raise CheckFailed(f"resumed run exited {rc}: {tail}", **figures)
    a, b = load_state(full / "latest.pt"), load_state(cut / "latest.pt")
    figures.update(steps=a["step"], resumed_steps=b["step"], **compare_parameters(a["model"], b["model"]))
    if a["step"] != b["step"]:
        raise CheckFailed(f"the resumed run ended at step {b['step']}, the uninterrupted one at {a['step']}",
                          **figures)
    limit = 1e-5 if det else 1e-3
    figures["summary"] = (f"{a['step']} steps, killed after 6, resumed from step {figures['checkpoint_step']}: "
                          f"max rel diff {figures['max_rel_diff']:.1e}"
                          + (" (bit-identical)" if figures["bit_identical"] else ""))
    if figures["max_rel_diff"] > limit:
        raise CheckFailed(f"resumed parameters differ from the uninterrupted run's: {figures['worst_tensor']} "
                          f"by {figures['max_rel_diff']:.2e} relative (limit {limit:g})", **figures)
    return figures


# ---------------------------------------------------------------------------- (b) amp
@group("amp", "one epoch of every variant on the demo data under --amp bf16 and --amp fp16")
def plan_amp(opts: Options) -> list[Item]:
    return [Item(f"amp/{amp}/{variant}", functools.partial(check_amp, opts, amp, variant), 45)
            for amp in ("bf16", "fp16") for variant in VARIANTS]


def check_amp(opts: Options, amp: str, variant: str) -> dict:
    amp_supported(opts, amp)
    run_dir = scratch(opts, f"amp_{amp}_{variant}")
    t0 = time.perf_counter()
    rc, tail = run_cli(demo_argv(opts, run_dir, variant, "--num_epochs", "1", "--amp", amp))
    figures = {"seconds": round(time.perf_counter() - t0, 2)}
    if rc != 0:
        raise CheckFailed(f"main.py --amp {amp} exited {rc}: {tail}", **figures)
    rows = read_rows(run_dir)
    train = [r for r in rows if r.get("type") == "train"]
    valid = [r for r in rows if r.get("type") == "valid"]
    if not train:
        raise CheckFailed("no train row in metrics.jsonl", **figures)
    figures.update(loss=train[-1]["loss"], epoch_s=train[-1].get("seconds"),
                   valid={k: v for k, v in (valid[-1] if valid else {}).items() if "@10" in k})
    if not math.isfinite(figures["loss"]):
        raise CheckFailed(f"epoch loss is {figures['loss']}", **figures)
    ndcg = figures["valid"].get("sampled/NDCG@10")
    figures["summary"] = f"loss {figures['loss']:.4f}" + (f", valid sampled NDCG@10 {ndcg:.4f}" if ndcg else "")
    return figures


# ---------------------------------------------------------------------------- (c) ddp
@group("ddp", "torchrun --nproc_per_node=1 with nccl against the same run in one process")
def plan_ddp(opts: Options) -> list[Item]:
    backend = "nccl" if opts.device == "cuda" else "gloo"
    return [Item(f"ddp/{backend} 1 process", functools.partial(check_ddp, opts, backend), 120)]


def check_ddp(opts: Options, backend: str) -> dict:
    det = supported_flags("--deterministic")
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if det else {}
    root = scratch(opts, "ddp")
    args = ["--num_epochs", "1", "--amp", "off", *det]
    # Both runs in their own processes, so this worker holds no CUDA context (a GPU in
    # exclusive-process mode takes one context at a time).
    t0 = time.perf_counter()
    rc, tail = run_cli_process(demo_argv(opts, root / "single", "tisasrec+mhc", *args), root / "log.txt", 60, **env)
    if rc != 0:
        raise CheckFailed(f"one-process run exited {rc}: {tail}")
    single_s = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "main.py"), *demo_argv(opts, root / "ddp", "tisasrec+mhc", *args),
           "--multi_gpu", "--backend", backend]
    t0 = time.perf_counter()
    rc, tail = run_process(cmd, root / "log.txt", 90, child_env(**env))
    figures = {"one_process_s": round(single_s, 2), "torchrun_s": round(time.perf_counter() - t0, 2),
               "deterministic": bool(det), "backend": backend}
    if rc != 0:
        raise CheckFailed(f"torchrun exited {rc}: {tail}", **figures)
    provenance = [json.loads(line) for line in (root / "ddp" / "runs.jsonl").read_text().splitlines()]
    figures["world_size"] = provenance[-1].get("world_size")
    loss = {name: [r["loss"] for r in read_rows(root / name) if r.get("type") == "train"][-1]
            for name in ("single", "ddp")}
    figures.update(loss_one_process=loss["single"], loss_ddp=loss["ddp"],
                   **compare_parameters(load_state(root / "single" / "latest.pt")["model"],
                                        load_state(root / "ddp" / "latest.pt")["model"]))
    figures["summary"] = (f"world size {figures['world_size']}, {backend}: loss {loss['ddp']:.5f} vs "
                          f"{loss['single']:.5f} in one process, max rel param diff {figures['max_rel_diff']:.1e}")
    if figures["world_size"] != 1 or not math.isfinite(loss["ddp"]):
        raise CheckFailed(f"DDP run: world size {figures['world_size']}, loss {loss['ddp']}", **figures)
    if det and figures["max_rel_diff"] > 1e-4:  # summation-order noise (shared embedding grads) is ~1e-5
        raise CheckFailed(f"1-rank DDP parameters differ from one process: {figures['worst_tensor']} by "
                          f"{figures['max_rel_diff']:.2e} relative", **figures)
    return figures


# ---------------------------------------------------------------------------- (d) export
EXPORT_VARIANTS = ("sasrec", "tisasrec+mhc")
CPU_SCORER = r"""
import inspect, json, sys, torch
spec = json.loads(sys.argv[1])
out = {"cuda_visible": torch.cuda.is_available()}
inputs = torch.load(spec["inputs"])
try:
    from seqrec.export import load_exported  # the project's loader, onto the CPU where it can say so
    takes_device = "device" in inspect.signature(load_exported).parameters
    model = load_exported(spec["file"], spec["format"], *(["cpu"] if takes_device else []))
    with torch.no_grad():
        torch.save(model(*inputs), spec["scores"])
except Exception as err:
    out["error"] = f"{type(err).__name__}: " + next((l for l in str(err).splitlines() if l.strip()), "")[:300]
print(json.dumps(out))
"""


@group("export", "models trained on CUDA, exported (seqrec.export; traced and torch.export-ed on CUDA), "
                 "scored in a process that sees no GPU")
def plan_export(opts: Options) -> list[Item]:
    trained = {variant: once(functools.partial(train_for_export, opts, variant)) for variant in EXPORT_VARIANTS}
    items = []
    for variant in EXPORT_VARIANTS:
        for how in ("seqrec-export", "traced-on-device", "torch.export-on-device"):
            items.append(Item(f"export/{variant}/{how}", functools.partial(check_export, opts, trained[variant], how),
                              75))
    return items


def once(fn: Callable[[], object]) -> Callable[[], object]:
    """fn's result on the first call, and the same result (or failure) on every later one."""
    memo: list = []

    def call():
        if not memo:
            try:
                memo.append((True, fn()))
            except Exception as err:  # noqa: BLE001
                memo.append((False, str(err) if isinstance(err, CheckFailed) else one_line(err)))
        ok, value = memo[0]
        if not ok:
            raise CheckFailed(value)
        return value
    return call


def train_for_export(opts: Options, variant: str) -> tuple[Path, float]:
    run_dir = scratch(opts, f"export_{variant}")
    t0 = time.perf_counter()
    rc, tail = run_cli(demo_argv(opts, run_dir, variant, "--num_epochs", "1"))
    if rc != 0:
        raise CheckFailed(f"training the model to export exited {rc}: {tail}")
    return run_dir, time.perf_counter() - t0


def check_export(opts: Options, trained: Callable[[], tuple[Path, float]], how: str) -> dict:
    from seqrec import export as ex
    from seqrec.serve import Recommender
    run_dir, train_s = trained()
    checkpoint = run_dir / "best.pt"
    device = torch.device(opts.device)
    rec = Recommender.from_checkpoint(str(checkpoint), device=device)
    num_items = len(rec.item_ids)
    scorer = ex.ScoringModel(rec.model).eval()
    inputs = ex.example_inputs(9, rec.maxlen, num_items, rec.uses_time, seed=3)
    with torch.no_grad(), fp32_matmuls():
        expected = scorer(*(t.to(device) for t in inputs)).float().cpu()
    figures: dict = {"train_s": round(train_s, 2)}
    t0 = time.perf_counter()
    fmt = "pt2" if how == "torch.export-on-device" else "torchscript"
    out = run_dir / ("model.pt2" if fmt == "pt2" else "model.pt")
    if how == "seqrec-export":
        ex.export(checkpoint, out, "torchscript", k=0)  # as `seqrec export --k 0` on this machine (all scores)
    elif how == "traced-on-device":
        device_inputs = tuple(t.to(device) for t in ex.example_inputs(2, rec.maxlen, num_items, rec.uses_time))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(scorer, device_inputs, check_trace=False).save(str(out))
    else:
        if not hasattr(ex, "exported_program"):
            raise Skipped("this checkout's seqrec.export has no pt2 (torch.export) format")
        names = ["items", "times"] if rec.uses_time else ["items"]
        device_inputs = tuple(t.to(device) for t in ex.example_inputs(2, rec.maxlen, num_items, rec.uses_time))
        with torch.no_grad():
            torch.export.save(ex.exported_program(scorer, device_inputs, names), str(out))
    figures["export_s"] = round(time.perf_counter() - t0, 2)
    torch.save(inputs, run_dir / "inputs.pt")
    spec = {"format": fmt, "file": str(out), "inputs": str(run_dir / "inputs.pt"), "scores": str(run_dir / "scores.pt")}
    rc, tail = run_process([sys.executable, "-c", CPU_SCORER, json.dumps(spec)], run_dir / "cpu_log.txt", 60,
                           child_env(CUDA_VISIBLE_DEVICES=""))
    try:
        answer = json.loads(tail)
    except json.JSONDecodeError:
        raise CheckFailed(f"the CPU process exited {rc}: {tail}", **figures) from None
    figures["cpu_process_saw_cuda"] = answer["cuda_visible"]
    if "error" in answer:
        raise CheckFailed(f"loading or scoring on CPU: {answer['error']}", **figures)
    got = torch.load(run_dir / "scores.pt")
    diff = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    figures.update(max_rel_score_diff=diff, scores_shape=list(got.shape))
    made = {"seqrec-export": f"seqrec.export of the {opts.device}-trained checkpoint",
            "traced-on-device": f"traced on {opts.device}", "torch.export-on-device": f"torch.export on {opts.device}"}
    figures["summary"] = f"{made[how]}, scored on CPU: max rel diff {diff:.1e} to the {opts.device} model"
    if got.shape != expected.shape or diff > 1e-4:
        raise CheckFailed(f"CPU scores of the exported model differ from the {opts.device} model's by {diff:.2e} "
                          f"(of the largest score)", **figures)
    return figures


@contextlib.contextmanager
def fp32_matmuls():
    """Full-precision CUDA matmuls for a reference computation (a training run in this process
    may have turned TF32 on)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------- shared: bench trainers
@functools.cache
def bench_data(opts: Options, users: int, maxlen: int):
    """ML-1M-shaped synthetic data on the device (seqrec.tools.bench.synthetic_sequences)."""
    from seqrec.tools.bench import synthetic_sequences
    from seqrec.data import SequenceTensors
    return SequenceTensors(synthetic_sequences(num_users=users), maxlen, torch.device(opts.device))


def bench_spec(opts: Options, amp: str) -> dict:
    return {"size": "L50" if opts.small else "seed", "expansion_rate": 4, "batch_size": 32 if opts.small else 128,
            "amp": amp, "length_buckets": 0, "device": opts.device}


def bench_trainer(opts: Options, variant: str, amp: str, data, **train):
    """A Trainer as seqrec.tools.bench.make_trainer builds it; with `train` overrides (compile) the
    same steps with those TrainConfig fields set."""
    from seqrec.tools import bench
    spec = bench_spec(opts, amp)
    if not train:
        return bench.make_trainer(spec, variant, data, torch.device(opts.device))
    from seqrec.config import Config
    from seqrec.trainer import Trainer
    time_, mhc, mhc_native = bench.VARIANTS[variant]
    cfg = Config()
    for key, value in {**bench.SIZES[spec["size"]], "time": time_, "mhc": mhc, "mhc_native": mhc_native}.items():
        setattr(cfg.model, key, value)
    if mhc:
        cfg.model.mhc_expansion_rate = spec["expansion_rate"]
    cfg.train.batch_size, cfg.train.amp, cfg.train.length_buckets = spec["batch_size"], amp, spec["length_buckets"]
    for key, value in train.items():
        if not hasattr(cfg.train, key):
            raise Skipped(f"this checkout's TrainConfig has no {key}")
        setattr(cfg.train, key, value)
    return Trainer(cfg, data, torch.device(opts.device), Path(tempfile.mkdtemp(dir=opts.workdir)), [])


def epoch_batches(data, batch_size: int, seed: int) -> list[np.ndarray]:
    """One epoch of global batches: a permutation of the training users (host-side indices)."""
    users = data.train_users.cpu().numpy()
    order = users[np.random.default_rng(seed).permutation(len(users))]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def apply_cli_backends(trainer, device: torch.device) -> dict:
    """The process-wide numerics switches main.py sets for this config (TF32, ...), where the
    CLI has them; returns the effective settings."""
    from seqrec import cli
    configure = getattr(cli, "configure_backends", None)
    if configure is not None:
        configure(trainer.cfg.train, device)
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


# ---------------------------------------------------------------------------- (e) sync
@group("sync", 'set_sync_debug_mode("error") around steady-state training steps of every variant')
def plan_sync(opts: Options) -> list[Item]:
    return [Item(f"sync/{variant}/{AMP_NAMES[amp]}", functools.partial(check_sync, opts, variant, amp), 40)
            for variant in VARIANTS for amp in ("off", "bf16", "fp16")]


def check_sync(opts: Options, variant: str, amp: str, warmup: int = 2, steps: int = 3) -> dict:
    cuda_required(opts, "torch.cuda.set_sync_debug_mode")
    amp_supported(opts, amp)
    spec = bench_spec(opts, amp)
    from seqrec.tools.bench import SIZES
    data = bench_data(opts, 1024, SIZES[spec["size"]]["maxlen"])
    trainer = bench_trainer(opts, variant, amp, data)
    batches = epoch_batches(data, spec["batch_size"], 0)
    for users in batches[:warmup]:
        trainer.train_step(users, 1)
    torch.cuda.synchronize()
    error = None
    try:
        torch.cuda.set_sync_debug_mode("error")
        for users in batches[warmup:warmup + steps]:
            trainer.train_step(users, 1)
    except Exception as err:  # noqa: BLE001  (RuntimeError from the sync check; anything else is a failure too)
        error = one_line(err)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    figures: dict = {"warmup_steps": warmup, "steps": steps}
    if error is None:
        figures["summary"] = f"{steps} steady-state steps, no device-to-host sync"
        return figures
    # Where: every synchronizing call of one step, as the warn mode reports them, in a fresh
    # trainer (the failed step stopped half-way, e.g. between GradScaler's unscale_ and update).
    trainer = bench_trainer(opts, variant, amp, data)
    for users in batches[:warmup]:
        trainer.train_step(users, 1)
    torch.cuda.synchronize()
    sites: dict[str, int] = {}

    def note(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        # The project's innermost frame on the stack, and the line that made the call (torch's
        # own code, e.g. GradScaler, where the project did not sync itself).
        own = project_frame_of(traceback.extract_stack())
        direct = Path(filename)
        direct = f"{direct.relative_to(REPO)}:{lineno}" if REPO in direct.parents else f"{direct.name}:{lineno}"
        where = own if own and own.split(" in ")[0] == direct else f"{own or '?'} via {direct}"
        sites[where] = sites.get(where, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        try:
            torch.cuda.set_sync_debug_mode("warn")
            trainer.train_step(batches[warmup + steps], 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    figures["sync_sites_per_step"] = sites
    raise CheckFailed(error, **figures)


# ---------------------------------------------------------------------------- (f) sdpa
SDPA_SHAPES = [(50, 2), (50, 1), (48, 2), (64, 2), (256, 2), (256, 8)]  # (hidden_units, num_heads)
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
SDPA_OPS = {"flash": "flash", "efficient": "efficient", "cudnn": "cudnn", "math": "math", "overrideable": "other"}


@group("sdpa", "which scaled_dot_product_attention backends accept each head size and dtype, "
               "and which one each variant's training step runs")
def plan_sdpa(opts: Options) -> list[Item]:
    return [Item("sdpa/kernels", functools.partial(check_sdpa_kernels, opts), 60),
            *[Item(f"sdpa/{variant}", functools.partial(check_sdpa_model, opts, variant), 40) for variant in VARIANTS]]


def _sdpa_recorder():
    """(dispatch mode, function mode): the fused SDPA kernels run, and the SDPA calls made."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Kernels(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if "attention" in name and not name.endswith("backward"):
                self.seen[name] = self.seen.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                self.count += 1
            return func(*args, **(kwargs or {}))

    return Kernels(), Calls()


def backend_of(kernels: dict[str, int], calls: int) -> str:
    """'flash', 'efficient', 'cudnn', 'math' (SDPA called, no fused kernel ran) or 'none'."""
    found = sorted({label for name in kernels for key, label in SDPA_OPS.items() if key in name})
    if found:
        return "+".join(found)
    return "math" if calls else "none"


def check_sdpa_kernels(opts: Options) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    device = torch.device(opts.device)
    batch, length = (4, 50) if opts.small else (128, 200)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if opts.device == "cuda" and torch.cuda.get_device_capability()[0] < 8:
        del dtypes["bf16"]
    table: dict = {}
    default_failed = []
    for dim, heads in SDPA_SHAPES:
        head_dim = dim // heads
        row = table[f"d{dim}/h{heads} (head dim {head_dim})"] = {}
        for dname, dtype in dtypes.items():
            q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            cell = row[dname] = {}

            def attend():
                F.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()

            kernels, calls = _sdpa_recorder()
            try:
                with calls, kernels:
                    attend()
                cell["default"] = backend_of(kernels.seen, calls.count)
            except Exception as err:  # noqa: BLE001
                cell["default"] = f"error: {one_line(err)}"
                default_failed.append(f"d{dim}/h{heads} {dname}")
            for name in SDPA_BACKENDS:
                backend = getattr(SDPBackend, name, None)
                if backend is None:
                    cell[name.lower()] = "not in this torch"
                    continue
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        with sdpa_kernel(backend):
                            attend()
                        cell[name.lower()] = "ok"
                    except Exception as err:  # noqa: BLE001
                        reasons = [str(w.message).splitlines()[0] for w in caught if str(w.message).strip()]
                        cell[name.lower()] = "no: " + ("; ".join(reasons)[:300] if reasons else one_line(err)[:200])
            synchronize(opts)
    flash = {shape: [d for d, cell in row.items() if cell.get("flash_attention") == "ok"] for shape, row in table.items()}
    figures = {"batch": batch, "maxlen": length, "is_causal": True, "table": table}
    figures["summary"] = "flash accepts: " + ", ".join(f"{s.split(' ')[0]} {'/'.join(d) or '-'}"
                                                       for s, d in flash.items())
    if default_failed:
        raise CheckFailed(f"the default SDPA dispatch failed for {', '.join(default_failed)}", **figures)
    return figures


def check_sdpa_model(opts: Options, variant: str) -> dict:
    from seqrec.tools.bench import SIZES
    spec = bench_spec(opts, "off")
    data = bench_data(opts, 256, SIZES[spec["size"]]["maxlen"])
    size = SIZES[spec["size"]]
    figures: dict = {"hidden_units": size["hidden_units"], "num_heads": size["num_heads"],
                     "head_dim": size["hidden_units"] // size["num_heads"]}
    users = epoch_batches(data, spec["batch_size"], 0)[0]
    parts = []
    for amp in ("off", "bf16", "fp16"):
        try:
            amp_supported(opts, amp)
        except Skipped as why:
            figures[AMP_NAMES[amp]] = f"skipped: {why}"
            continue
        trainer = bench_trainer(opts, variant, amp, data)
        trainer.train_step(users, 1)  # warm-up outside the recorder
        kernels, calls = _sdpa_recorder()
        with calls, kernels:
            trainer.train_step(users, 1)
        synchronize(opts)
        figures[AMP_NAMES[amp]] = {"backend": backend_of(kernels.seen, calls.count), "sdpa_calls": calls.count,
                                   "kernels": kernels.seen}
        parts.append(f"{AMP_NAMES[amp]} {figures[AMP_NAMES[amp]]['backend']}")
    figures["summary"] = ", ".join(parts) + ("" if variant.startswith("sasrec")
                                             else " (TiSASRec computes its attention without SDPA)")
    return figures


# ---------------------------------------------------------------------------- (g) epoch
@group("epoch", "one training epoch per variant, fp32 and --amp auto, on ML-1M-sized synthetic data")
def plan_epoch(opts: Options) -> list[Item]:
    return [Item(f"epoch/{variant}/{AMP_NAMES[amp]}", functools.partial(check_epoch, opts, variant, amp), 90)
            for variant in VARIANTS for amp in ("off", "auto")]


def check_epoch(opts: Options, variant: str, amp: str, warmup: int = 3) -> dict:
    from seqrec.tools.bench import SIZES
    spec = bench_spec(opts, amp)
    users = 512 if opts.small else 6040
    t0 = time.perf_counter()
    data = bench_data(opts, users, SIZES[spec["size"]]["maxlen"])
    data_s = time.perf_counter() - t0
    trainer = bench_trainer(opts, variant, amp, data)
    device = torch.device(opts.device)
    figures: dict = {"users": users, **SIZES[spec["size"]], "batch_size": spec["batch_size"],
                     "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "off",
                     "length_buckets": trainer.length_buckets, **apply_cli_backends(trainer, device)}
    if data_s > 0.5:
        figures["data_build_s"] = round(data_s, 2)
    batches = epoch_batches(data, spec["batch_size"], 1)
    t0 = time.perf_counter()
    for users_ in batches[:warmup]:
        trainer.train_step(users_, 1)
    synchronize(opts)
    figures["warmup_s"] = round(time.perf_counter() - t0, 3)
    if opts.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total = torch.zeros((), device=device)
    t0 = time.perf_counter()
    for users_ in batches:
        total += trainer.train_step(users_, 2)  # summed on the device: no host read per step
    synchronize(opts)
    seconds = time.perf_counter() - t0
    loss = float(total) / len(batches)
    figures.update(steps=len(batches), s_per_epoch=round(seconds, 3), s_per_step=seconds / len(batches),
                   seq_per_s=round(len(data.train_users) / seconds, 1))
    if opts.device == "cuda":
        figures["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    figures["mean_step_loss"] = loss
    if not math.isfinite(loss):
        raise CheckFailed(f"non-finite training loss {loss}", **figures)
    figures["summary"] = (f"{seconds:.2f} s/epoch ({len(batches)} steps, {1000 * seconds / len(batches):.1f} ms/step, "
                          f"{figures['seq_per_s']:.0f} seq/s)")
    return figures


# ---------------------------------------------------------------------------- optional: compile
@group("compile", "--compile per variant: compile time, steady-state step against eager", optional=True)
def plan_compile(opts: Options) -> list[Item]:
    items = [Item(f"compile/{variant}/default", functools.partial(check_compile, opts, variant, "default"), 300)
             for variant in VARIANTS]
    items += [Item(f"compile/{variant}/reduce-overhead", functools.partial(check_compile, opts, variant,
                                                                         "reduce-overhead"), 300)
              for variant in ("sasrec", "tisasrec+mhc")]
    return items


def _dynamo_counters() -> dict:
    try:
        from torch._dynamo.utils import counters
        return {"graph_breaks": sum(counters["graph_break"].values()),
                "unique_graphs": counters["stats"].get("unique_graphs", 0)}
    except Exception:  # noqa: BLE001  (a private API: figures only)
        return {}


def check_compile(opts: Options, variant: str, mode: str, steps: int = 12) -> dict:
    if mode != "default":
        cuda_required(opts, f"--compile_mode {mode}")
    from seqrec.tools.bench import SIZES
    spec = bench_spec(opts, "auto")
    data = bench_data(opts, 512 if opts.small else 6040, SIZES[spec["size"]]["maxlen"])
    batches = epoch_batches(data, spec["batch_size"], 2)
    device = torch.device(opts.device)
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
    before = _dynamo_counters()
    extra = {"compile_mode": mode} if mode != "default" else {}
    trainer = bench_trainer(opts, variant, "auto", data, compile=True, **extra)
    figures: dict = {"mode": mode, **apply_cli_backends(trainer, device)}
    t0 = time.perf_counter()
    trainer.train_step(batches[0], 1)
    synchronize(opts)
    figures["first_step_s"] = round(time.perf_counter() - t0, 2)  # compiles forward and backward
    t0 = time.perf_counter()
    trainer.train_step(batches[1], 1)
    synchronize(opts)
    figures["second_step_s"] = round(time.perf_counter() - t0, 3)  # CUDA graphs record on a later call

    def steady(tr) -> float:
        times = []
        for users in batches[2:2 + steps]:
            t = time.perf_counter()
            tr.train_step(users, 1)
            synchronize(opts)
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    compiled = steady(trainer)
    eager = steady(bench_trainer(opts, variant, "auto", data))
    after = _dynamo_counters()
    figures.update(compiled_s_per_step=compiled, eager_s_per_step=eager, speedup=eager / compiled,
                   **{k: after[k] - before.get(k, 0) for k in after})
    figures["summary"] = (f"first step {figures['first_step_s']:.1f} s; {1000 * compiled:.1f} ms/step vs "
                          f"{1000 * eager:.1f} eager ({eager / compiled:.2f}x)")
    if figures.get("graph_breaks"):
        raise CheckFailed(f"{figures['graph_breaks']} graph break(s) under --compile", **figures)
    return figures


# ---------------------------------------------------------------------------- the worker
@contextlib.contextmanager
def alarm(seconds: float):
    def fire(signum, frame):
        raise ItemTimeout()
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_item(item: Item) -> dict:
    """Run one check under its timeout; a record whatever happens (except SIGTERM)."""
    t0 = time.perf_counter()
    status, error, figures = "pass", None, {}
    try:
        with alarm(item.timeout):
            figures = item.run() or {}
    except Skipped as why:
        status, error = "skipped", str(why)
    except CheckFailed as failed:
        status, error, figures = "fail", str(failed)[:600], failed.figures
    except ItemTimeout:
        status, error = "fail", f"timeout: not done after {item.timeout:.0f} s"
    except Terminated:
        raise
    except BaseException as err:  # noqa: BLE001  (KeyboardInterrupt included: the next check still runs)
        status, error = "fail", one_line(err)
    summary = figures.pop("summary", None) if isinstance(figures, dict) else None
    return {"name": item.name, "status": status, "error": error, "summary": summary,
            "seconds": round(time.perf_counter() - t0, 2), "figures": figures}


def context_lost(record: dict) -> bool:
    """Whether a failure leaves the CUDA context unusable for the checks after it."""
    text = record.get("error") or ""
    return record["status"] == "fail" and any(s in text for s in ("CUDA error", "device-side assert",
                                                                  "illegal memory access", "CUBLAS_STATUS"))


def stop_marker(results: Path) -> Path:
    return results.with_suffix(".stop")


def worker(name: str, opts: Options, results: Path, first: int) -> int:
    """Run group `name`'s items from index `first`, appending one JSON line per event to results."""
    def terminate(signum, frame):
        raise Terminated()
    signal.signal(signal.SIGTERM, terminate)
    items = plan_items(GROUPS[name], opts)
    lost = None

    def emit(row: dict) -> None:
        with open(results, "a") as f:
            f.write(json.dumps(clean(row)) + "\n")

    stop = stop_marker(results)
    for index, item in enumerate(items[first:], start=first):
        if stop.exists():  # the main process is stopping this worker (its SIGTERM may have been
            return 1       # taken by the trainer's own handler, which ends a run, not the worker)
        emit({"event": "start", "index": index, "name": item.name})
        if lost:
            result = {"name": item.name, "status": "skipped", "error": f"not run: the CUDA context was lost in {lost}",
                      "summary": None, "seconds": 0.0, "figures": {}}
        else:
            try:
                result = run_item(item)
            except Terminated:
                emit({"event": "end", "index": index, "name": item.name, "status": "fail", "summary": None,
                      "error": "timeout: the check's worker was stopped (its time was up)", "seconds": None,
                      "figures": {}})
                return 1
            if context_lost(result):
                lost = item.name
        emit({"event": "end", "index": index, **result})
        print(f"[gpucheck] {result['status'].upper():7s} {item.name}", file=sys.stderr, flush=True)
    return 0


# ---------------------------------------------------------------------------- the main process
def clean(value):
    """A JSON-safe copy: NaN and infinities become None, odd objects their str()."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating)):
        return clean(value.item())
    return str(value)


def write_report(path: Path, report: dict) -> None:
    """The one output file, written atomically (a temporary file renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(clean(report), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def environment() -> dict:
    env: dict = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                 "cuda_build": torch.version.cuda, "platform": platform.platform(), "cpu_count": os.cpu_count(),
                 "cuda_available": cuda_available()}
    try:
        from seqrec.provenance import code_version
        env["code"] = code_version()
    except Exception:  # noqa: BLE001
        env["code"] = None
    if not env["cuda_available"]:
        return env
    with contextlib.suppress(Exception):
        env["cudnn"] = torch.backends.cudnn.version()
    with contextlib.suppress(Exception):
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    env["gpus"] = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        env["gpus"].append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                            "memory_gib": round(props.total_memory / 2**30, 1),
                            "multiprocessors": props.multi_processor_count})
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(Exception):
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip()
    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return env


def record(name: str, status: str, error: str | None, group_name: str, **rest) -> dict:
    return {"name": name, "group": group_name, "status": status, "error": error, "summary": rest.get("summary"),
            "seconds": rest.get("seconds"), "figures": rest.get("figures", {})}


def run_group(grp: Group, opts: Options, deadline: float, log_dir: Path,
              worker_cmd: Callable[[int], list[str]] | None = None) -> list[dict]:
    """Every item of a group, each in order in a worker process; a worker that dies or runs
    out of time is replaced by a fresh one for the items after the one it was running."""
    items = plan_items(grp, opts)
    done: dict[int, dict] = {}
    results = log_dir / f"{grp.name}.jsonl"
    results.unlink(missing_ok=True)  # a kept directory may hold an earlier run's
    log = log_dir / f"{grp.name}.log"
    first = 0
    while first < len(items):
        left = deadline - time.monotonic()
        if left < 5:
            for index in range(first, len(items)):
                done[index] = record(items[index].name, "skipped", "not run: the time budget was used up "
                                     f"(rerun with --only {grp.name})", grp.name)
            break
        limit = min(left, 60 + sum(item.timeout for item in items[first:]))
        cmd = worker_cmd(first) if worker_cmd else [
            sys.executable, "-m", "seqrec.tools.gpucheck", "--worker", grp.name, "--results", str(results),
            "--first", str(first), "--device", opts.device, "--workdir", str(opts.workdir),
            *(["--small"] if opts.small else []), *(["--only", ",".join(opts.only)] if opts.only else [])]
        seen = len(read_results(results))
        stop_marker(results).unlink(missing_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO,
                                    start_new_session=True)
            try:
                rc = proc.wait(limit)
                why = f"the check's worker exited with code {rc}"
            except subprocess.TimeoutExpired:
                stop_marker(results).touch()
                stop_process(proc, group_kill=True)
                rc, why = None, f"timeout: the check's worker was stopped after {limit:.0f} s"
            except BaseException:
                stop_marker(results).touch()
                stop_process(proc, group_kill=True)
                raise
        started = None  # the last check this worker started
        for row in read_results(results)[seen:]:
            index = row.get("index")
            if row.get("event") == "start":
                started = index
            elif row.get("event") == "end" and index is not None:
                done[index] = record(row["name"], row["status"], row.get("error"), grp.name,
                                     summary=row.get("summary"), seconds=row.get("seconds"),
                                     figures=row.get("figures") or {})
        nxt = next((i for i in range(first, len(items)) if i not in done), None)
        if nxt is None:
            break
        if started is not None and started in done:
            first = nxt  # it ended between two checks (or recorded its own end): go on with a fresh one
            continue
        if rc == 0 and started is None:
            why = "the check's worker ran no check"
        # The check the worker was on when it died, or, if it died before starting one, the next.
        culprit = started if started is not None else nxt
        done[culprit] = record(items[culprit].name, "fail", f"{why}: {last_line(log)}"[:600], grp.name)
        first = culprit + 1
    return [done[i] for i in range(len(items))]


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def selected_groups(only: tuple[str, ...], optional: bool, opts: Options) -> list[Group]:
    """The groups to run: all core ones (and the optional ones), or those --only names, by
    group or by check name."""
    if not only:
        return [grp for grp in GROUPS.values() if not grp.optional or optional]
    found = {grp.name: grp for grp in GROUPS.values() for item in grp.plan(opts)
             if grp.name in only or item.name in only}
    known = {grp.name for grp in GROUPS.values()} | {item.name for grp in GROUPS.values() for item in grp.plan(opts)}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise SystemExit(f"gpucheck: unknown check(s) {', '.join(unknown)}; see --list")
    return list(found.values())


def summary_lines(report: dict) -> list[str]:
    env = report["environment"]
    gpu = (env.get("gpus") or [{}])[0]
    head = (f"seqrec GPU check: {gpu.get('name', 'no GPU')}"
            + (f" (sm {gpu['capability']}, {gpu['memory_gib']} GiB)" if gpu else "")
            + f", torch {env['torch']}, CUDA {env.get('cuda_build') or 'none'}, Python {env['python']}")
    lines = [head]
    checks = report["checks"]
    reasons = {r["error"] for r in checks}
    if checks and len(reasons) == 1 and all(r["status"] == "skipped" for r in checks):
        checks = []  # the same skip for all (no CUDA): one line says it
        lines.append(f"all {len(report['checks'])} checks {reasons.pop()}")
    width = max([len(r["name"]) for r in checks] + [10])
    for r in checks:
        text = r["error"] if r["status"] != "pass" else (r.get("summary") or "")
        secs = f"{r['seconds']:6.1f}s" if isinstance(r.get("seconds"), (int, float)) else "       "
        lines.append(f"{r['status'].upper():7s} {r['name']:{width}s} {secs}  {text or ''}"[:240])
    counts = report["counts"]
    lines.append(f"{counts['pass']} pass, {counts['fail']} fail, {counts['skipped']} skipped in "
                 f"{report['seconds']:.0f} s -> {report['out']} (send this file back)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqrec.tools.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report to write [gpu_check.json]")
    parser.add_argument("--optional", action="store_true", help="also run the optional checks (--compile; minutes)")
    parser.add_argument("--only", default="", help="comma list of checks to run, by group (" + ", ".join(GROUPS)
                        + ") or by name (see --list)")
    parser.add_argument("--budget_s", type=float, default=300.0,
                        help="time for the core checks; those not started by then are skipped [300]")
    parser.add_argument("--optional_budget_s", type=float, default=1200.0,
                        help="extra time for the optional checks [1200]")
    parser.add_argument("--keep", metavar="DIR", help="keep the checks' run directories and logs in DIR")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: run what can run without a GPU, for developing this tool [cuda]")
    parser.add_argument("--small", action="store_true", help="toy sizes (developing this tool)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    if args.worker:
        return worker(args.worker, Options(args.device, args.small, Path(args.workdir), only), Path(args.results),
                      args.first)
    groups = selected_groups(only, args.optional, Options(args.device, args.small, Path("."), only))
    keep = Path(args.keep).resolve() if args.keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    workdir = keep or Path(tempfile.mkdtemp(prefix="seqrec_gpucheck_"))
    opts = Options(args.device, args.small, workdir, only)
    if args.list:
        for grp in groups:
            print(f"{grp.name:8s} {'(optional) ' if grp.optional else ''}{grp.about}")
            for item in plan_items(grp, opts):
                print(f"         {item.name} (timeout {item.timeout:.0f} s)")
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0
    started = time.monotonic()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env = environment()
    checks: list[dict] = []
    no_cuda = args.device == "cuda" and not env["cuda_available"]
    reason = (f"skipped: no CUDA (torch {torch.__version__} sees no GPU; built with CUDA "
              f"{torch.version.cuda or 'none'})")
    core_deadline = started + args.budget_s
    try:
        for grp in groups:
            if no_cuda or reason.startswith("interrupted"):
                checks += [record(item.name, "skipped", reason, grp.name) for item in plan_items(grp, opts)]
                continue
            deadline = core_deadline + (args.optional_budget_s if grp.optional else 0)
            print(f"[gpucheck] {grp.name}: {grp.about}", flush=True)
            try:
                checks += run_group(grp, opts, deadline, workdir)
            except KeyboardInterrupt:  # the report of what ran is still written
                reason = "interrupted (Ctrl-C) before this check"
                checks += [record(item.name, "skipped", reason, grp.name) for item in plan_items(grp, opts)]
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    counts = {status: sum(r["status"] == status for r in checks) for status in STATUSES}
    report = {"tool": "seqrec.tools.gpucheck", "version": REPORT_VERSION, "started": stamp,
              "seconds": round(time.monotonic() - started, 1), "argv": list(sys.argv[1:] if argv is None else argv),
              "out": str(args.out), "device": args.device, "small": args.small, "environment": env,
              "counts": counts, "checks": checks}
    write_report(Path(args.out), report)
    print("\n".join(summary_lines(report)), flush=True)
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())

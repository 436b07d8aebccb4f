"""Training and evaluation speed and memory: ``python -m seqrec.tools.bench [--quick]`` (or ``seqrec bench``).

Each case runs in a fresh subprocess, because peak RSS never goes down within a
process, and measures the trainer's real step (batch construction, forward,
backward, optimizer) on ML-1M-shaped data: 6,040 users with ML-1M-like sequence
lengths over 3,416 items. Results go to a JSON file and a markdown table, with
ratios between cases measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .. import hostmem
from ..config import TrainConfig

SIZES = {
    "seed": {"hidden_units": 50, "num_blocks": 2, "num_heads": 2, "maxlen": 200},
    "ref-h1": {"hidden_units": 50, "num_blocks": 2, "num_heads": 1, "maxlen": 200},
    "L50": {"hidden_units": 50, "num_blocks": 2, "num_heads": 2, "maxlen": 50},
    "seed-d256": {"hidden_units": 256, "num_blocks": 2, "num_heads": 2, "maxlen": 200},
    "large": {"hidden_units": 256, "num_blocks": 4, "num_heads": 8, "maxlen": 200},
}
# variant -> (time, mhc, mhc_native); "-torch": mHC on PyTorch ops instead of the CPU kernel
VARIANTS = {"sasrec": (False, False, True), "sasrec+mhc": (False, True, True), "tisasrec": (True, False, True),
            "tisasrec+mhc": (True, True, True), "tisasrec-literal": (True, False, True),
            "sasrec+mhc-torch": (False, True, False), "tisasrec+mhc-torch": (True, True, False)}
DEFAULT_VARIANTS = "sasrec,sasrec+mhc,tisasrec,tisasrec+mhc"
# the variant each one's step-time ratio is taken against
BASELINE = {"tisasrec-literal": "tisasrec", "sasrec+mhc": "sasrec", "tisasrec+mhc": "tisasrec",
            "sasrec+mhc-torch": "sasrec", "tisasrec+mhc-torch": "tisasrec"}


def use_literal_attention(model: torch.nn.Module) -> None:
    """Swap every TiSASRec attention for the literal [B, L, L, d] formula (tests' reference).

    Training steps only: evaluating it at evaluation batch sizes would need tens of GB.
    """
    import functools

    from ..models.tisasrec import TimeIntervalAttention
    from ..models.tisasrec_reference import reference_attention
    for module in model.modules():
        if isinstance(module, TimeIntervalAttention):
            module.forward = functools.partial(reference_attention, module)


def synthetic_sequences(num_users: int = 6040, num_items: int = 3416, seed: int = 0):
    """ML-1M-shaped data: log-normal lengths (median ~96, clipped to 20..2314), Zipf-like items."""
    from ..data.sequences import Sequences
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(4.56, 0.95, num_users).astype(np.int64), 20, 2314)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    items = rng.choice(np.arange(1, num_items + 1), size=offsets[-1], p=popularity / popularity.sum())
    gaps = rng.exponential(3600.0, size=offsets[-1]).astype(np.int64)
    times = 956_000_000 + np.cumsum(gaps)
    return Sequences(np.arange(num_users).astype(str), np.arange(1, num_items + 1).astype(str),
                     offsets, items.astype(np.int64), times)


def peak_rss_gb() -> float:
    """This process's peak RSS. Linux's VmHWM where there is one: getrusage's ru_maxrss
    carries the parent's RSS over into a child that subprocess started with vfork."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_worker(module: str, spec: dict) -> dict:
    """`python -m MODULE --worker SPEC` in a fresh process (honest peak RSS); its last stdout line
    is the JSON result. A failed worker raises RuntimeError with its last stderr line."""
    proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _timed(fn, device: torch.device) -> float:
    return _timed_cpu(fn, device)[0]


def _timed_cpu(fn, device: torch.device) -> tuple[float, float]:
    """Seconds fn took (CUDA events on a GPU) and this process's CPU seconds meanwhile.

    CPU time is the stable figure on a loaded machine, where other jobs stretch the wall
    time of a run limited to fewer threads than there are cores.
    """
    cpu0 = time.process_time()
    if device.type == "cuda":
        # The events go on the stream of the bench's device, named explicitly: the argument-free
        # forms (Event.record(), torch.cuda.synchronize()) use the *current* device, which is
        # device 0 unless someone called set_device, so on cuda:1 they timed an idle stream.
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000, time.process_time() - cpu0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - cpu0


def _start(spec: dict) -> torch.device:
    """The worker's device, with the thread count and host allocator the trainer's CLI sets."""
    device = torch.device(spec["device"])
    if device.type == "cuda":
        # One index from here on ("cuda" = the current device), made current as the trainer's
        # CLI does under torchrun, so work without an explicit device lands on it too.
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    if device.type == "cpu":
        hostmem.retain_freed_memory()  # as the trainer's CLI does
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return device


def make_trainer(spec: dict, variant: str, data, device: torch.device):
    """The trainer of one variant at spec's size, batch size, AMP, bucketing and expansion rate."""
    from ..config import Config
    from ..trainer import Trainer
    time_, mhc, mhc_native = VARIANTS[variant]
    cfg = Config()
    model = {**SIZES[spec["size"]], "time": time_, "mhc": mhc, "mhc_native": mhc_native}
    if mhc:
        model["mhc_expansion_rate"] = spec["expansion_rate"]
    for key, value in model.items():
        setattr(cfg.model, key, value)
    cfg.train.batch_size, cfg.train.amp = spec["batch_size"], spec["amp"]
    cfg.train.length_buckets = spec["length_buckets"]
    trainer = Trainer(cfg, data, device, Path(tempfile.mkdtemp()), [])
    if variant.endswith("-literal"):
        use_literal_attention(trainer.model)
    return trainer


def _batches(data, spec: dict) -> list[np.ndarray]:
    order = data.epoch_order(0, 1).cpu().numpy()  # the trainer plans micro-batches on the host
    return [order[i * spec["batch_size"]:(i + 1) * spec["batch_size"]] for i in range(spec["steps"])]


def run_case(spec: dict) -> dict:
    """Measure one (variant, size) in this process."""
    from ..data.tensors import SequenceTensors
    from ..evaluate import evaluate
    device = _start(spec)
    base_rss = peak_rss_gb()
    data = SequenceTensors(synthetic_sequences(), SIZES[spec["size"]]["maxlen"], device)
    trainer = make_trainer(spec, spec["variant"], data, device)
    cfg, literal = trainer.cfg, spec["variant"].endswith("-literal")
    step_times, cpu_times, batch_times = [], [], []
    for users in _batches(data, spec):
        wall, cpu = _timed_cpu(lambda: trainer.train_step(users, 1), device)
        step_times.append(wall)
        cpu_times.append(cpu)
        # The micro-batches the step builds, cut to their widths (the step's own share).
        batch_times.append(_timed(lambda: [trainer.batch(part, 1, width) for part, width
                                           in trainer.micro_batches(trainer.rank_rows(users))], device))
    warm = spec["steps"] // 3
    step = statistics.median(step_times[warm:])
    out = {**spec, "length_buckets": trainer.length_buckets, "threads": torch.get_num_threads(),
           "s_per_step": step, "cpu_s_per_step": statistics.median(cpu_times[warm:]),
           "seq_per_s": spec["batch_size"] / step,
           "s_per_epoch": step * trainer.steps_per_epoch,
           "batch_share": statistics.median(batch_times[warm:]) / step,
           # training's peak, before evaluation (timed in some rounds only) can raise it
           "peak_mem_gb": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                           else peak_rss_gb() - base_rss)}
    for protocol in ("sampled", "full"):  # NaN where not timed: literal attention, or rounds after the first
        out[f"eval_{protocol}_s"] = math.nan if literal or not spec.get("eval", True) else _timed(
            lambda: evaluate(trainer.model, data.splits["test"], cfg.eval, data.num_items, (protocol,)), device)
    return out


def run_pair(spec: dict) -> dict:
    """Step time of spec's variant against its BASELINE in this one process: the two
    trainers' steps alternate on the same batches, which of them goes first alternating
    too, and each pair of consecutive steps gives one ratio. The subprocess cases' ratio
    compares runs up to a minute apart; on a machine whose speed drifts over minutes
    (docs/PERFORMANCE.md § mHC overhead) a pair of steps half a second apart sees one
    machine. No memory figure: the process holds both models."""
    from ..data.tensors import SequenceTensors
    device = _start(spec)
    data = SequenceTensors(synthetic_sequences(), SIZES[spec["size"]]["maxlen"], device)
    trainers = [make_trainer(spec, variant, data, device) for variant in (BASELINE[spec["variant"]], spec["variant"])]
    times: list[list[float]] = [[], []]
    for step, users in enumerate(_batches(data, spec)):
        for k in (0, 1) if step % 2 == 0 else (1, 0):
            times[k].append(_timed(lambda: trainers[k].train_step(users, 1), device))
    warm = spec["steps"] // 3
    return {**spec, "threads": torch.get_num_threads(), "length_buckets": trainers[1].length_buckets,
            **paired_ratio(times[0][warm:], times[1][warm:])}


def paired_ratio(base: list[float], times: list[float]) -> dict:
    """The median and quartiles of times[i] / base[i], and each side's median step."""
    ratios = sorted(t / b for b, t in zip(base, times))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"ratio": statistics.median(ratios), "ratio_q1": q1, "ratio_q3": q3, "pairs": len(ratios),
            "s_per_step": statistics.median(times), "baseline_s_per_step": statistics.median(base)}


def paired_line(row: dict) -> str:
    if "error" in row:
        return f"- {row['size']}: {label(row)} / {BASELINE[row['variant']]}: {row['error']}"
    return (f"- {row['size']}, buckets {row['length_buckets']}, {row['threads']} threads: {label(row)} / "
            f"{BASELINE[row['variant']]} = {row['ratio']:.2f}x step time in one process (quartiles "
            f"{row['ratio_q1']:.2f}-{row['ratio_q3']:.2f} over {row['pairs']} alternating pairs of steps; "
            f"{row['s_per_step']:.3f} vs {row['baseline_s_per_step']:.3f} s)")


def label(row: dict) -> str:
    """The variant, with the expansion rate for mHC variants."""
    return f"{row['variant']} n={row['expansion_rate']}" if row["mhc"] else row["variant"]


def mhc_parts(tokens: int, n: int = 4, dim: int = 50, repeats: int = 10) -> dict[str, float]:
    """CPU milliseconds of each part of one mHC sub-layer, forward + backward, on `tokens` tokens
    of random data (the parts as MHCResidual's PyTorch path computes them, each timed alone),
    and of the compiled CPU kernel's two Functions that replace them (when it builds here)."""
    from ..models import native
    from ..models.mhc import _RMSProjection, sinkhorn
    x = torch.randn(tokens, n, dim, requires_grad=True)
    phi = torch.randn(n * dim, 2 * n + n * n, requires_grad=True)
    logits = torch.randn(n, n, tokens)
    mixing = torch.rand(tokens, n + 1, n, requires_grad=True)
    h_post, out = torch.rand(tokens, n, requires_grad=True), torch.randn(tokens, dim, requires_grad=True)
    norm = torch.nn.LayerNorm(dim)
    parts = {
        "projection + RMS norm": lambda: _RMSProjection.apply(x.view(tokens, -1), phi),
        "Sinkhorn": lambda: sinkhorn(logits.requires_grad_().permute(2, 0, 1), 20),
        "mixing product": lambda: torch.einsum("...kn,...nc->...kc", mixing, x),
        "H_post update": lambda: torch.addcmul(x, h_post[..., None], out[..., None, :]),
        "n-stream LayerNorm": lambda: norm(x),
        "plain LayerNorm": lambda: norm(out),
    }
    if native.library(torch.float32, n) is not None:
        alpha, bias = torch.full((3,), 0.01, requires_grad=True), torch.zeros(2 * n + n * n, requires_grad=True)
        parts["kernel: projection..mixing"] = lambda: native.PreMix.apply(x, phi, alpha, bias, 20)
        parts["kernel: update + LayerNorm"] = lambda: native.PostNorm.apply(x, h_post, out, norm.weight,
                                                                             norm.bias, norm.eps)
    result = {}
    for name, part in parts.items():
        times = []
        for _ in range(repeats + 2):
            start = time.process_time()
            outputs = part()
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            # dense gradients, as in training (sum()'s is a stride-0 view)
            torch.autograd.backward(outputs, [torch.ones_like(y) for y in outputs])
            times.append(time.process_time() - start)
        result[name] = 1000 * statistics.median(times[2:])
    return result


def table(rows: list[dict]) -> str:
    """Markdown rows; 'x SASRec' is the step-time ratio to SASRec of the same size and
    length buckets in this run; 'peak mem GB' is the training steps' peak (host RSS above the
    worker's baseline on CPU, allocated memory on GPU), before evaluation."""
    head = ("| variant | size | B | buckets | threads | s/step | CPU s/step | x SASRec | seq/s | s/epoch "
            "| batch build | peak mem GB | sampled eval s | full eval s |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    base = {_group(r): r["s_per_step"] for r in rows if r["variant"] == "sasrec" and "error" not in r}
    for r in rows:
        first = f"| {label(r)} | {r['size']} | {r['batch_size']} | {r['length_buckets']}"
        if "error" in r:
            lines.append(f"{first} | {r['error']} |")
            continue
        ratio = f"{r['s_per_step'] / base[_group(r)]:.2f}" if _group(r) in base else "-"
        lines.append(f"{first} | {r['threads']} | {r['s_per_step']:.4f} | {r['cpu_s_per_step']:.4f} | {ratio} "
                     f"| {r['seq_per_s']:.0f} "
                     f"| {r['s_per_epoch']:.2f} | {r['batch_share']:.1%} | {r['peak_mem_gb']:.2f} "
                     f"| {r['eval_sampled_s']:.2f} | {r['eval_full_s']:.2f} |")
    return "\n".join(lines)


def _group(row: dict) -> tuple[str, int]:
    return row["size"], row["length_buckets"]


def summarise(rows: list[dict]) -> list[dict]:
    """One row per case, each figure the median over the rounds that measured it; rows of
    failed cases are kept as they are."""
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        cases.setdefault((label(r), *_group(r), "error" in r), []).append(r)
    out = []
    for (*_, failed), group in cases.items():
        if failed:
            out.extend(group)
            continue
        out.append({**group[0], **{key: _median(r[key] for r in group)
                                   for key, value in group[0].items() if isinstance(value, float)}})
    return out


def _median(values) -> float:
    """The median of the values that were measured (not NaN), NaN if none was."""
    measured = [v for v in values if not math.isnan(v)]
    return statistics.median(measured) if measured else math.nan


def ratios(rows: list[dict]) -> str:
    """Ratios between cases of the same round (run one after the other, so the machine's
    drift between rounds cancels): efficient vs literal TiSASRec and mHC (each n, on the CPU
    kernel or on PyTorch ops) vs the same model without it (per size and bucketing), and each
    variant's step without length buckets vs with them. Several rounds: the median of the
    rounds' ratios, and their range."""
    rounds: dict[int, dict] = {}
    for r in rows:
        if "error" not in r:
            rounds.setdefault(r.get("round", 0), {})[(label(r), *_group(r))] = r
    found: dict[str, list[tuple[float, ...]]] = {}  # a line's head -> each round's ratios
    for by in rounds.values():
        for (name, size, buckets), r in by.items():
            other = by.get((BASELINE.get(r["variant"]), size, buckets))
            if other is not None:
                found.setdefault(f"- {size}, buckets {buckets}: {name} / {other['variant']} =", []).append(
                    (r["s_per_step"] / other["s_per_step"], r["cpu_s_per_step"] / other["cpu_s_per_step"],
                     r["peak_mem_gb"] / max(other["peak_mem_gb"], 1e-9)))
            if buckets > 1 and (name, size, 1) in by:
                found.setdefault(f"- {size}: {name} step, buckets 1 / buckets {buckets} =", []).append(
                    (by[(name, size, 1)]["s_per_step"] / r["s_per_step"],))
    lines = []
    for head, values in found.items():
        mid = [statistics.median(v[i] for v in values) for i in range(len(values[0]))]
        figures = (f"{mid[0]:.2f}x step time ({mid[1]:.2f}x CPU time), {mid[2]:.2f}x peak memory"
                   if len(mid) == 3 else f"{mid[0]:.2f}x")
        spread = (f" (step ratio {min(v[0] for v in values):.2f}-{max(v[0] for v in values):.2f} "
                  f"over {len(values)} rounds)" if len(values) > 1 else "")
        lines.append(f"{head} {figures}{spread}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The flags of `seqrec bench`, built apart from main so that they can be read (the docs'
    commands checked against them, say) without running a benchmark."""
    parser = argparse.ArgumentParser(prog="seqrec bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seed size only, fewer steps (a few minutes on CPU)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma list of " + ", ".join(VARIANTS)
                        + " (tisasrec-literal: the O(B L^2 d) formula, training steps only, several GB)")
    parser.add_argument("--sizes", default=None, help="comma list of " + ", ".join(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="off", help="off|bf16|fp16|auto")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--length_buckets", default=str(TrainConfig.length_buckets),
                        help="comma list of --length_buckets values to measure (1 = no length bucketing, "
                             "0 = the trainer's automatic choice)")
    parser.add_argument("--expansion_rates", default="4",
                        help="comma list of mHC expansion rates n, each measured for every +mhc variant")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per case (0 = torch's default: all cores)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every case this many times, all cases once per round (evaluation is "
                             "timed in the first only); the table gives each case's medians, the ratios the "
                             "median of each round's ratio (a noisy machine's drift then hits both sides of a "
                             "ratio alike)")
    parser.add_argument("--paired", action="store_true",
                        help="instead of a subprocess per case, time each variant that has a baseline (+mhc: "
                             "the same model without; tisasrec-literal: tisasrec) against it in one process, "
                             "their steps alternating: the step-time ratio a drifting machine disturbs least "
                             "(no memory figures)")
    parser.add_argument("--out", default="bench_results", help="directory for results.json and results.md")
    parser.add_argument("--mhc_parts", type=int, metavar="TOKENS",
                        help="only time each part of one mHC sub-layer (n = the first --expansion_rates, d=50) "
                             "on TOKENS tokens, forward + backward, CPU ms")
    parser.add_argument("--counts", action="store_true",
                        help="only count each training step's GPU costs on this CPU: non-view aten ops (eager "
                             "kernel launches) and host syncs per step and per epoch (seqrec.tools.stepcost)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.counts:
        from . import stepcost
        return stepcost.main([])
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(run_pair(spec) if spec.get("paired") else run_case(spec)))
        return 0
    if args.mhc_parts:
        return print_mhc_parts(args)
    cases = bench_cases(args)
    if args.paired:
        cases = [case for case in cases if case[1] in BASELINE]
        if not cases:
            parser.error("--paired times variants against a baseline: give one of " + ", ".join(BASELINE))
    write_report(Path(args.out), run_rounds(args, cases), args)
    return 0


def print_mhc_parts(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    n = int(args.expansion_rates.split(",")[0])
    for name, ms in mhc_parts(args.mhc_parts, n).items():
        print(f"{name:24s} {ms:8.2f} ms")
    return 0


def bench_cases(args: argparse.Namespace) -> list[tuple[str, str, int, int | None]]:
    """(size, variant, length buckets, expansion rate) of every case; the rate is None without mHC."""
    sizes = args.sizes.split(",") if args.sizes else (["seed"] if args.quick else list(SIZES))
    rates = [int(n) for n in args.expansion_rates.split(",")]
    return [(size, variant, int(buckets), n) for size in sizes for variant in args.variants.split(",")
            for buckets in args.length_buckets.split(",") for n in (rates if VARIANTS[variant][1] else [None])]


def run_rounds(args: argparse.Namespace, cases: list[tuple]) -> list[dict]:
    """Every case once per round, each in its own worker process; a failed case keeps its error."""
    steps = args.steps or (6 if args.quick else 15)
    rows = []
    for round_ in range(args.rounds):
        for size, variant, buckets, n in cases:
            time_, mhc, mhc_native = VARIANTS[variant]
            spec = {"variant": variant, "size": size, "time": time_, "mhc": mhc, "mhc_native": mhc_native,
                    "expansion_rate": n, "device": args.device, "amp": args.amp, "batch_size": args.batch_size,
                    "steps": steps, "length_buckets": buckets, "threads": args.threads, "round": round_,
                    "eval": round_ == 0, "paired": args.paired}
            try:
                rows.append(run_worker("seqrec.tools.bench", spec))
            except RuntimeError as err:
                rows.append({**spec, "error": str(err)[:120]})
            print(paired_line(rows[-1]) if args.paired else table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def write_report(out: Path, rows: list[dict], args: argparse.Namespace) -> None:
    """results.json (every round's rows) and results.md (medians and ratios) under out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    medians = f"Medians over {args.rounds} rounds.\n\n" if args.rounds > 1 else ""
    report = ("\n".join(map(paired_line, rows)) if args.paired
              else medians + table(summarise(rows)) + "\n\n" + ratios(rows)) + "\n"
    (out / "results.md").write_text(report)
    print(report)


if __name__ == "__main__":
    sys.exit(main())

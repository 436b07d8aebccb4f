"""Data pipeline and epoch cost at ML-20M size: ``python -m seqrec.tools.bench_scale``.

Writes an ML-20M-shaped synthetic ``ratings.csv`` (138,493 users, 26,744 items,
20,000,263 rated interactions with timestamps, ML-20M's CSV layout and user-major
order) under --workdir, then measures, each in a fresh subprocess so that peak RSS is
that stage's own: reading, reading + 5-core filtering and leave-one-out sequences, and
reading + sequences + the device tensors the trainer uses (``SequenceTensors``) -- the
last is the whole pipeline behind ``seqrec train``. Epoch cost is measured at 25/50/100%
of the users: a timed pass of batch construction over the whole epoch, and a run of
consecutive trainer steps whose mean step time times the steps per epoch estimates the
epoch (a full epoch at 138k users and L=200 would take minutes per fraction on a CPU).
Results go to results.json and results.md like ``seqrec bench``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .bench import SIZES, peak_rss_gb, run_worker

ML20M = {"users": 138_493, "items": 26_744, "interactions": 20_000_263}
MIN_COUNT = 5  # the k of the k-core filter (SASRec's preprocessing)
STAGES = ("read", "sequences", "tensors")


def ml20m_like(num_users: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-user lengths, items and ascending timestamps (user-major) shaped like ML-20M.

    Users have at least 20 interactions (as in ML-20M) and log-normal lengths (median ~77,
    long tail, largest ~7,300), scaled to ML-20M's mean of 144.4 per user; item popularity
    is a shifted power law, (rank + 300)^-2.2: the head item takes ~0.4% of all
    interactions, the median item ~18, and every item is drawn at least once. Timestamps:
    a per-user start in 1996-2012 and log-normal gaps (median ~7 minutes, up to ~4 months).
    (user, item) pairs may repeat: the data pipeline does not deduplicate.
    Item and interaction counts scale with num_users; at 138,493 users they are ML-20M's.
    """
    rng = np.random.default_rng(seed)
    num_items = max(50, round(ML20M["items"] * num_users / ML20M["users"]))
    total = round(ML20M["interactions"] * num_users / ML20M["users"])
    extra = np.minimum(rng.lognormal(4.0, 1.25, num_users), 7000.0)  # beyond the 20 everyone has
    extra *= (total - 20 * num_users) / extra.sum()
    lengths = 20 + np.floor(extra).astype(np.int64)
    lengths[np.argsort(extra - np.floor(extra))[::-1][:total - lengths.sum()]] += 1  # exact total
    weights = (np.arange(num_items) + 300.0) ** -2.2
    drawn = rng.choice(num_items, size=total - num_items, p=weights / weights.sum())
    items = rng.permutation(np.concatenate([np.arange(num_items), drawn])) + 1
    gaps = np.minimum(rng.lognormal(6.0, 2.5, total), 1e7).astype(np.int64)
    starts = np.repeat(rng.integers(820_000_000, 1_330_000_000, num_users), lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    since_start = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[offsets[:-1]] - gaps[offsets[:-1]], lengths)
    return lengths, items, starts + since_start


def format_csv(columns: list[tuple[np.ndarray, bytes]]) -> bytes:
    """Lines of non-negative integer columns, each followed by its separator, without Python loops per line."""
    digits = [np.maximum(1, np.floor(np.log10(np.maximum(c, 1))).astype(np.int64) + 1) for c, _ in columns]
    line = sum(digits) + sum(len(sep) for _, sep in columns)
    ends = np.cumsum(line)
    out = np.empty(ends[-1], dtype=np.uint8)
    pos = ends - line
    for (col, sep), width in zip(columns, digits):
        value = col.astype(np.int64)
        for k in range(int(width.max()) - 1, -1, -1):  # last digit first
            live = width > k
            out[(pos + k)[live]] = (value[live] % 10) + ord("0")
            value[live] //= 10
        pos = pos + width
        for j, byte in enumerate(sep):
            out[pos + j] = byte
        pos = pos + len(sep)
    return out.tobytes()


def write_ratings(path: Path, num_users: int, seed: int = 0) -> dict:
    """ML-20M's ratings.csv layout: userId,movieId,rating,timestamp with half-star ratings."""
    t0 = time.perf_counter()
    lengths, items, times = ml20m_like(num_users, seed)
    rng = np.random.default_rng(seed + 1)
    stars = rng.integers(1, 11, len(items))  # 0.5 .. 5.0
    users = np.repeat(np.arange(1, num_users + 1), lengths)
    body = format_csv([(users, b","), (items, b","), (stars // 2, b"."), (5 * (stars % 2), b","), (times, b"\n")])
    path.write_bytes(b"userId,movieId,rating,timestamp\n" + body)
    return {"path": str(path), "users": num_users, "items": int(items.max()), "interactions": len(items),
            "file_mb": round(path.stat().st_size / 2**20, 1), "generate_s": round(time.perf_counter() - t0, 2)}


def run_stage(spec: dict) -> dict:
    """Read (and build sequences, and tensors) from the file in this process; seconds per part, peak RSS."""
    from ..data import SequenceTensors, build_sequences, read_interactions
    row, t0 = {"stage": spec["stage"]}, time.perf_counter()
    interactions = read_interactions(spec["path"])
    row["read_s"] = time.perf_counter() - t0
    if spec["stage"] != "read":
        t1 = time.perf_counter()
        seqs = build_sequences(interactions, MIN_COUNT, MIN_COUNT)
        del interactions
        row["sequences_s"] = time.perf_counter() - t1
        row.update(users=seqs.num_users, items=seqs.num_items, interactions=len(seqs.items))
    if spec["stage"] == "tensors":
        t2 = time.perf_counter()
        SequenceTensors(seqs, spec["maxlen"], spec["device"])
        row["tensors_s"] = time.perf_counter() - t2
    row["total_s"], row["peak_rss_gb"] = time.perf_counter() - t0, peak_rss_gb()
    return row


def run_epoch(spec: dict) -> dict:
    """Epoch cost on the first `users` synthetic users: batch construction and trainer steps."""
    from ..config import Config
    from ..data import SequenceTensors
    from ..data.sequences import Sequences
    from ..data.tensors import BatchPlan
    from ..trainer import Trainer
    lengths, items, times = ml20m_like(spec["all_users"], spec["seed"])  # the catalogue stays the same
    offsets = np.concatenate([[0], np.cumsum(lengths[:spec["users"]])])  # users are i.i.d.: a prefix samples them
    seqs = Sequences(np.arange(1, spec["users"] + 1).astype(str), np.arange(1, items.max() + 1).astype(str),
                     offsets, items[:offsets[-1]], times[:offsets[-1]])
    cfg = Config()
    for key, value in SIZES[spec["size"]].items():
        setattr(cfg.model, key, value)
    cfg.train.batch_size = spec["batch_size"]
    data = SequenceTensors(seqs, cfg.model.maxlen, spec["device"])
    trainer = Trainer(cfg, data, torch.device(spec["device"]), Path(tempfile.mkdtemp()), [])
    order, batch = data.epoch_order(0, 1), spec["batch_size"]
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    t0 = time.perf_counter()
    for users in batches:
        data.train_batch(BatchPlan(users, 0, 1, negatives=trainer.loss_fn.negatives))
    build_s = time.perf_counter() - t0
    warm = 2
    for users in batches[:warm]:
        trainer.train_step(users, 1)
    t1 = time.perf_counter()
    for users in batches[warm:warm + spec["steps"]]:
        trainer.train_step(users, 1).item()
    step_s = (time.perf_counter() - t1) / spec["steps"]
    return {"users": spec["users"], "interactions": int(offsets[-1]), "steps_per_epoch": len(batches),
            "batch_build_epoch_s": build_s, "s_per_step": step_s, "epoch_est_s": step_s * len(batches)}


def report(result: dict) -> str:
    f = result["file"]
    lines = [f"Synthetic ratings.csv: {f['users']:,} users, {f['items']:,} items, {f['interactions']:,} "
             f"interactions, {f['file_mb']:,} MB (written in {f['generate_s']:.1f} s); {MIN_COUNT}-core filter, "
             f"maxlen {result['maxlen']}.", "",
             "| stage (own process) | read s | sequences s | tensors s | total s | peak RSS GB |", "|---" * 6 + "|"]
    for r in result["pipeline"]:
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in ("read_s", "sequences_s", "tensors_s", "total_s")]
        lines.append(f"| {r['stage']} | " + " | ".join(cells) + f" | {r['peak_rss_gb']:.2f} |")
    lines += ["", f"Epoch cost, size {result['size']}, B={result['batch_size']} "
                  f"(epoch estimate = mean of {result['steps']} consecutive trainer steps x steps per epoch):", "",
              "| users | interactions | steps/epoch | batch build, whole epoch s | s/step | epoch estimate s "
              "| epoch s per 1k users |", "|---" * 7 + "|"]
    for r in result["epoch"]:
        lines.append(f"| {r['users']:,} | {r['interactions']:,} | {r['steps_per_epoch']} | "
                     f"{r['batch_build_epoch_s']:.2f} | {r['s_per_step']:.3f} | {r['epoch_est_s']:.0f} | "
                     f"{1000 * r['epoch_est_s'] / r['users']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqrec.tools.bench_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=ML20M["users"],
                        help="users in the synthetic file (items and interactions scale with it)")
    parser.add_argument("--workdir", help="where the synthetic file goes (default: a temporary directory, removed)")
    parser.add_argument("--fractions", default="0.25,0.5,1", help="user fractions for the epoch-cost rows")
    parser.add_argument("--size", default="seed", choices=list(SIZES), help="model size of the epoch rows")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed trainer steps per epoch row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_results/scale", help="directory for results.json and results.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(run_epoch(spec) if "users" in spec else run_stage(spec)))
        return 0
    maxlen = SIZES[args.size]["maxlen"]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "ratings.csv"
        result = {"maxlen": maxlen, "size": args.size, "batch_size": args.batch_size, "steps": args.steps,
                  "device": args.device, "file": write_ratings(path, args.users), "pipeline": [], "epoch": []}
        print(f"wrote {path}: {result['file']}", flush=True)
        for stage in STAGES:
            spec = {"stage": stage, "path": str(path), "maxlen": maxlen, "device": args.device}
            result["pipeline"].append(run_worker("seqrec.tools.bench_scale", spec))
            print(result["pipeline"][-1], flush=True)
    for fraction in map(float, args.fractions.split(",")):
        spec = {"users": round(fraction * args.users), "all_users": args.users, "seed": 0, "size": args.size,
                "batch_size": args.batch_size, "steps": args.steps, "device": args.device}
        result["epoch"].append(run_worker("seqrec.tools.bench_scale", spec))
        print(result["epoch"][-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(report(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

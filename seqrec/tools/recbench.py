"""Bulk recommendation speed and memory: ``python -m seqrec.tools.recbench``.

What ``seqrec recommend --all_users --out recs.csv`` does, timed: top-10 items for every
user of a synthetic run (seen items excluded over the whole history), written as CSV rows.
Two cases, each in a fresh process so its peak RSS is its own:

* ``ml1m``: ML-1M's shape (6,040 users, 3,416 items, 1,000,209 interactions);
* ``items1m``: a 1,000,000-item catalogue (20,000 users, 50 interactions each), where the
  ``--item_chunk`` merge keeps scores at batch x chunk floats instead of batch x catalogue.

The model is an untrained SASRec (d=50, 2 blocks, L=200): speed does not depend on the
weights. Reported per case: users per second, and peak RSS with the RSS before serving
(model and sequences loaded), so their difference is what serving itself holds.
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

from .bench import peak_rss_gb, run_worker
from ..config import ModelConfig
from ..data.sequences import Sequences
from ..models import build_model
from ..recommend import recommend_in_batches, write_rows
from ..serve import Recommender

CASES = {"ml1m": {"users": 6_040, "items": 3_416, "interactions": 1_000_209},
         "items1m": {"users": 20_000, "items": 1_000_000, "interactions": 1_000_000}}


def synthetic_sequences(users: int, items: int, interactions: int, seed: int = 0) -> Sequences:
    """Users with at least 20 interactions and log-normal lengths summing to `interactions`;
    items drawn with a power-law popularity. Ids are decimal strings, as a ratings file gives."""
    rng = np.random.default_rng(seed)
    extra = rng.lognormal(4.0, 1.0, users)
    lengths = 20 + np.floor(extra * (interactions - 20 * users) / extra.sum()).astype(np.int64)
    lengths[: interactions - lengths.sum()] += 1
    weights = (np.arange(items) + 100.0) ** -1.1
    flat = rng.choice(items, size=int(lengths.sum()), p=weights / weights.sum()) + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Sequences(np.arange(1, users + 1).astype(str), np.arange(1, items + 1).astype(str), offsets,
                     flat.astype(np.int64), None)


def measure(case: str, batch_size: int, item_chunk: int, k: int) -> dict:
    shape = CASES[case]
    seqs = synthetic_sequences(shape["users"], shape["items"], shape["interactions"])
    cfg = ModelConfig(maxlen=200, time=False, mhc=False)
    torch.manual_seed(0)
    rec = Recommender(build_model(cfg, shape["items"]), cfg.maxlen, list(seqs.item_ids), False, users=seqs)
    before = peak_rss_gb()
    filters = {"exclude_seen": True, "exclude_items": None, "allow_items": None, "item_chunk": item_chunk}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_rows(Path(tmp) / "recs.csv", recommend_in_batches(rec, seqs.user_ids, k, batch_size, filters))
        seconds = time.perf_counter() - start
    return {"case": case, **shape, "batch_size": batch_size, "item_chunk": item_chunk, "k": k,
            "threads": torch.get_num_threads(), "seconds": round(seconds, 2),
            "users_per_s": round(shape["users"] / seconds), "rss_before_gb": round(before, 3),
            "peak_rss_gb": round(peak_rss_gb(), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqrec.tools.recbench", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of " + ", ".join(CASES))
    parser.add_argument("--batch_size", type=int, default=256, help="users scored at a time")
    parser.add_argument("--item_chunk", type=int, default=65536, help="items scored at a time")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return 0
    print("| case | users | items | users/s | peak RSS (GB) | RSS before serving (GB) |")
    print("|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        row = run_worker("seqrec.tools.recbench", {"case": case, "batch_size": args.batch_size,
                                                   "item_chunk": args.item_chunk, "k": args.k})
        print(f"| {case} | {row['users']:,} | {row['items']:,} | {row['users_per_s']:,} | "
              f"{row['peak_rss_gb']:.2f} | {row['rss_before_gb']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The in-group half of the environment check: collectives and a DDP training smoke test.

Every rank runs every check and gets a local (status, detail); the results are then merged
over ranks (the worst status wins, with the detail of the rank that had it), so rank 0 can
print one line per check and every rank exits with the same code. A check that raises is a
FAIL with the exception's first line. The process group is joined with a short timeout, so
a peer that hangs in a collective turns into a failed check rather than a hung job.
"""
from __future__ import annotations

import hashlib
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from .config import Config
from .data.sequences import Sequences
from .data.tensors import SequenceTensors

PASS, SKIP, FAIL = "PASS", "SKIP", "FAIL"
SEVERITY = {PASS: 0, SKIP: 1, FAIL: 2}
DTYPES = (torch.float32, torch.float64, torch.int64, torch.bfloat16, torch.float16)
COLLECTIVE_TIMEOUT_S = 60.0


@dataclass
class Check:
    name: str
    status: str
    detail: str = ""


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_reduce_dtype(dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    """Sum small integers in `dtype`: exact in every dtype (bf16 included) up to 64 ranks.

    A backend that rejects the dtype (older gloo builds for bf16/fp16) is a SKIP with its
    message; NCCL supports all of them, so there an error is a FAIL.
    """
    n = dist.world_size()
    base = torch.arange(8, device=device) % 4
    t = (base + dist.rank() % 2).to(dtype)
    try:
        dist.all_reduce_sum(t)
    except RuntimeError as err:
        if dist.backend() != "nccl" and re.search(r"type|support", str(err), re.IGNORECASE):
            return SKIP, f"{dist.backend()} cannot all_reduce {dtype}: {first_line(err)}"
        raise
    expected = base.double() * n + n // 2  # n // 2 odd ranks added 1 each
    if torch.equal(t.double(), expected):
        return PASS, f"sum over {n} ranks exact"
    return FAIL, f"got {t.tolist()}, expected {expected.tolist()}"


def all_reduce_bandwidth(device: torch.device, sizes: list[int]) -> tuple[str, str]:
    """Time float32 all_reduce per message size; algbw = bytes / time, busbw = algbw * 2(n-1)/n.

    busbw is the nccl-tests convention: the per-link traffic of a ring all-reduce, comparable
    across world sizes with the link's rated bandwidth. Each size is checked once for the
    right sum before it is timed (on zeros, so repeated sums cannot overflow).
    """
    n = dist.world_size()
    parts = []
    for size in sizes:
        x = torch.ones(max(1, size // 4), device=device)
        dist.all_reduce_sum(x)
        if not torch.all(x == n):
            return FAIL, f"{human_bytes(size)}: wrong sum"
        x.zero_()
        iters = max(3, min(50, (256 << 20) // size))
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce_sum(x)
        _sync(device)
        seconds = (time.perf_counter() - start) / iters
        algbw = size / seconds / 1e9
        parts.append(f"{human_bytes(size)} {seconds * 1e3:.3g} ms {algbw:.3g}/{algbw * 2 * (n - 1) / n:.3g} GB/s")
    return PASS, "algbw/busbw: " + "; ".join(parts)


def broadcast(device: torch.device) -> tuple[str, str]:
    """Broadcast from the first and from the last rank; every rank must end with the source's data."""
    expected = torch.arange(1000, dtype=torch.float32, device=device)
    for src in sorted({0, dist.world_size() - 1}):
        t = expected.clone() if dist.rank() == src else torch.zeros_like(expected)
        if not torch.equal(dist.broadcast(t, src), expected):
            return FAIL, f"data from rank {src} did not arrive intact"
    return PASS, "from rank 0 and from the last rank"


def barrier(device: torch.device, delay: float = 0.3) -> tuple[str, str]:
    """Rank 0 arrives `delay` s late; the others must be held until it does."""
    if dist.is_main():
        time.sleep(delay)
    start = time.perf_counter()
    dist.barrier()
    _sync(device)  # in case the backend only enqueued the barrier on the GPU stream
    waited = time.perf_counter() - start
    if not dist.is_main() and waited < delay / 2:
        return FAIL, f"returned after {waited:.3f} s although rank 0 arrived {delay} s late"
    return PASS, f"held the other ranks until rank 0 arrived {delay} s late" if dist.world_size() > 1 else "one process"


def _random_sequences(num_users: int, num_items: int, seed: int) -> Sequences:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 20, num_users)
    total = int(lengths.sum())
    return Sequences(user_ids=np.arange(num_users).astype(str), item_ids=np.arange(1, num_items + 1).astype(str),
                     offsets=np.concatenate([[0], np.cumsum(lengths)]),
                     items=rng.integers(1, num_items + 1, total),
                     times=1_600_000_000 + np.cumsum(rng.integers(60, 86_400, total)))


def ddp_smoke(device: torch.device, time_aware: bool, mhc: bool) -> tuple[str, str]:
    """Two optimizer steps of the real Trainer (DDP, loss, AMP as configured) on a tiny model.

    Each rank trains its own share of the batch, so the ranks' local gradients differ; only
    DDP's gradient all-reduce makes the parameters come out bit-identical on every rank.
    """
    from .trainer import Trainer  # imported late: the trainer pulls in the whole training stack
    cfg = Config()
    m, t = cfg.model, cfg.train
    m.maxlen, m.hidden_units, m.num_blocks, m.num_heads, m.time, m.mhc, m.time_span = 16, 16, 1, 2, time_aware, mhc, 16
    t.batch_size, t.warmup_steps, t.lr = 8 * dist.world_size(), 0, 0.01
    data = SequenceTensors(_random_sequences(4 * t.batch_size, 50, t.seed), m.maxlen, device, eval_negatives=10)
    with tempfile.TemporaryDirectory() as run_dir:  # the trainer writes nothing in two steps
        trainer = Trainer(cfg, data, device, Path(run_dir), item_ids=[])
        before = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        order = data.epoch_order(t.seed, 1)
        losses = [trainer.train_step(order[i * t.batch_size:(i + 1) * t.batch_size], 1).item() for i in range(2)]
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    digests = dist.all_gather_object(hashlib.sha256(after.double().cpu().numpy().tobytes()).hexdigest())
    if not all(np.isfinite(losses)):
        return FAIL, f"non-finite loss {losses}"
    if torch.equal(before, after):
        return FAIL, "two steps left the parameters unchanged"
    if len(set(digests)) > 1:
        return FAIL, "parameters differ across ranks after 2 steps"
    amp = str(trainer.amp_dtype or "fp32").removeprefix("torch.")
    return PASS, f"{after.numel():,} parameters, {amp}: 2 steps, identical on {len(digests)} ranks"


def run_checks(device: torch.device, sizes: list[int]) -> list[Check]:
    """Every in-group check on this rank, then merged over the ranks (a collective)."""
    checks = [(f"all_reduce {str(dt).removeprefix('torch.')}", all_reduce_dtype, (dt, device)) for dt in DTYPES]
    checks += [("all_reduce bandwidth", all_reduce_bandwidth, (device, sizes)),
               ("broadcast", broadcast, (device,)), ("barrier", barrier, (device,)),
               ("DDP smoke SASRec", ddp_smoke, (device, False, False)),
               ("DDP smoke TiSASRec+mHC", ddp_smoke, (device, True, True))]
    results, broken = [], False
    for name, fn, args in checks:
        if broken:
            results.append(Check(name, SKIP, "not run: an earlier check raised"))
            continue
        try:
            status, detail = fn(*args)
        except Exception as err:
            # A rank that left a collective early leaves the group out of step: every later
            # collective would only wait for the timeout, so the remaining checks are not run.
            status, detail, broken = FAIL, first_line(err), True
        results.append(Check(name, status, detail))
    try:
        return merge(dist.all_gather_object(results))
    except Exception:  # the group is unusable: report this rank's own view
        return results


def merge(per_rank: list[list[Check]]) -> list[Check]:
    """One Check per name: the worst status over ranks, with that rank's detail."""
    merged = []
    for row in zip(*per_rank):
        rank, worst = max(enumerate(row), key=lambda rc: SEVERITY[rc[1].status])  # first rank among equals
        merged.append(Check(worst.name, worst.status, worst.detail if rank == 0 else f"rank {rank}: {worst.detail}"))
    return merged


def human_bytes(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} B"

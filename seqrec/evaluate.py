"""Sampled-100 and full-ranking evaluation, batched, sharded over ranks.

Each rank scores a contiguous shard of users; metric sums (float64) and user counts
are all-reduced, so the result equals the one-process result. The sampled
candidates are fixed per (eval_seed, user) when the data is built, which keeps the
numbers independent of batch size, training RNG and world size.
"""
from __future__ import annotations

import torch
from torch import nn

from . import distributed as dist
from .config import EvalConfig, metric_names
from .data.tensors import EvalSplit
from .metrics import metric_sums, pessimistic_rank


def _shard(n: int) -> range:
    per_rank = -(-n // dist.world_size())
    start = dist.rank() * per_rank
    return range(start, min(n, start + per_rank))


def eval_batch_size(cfg: EvalConfig, device: torch.device) -> int:
    """--eval_batch_size, or its default for the device: 512 users on a GPU; 64 on CPU, where a
    512-user batch of mHC activations (B·L·n·C floats, ~80 MB at the seed size) is above glibc's
    largest mmap threshold, so every batch maps and page-faults it again (SASRec+mHC sampled
    pass 8.6 → 4.7 s, plain SASRec 3.6 → 2.9 s, one thread; docs/PERFORMANCE.md)."""
    return cfg.eval_batch_size or (512 if device.type == "cuda" else 64)


def _batches(split: EvalSplit, shard: range, batch_size: int):
    """The shard's users in batches of similar history length, each cut to its longest history.

    Inputs are left-padded to maxlen, but most users are shorter (ML-1M: median ≈ 100 of
    200): columns that are padding for the whole batch are dropped, so attention costs
    ∝ the batch's own length². The models read a narrower input as the right end of the
    window, so every score is what the full-width input gives; metric sums do not depend
    on the order in which users are visited.
    """
    lengths = (split.items[shard.start:shard.stop] != 0).sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    cuts = lengths[order[::batch_size]].tolist()  # one host read for the whole pass
    for cut, start in zip(cuts, range(0, len(order), batch_size)):
        batch = split.batch(order[start:start + batch_size] + shard.start)
        batch["items"] = batch["items"][:, -cut:]
        if "times" in batch:
            batch["times"] = batch["times"][:, -cut:]
        yield batch


def _history(split: EvalSplit, users: torch.Tensor, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch row, item id) of every input item of the batch's users (variable-length, gathered
    from the sorted keys user * (num_items + 1) + item)."""
    width = num_items + 1
    lo = torch.searchsorted(split.history, users * width)
    hi = torch.searchsorted(split.history, (users + 1) * width)
    counts = hi - lo
    rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts)
    first = torch.repeat_interleave(lo - (counts.cumsum(0) - counts), counts)
    keys = split.history[torch.arange(rows.numel(), device=users.device) + first]
    return rows, keys - users[rows] * width


def mask_items(scores: torch.Tensor, rows: torch.Tensor, items: torch.Tensor, start: int) -> None:
    """Set scores[row, item - start] to -inf for the (row, item id) pairs whose id falls in the
    chunk of ids [start, start + scores.shape[1])."""
    cols = items - start
    inside = (cols >= 0) & (cols < scores.shape[1])
    scores[rows[inside], cols[inside]] = float("-inf")


def _full_ranks(model: nn.Module, hidden: torch.Tensor, batch: dict, split: EvalSplit, cfg: EvalConfig,
                num_items: int) -> torch.Tensor:
    """Pessimistic rank of each target among all items, excluding padding, the target itself
    and, with mask_history, the user's input items.

    Scores are computed `eval_item_chunk` item ids at a time, so memory is bounded by
    batch x chunk rather than batch x catalogue. With several chunks the targets' scores are
    read in a first pass over the same chunk products that the counting pass recomputes
    (deterministically), so every comparison is between numbers from one and the same
    product, exactly as with a single chunk.
    """
    target = batch["targets"]
    width = num_items + 1
    chunks = [slice(start, min(start + cfg.eval_item_chunk, width)) for start in range(0, width, cfg.eval_item_chunk)]
    # For each chunk, the rows whose target lies in it.
    targets_in = [((target >= c.start) & (target < c.stop)).nonzero()[:, 0] for c in chunks]
    history = _history(split, batch["users"], num_items) if cfg.mask_history else None
    one = model.score_all(hidden).float() if len(chunks) == 1 else None
    if one is not None:
        target_score = one.gather(1, target[:, None])[:, 0]
    else:
        target_score = torch.empty_like(hidden[:, 0])
        for items, rows in zip(chunks, targets_in):
            target_score[rows] = model.score_all(hidden, items).float()[rows, target[rows] - items.start]
    ranks = torch.zeros_like(target)
    for items, rows in zip(chunks, targets_in):
        scores = one if one is not None else model.score_all(hidden, items).float()
        if items.start == 0:
            scores[:, 0] = float("-inf")  # padding
        if history is not None:
            mask_items(scores, *history, items.start)
        scores[rows, target[rows] - items.start] = float("-inf")
        ranks += pessimistic_rank(target_score, scores)
    return ranks


@torch.no_grad()
def evaluate(model: nn.Module, split: EvalSplit, cfg: EvalConfig, num_items: int,
             protocols: tuple[str, ...] = ("sampled", "full")) -> dict[str, float]:
    """Metrics of one split as {'sampled/NDCG@10': ..., 'full/Recall@20': ...}."""
    was_training = model.training
    model.eval()
    shard = _shard(len(split))
    sums: dict[str, torch.Tensor] = {}
    for batch in _batches(split, shard, eval_batch_size(cfg, split.targets.device)):
        hidden = model(batch)[:, -1].float()
        target = batch["targets"]
        parts = []
        if "sampled" in protocols:
            cand = torch.cat([target[:, None], batch["negatives"]], dim=1)
            scores = model.score(hidden[:, None, :], cand).float()
            ranks = pessimistic_rank(scores[:, 0], scores[:, 1:])
            parts.append(metric_sums(ranks, [10], ("HR", "NDCG"), "sampled/"))
        if "full" in protocols:
            ranks = _full_ranks(model, hidden, batch, split, cfg, num_items)
            parts.append(metric_sums(ranks, cfg.topk, prefix="full/"))
        for part in parts:
            for name, value in part.items():
                sums[name] = sums.get(name, 0) + value
    device = split.targets.device
    names = _metric_names(cfg, protocols)
    packed = torch.stack([torch.as_tensor(sums.get(n, 0.0), dtype=torch.float64, device=device) for n in names]
                         + [torch.tensor(float(len(shard)), dtype=torch.float64, device=device)])
    packed = dist.all_reduce_sum(packed).cpu()
    model.train(was_training)
    return {name: (packed[i] / packed[-1]).item() for i, name in enumerate(names)}


def _metric_names(cfg: EvalConfig, protocols: tuple[str, ...]) -> list[str]:
    """A fixed order, so every rank (even one with an empty shard) reduces the same vector."""
    return sorted(name for name in metric_names(cfg) if name.partition("/")[0] in protocols)


def format_metrics(metrics: dict[str, float], keys: tuple[str, ...] = (
        "sampled/HR@10", "sampled/NDCG@10", "full/Recall@10", "full/NDCG@10", "full/Recall@20", "full/MRR@20")) -> str:
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)

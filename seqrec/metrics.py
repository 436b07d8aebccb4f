"""Ranking metrics from the rank of the target (0 = first).

Ranks are pessimistic: every candidate scoring at least as high as the target is
counted above it, so a constant model cannot look good through ties. Metrics are
accumulated as float64 sums and divided once, after summing over batches and ranks.
"""
from __future__ import annotations

import torch


def pessimistic_rank(target_score: torch.Tensor, other_scores: torch.Tensor) -> torch.Tensor:
    """Number of other candidates scoring >= the target, per row."""
    return (other_scores >= target_score[:, None]).sum(dim=1)


def metric_sums(ranks: torch.Tensor, ks: list[int], names: tuple[str, ...] = ("Recall", "NDCG", "MRR"),
                prefix: str = "") -> dict[str, torch.Tensor]:
    """Float64 sums over users of Recall/HR@K (hit), NDCG@K (1/log2(rank+2)) and MRR@K (1/(rank+1))."""
    r = ranks.double()
    out = {}
    for k in ks:
        hit = (r < k).double()
        values = {"Recall": hit, "HR": hit, "NDCG": hit / torch.log2(r + 2), "MRR": hit / (r + 1)}
        for name in names:
            out[f"{prefix}{name}@{k}"] = values[name].sum()
    return out

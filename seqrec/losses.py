"""Training losses behind one interface.

A loss returns (sum of per-position losses, number of valid positions) rather than a
mean, so the trainer can normalise by the count summed over all ranks and gradient
accumulation steps: that makes the averaged gradient equal to the one-process one.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig


class Loss(Protocol):
    num_negatives: int

    def __call__(self, model: nn.Module, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class BCELoss:
    """Binary cross-entropy on the next item against one sampled negative per position (SASRec)."""

    num_negatives = 1

    def __call__(self, model, hidden, batch):
        valid = batch["pos"] != 0
        pos = model.score(hidden, batch["pos"]).float()
        neg = model.score(hidden, batch["neg"]).float()
        per_position = F.softplus(-pos) + F.softplus(neg)  # = BCE(pos, 1) + BCE(neg, 0)
        return (per_position * valid).sum(), valid.sum()


def build_loss(cfg: TrainConfig) -> Loss:
    return {"bce": BCELoss}[cfg.loss]()

"""Most-popular baseline with the model API, so the evaluator scores it like any model.

Printed beside every run: a sequential model that does not beat it has learned nothing.
"""
from __future__ import annotations

import torch
from torch import nn


class Popularity(nn.Module):
    def __init__(self, item_counts: torch.Tensor):
        super().__init__()
        self.register_buffer("counts", item_counts.float())

    def forward(self, batch: dict) -> torch.Tensor:
        return self.counts.new_zeros(*batch["items"].shape, 1)

    def score(self, hidden: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.counts[items]

    def score_all(self, hidden: torch.Tensor, items: slice = slice(None)) -> torch.Tensor:
        return self.counts[items].repeat(hidden.shape[0], 1)

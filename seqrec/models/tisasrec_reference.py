"""REFERENCE ONLY (tests and benchmarks): TiSASRec attention computed literally.

Materialises the [B, L, L, d] interval embeddings rK[r_ij], rV[r_ij] and the per-pair
key and value sums, as the public ports do, with the weights of an efficient
``TimeIntervalAttention`` so the two can be compared number for number. It applies no
dropout inside attention (compare with dropout 0), and costs O(B L^2 d) memory: several
GB at B=128, L=200. Never use it to train.
"""
from __future__ import annotations

import math

import torch

from .attention import SequenceContext
from .tisasrec import TimeIntervalAttention


def reference_attention(module: TimeIntervalAttention, x: torch.Tensor, context: SequenceContext) -> torch.Tensor:
    """The module's forward, written as the paper's formula with explicit [B, L, L, d] tensors."""
    b, length, dim = x.shape
    heads, dh = module.num_heads, dim // module.num_heads
    q, k, v = module.qkv(x).chunk(3, dim=-1)
    mask, r = context.mask, context.intervals
    first = module.pos_k.num_embeddings - length  # the window's right end, as the efficient form
    keys = k[:, None, :, :] + module.pos_k.weight[first:] + module.interval_k.weight[r]  # [B, L, L, d]: (i, j)
    values = v[:, None, :, :] + module.pos_v.weight[first:] + module.interval_v.weight[r]
    per_head = lambda t: t.view(b, length, length, heads, dh)  # noqa: E731
    scores = torch.einsum("bihc,bijhc->bhij", q.view(b, length, heads, dh), per_head(keys)) / math.sqrt(dh)
    a = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1) * mask
    z = torch.einsum("bhij,bijhc->bihc", a, per_head(values)).reshape(b, length, dim)
    return module.dropout(module.out(z))

"""TiSASRec (Li, Wang & McAuley, WSDM 2020, arXiv 2004.11780): time-interval-aware self-attention.

    e_ij = q_i . (k_j + pK_j + rK[r_ij]) / sqrt(d_h),   a = causal softmax(e),
    z_i  = sum_j a_ij (v_j + pV_j + rV[r_ij])

pK, pV are absolute position tables used only inside attention (nothing is added to the
input embedding); rK, rV are interval tables of time_span + 1 rows; r_ij comes from
``intervals.time_intervals``. The reference ports materialise rK[r], rV[r] as [B, L, L, d]
tensors per layer. Because r takes only time_span + 1 = S + 1 values, the same numbers
come from [B, h, L, S + 1] tensors:
    q_i . rK[r_ij]            = (q_i rK^T)[r_ij]                 a gather,
    sum_j a_ij rV[r_ij]       = (sum_j a_ij onehot(r_ij)) rV     a scatter-add, then a matmul,
so memory is O(B h L (L + S)) instead of O(B L^2 d). Key positions are counted so that the
last column is always position maxlen (as SASRec.embed counts them), so a width-W input
uses the last W rows of pK, pV (see `table`), added to k, v before the matmuls; padded keys
are masked, so the rows they would use do not matter.
Measured on the 2-core CPU (B=128, d=50, h=2, L=200), none of these was faster than this
form: one matmul of q with [k + pK; rK] or of [a | sum a onehot] with [v + pV; rV] (the
concatenations copy), a flat take/index_add instead of gather/scatter_add, masking through
an extra "hidden" bucket instead of masked_fill_; a one-hot matmul would need B L^2 (S + 1)
floats. Memory traffic over [B, h, L, L] and [B, h, L, S + 1] tensors, not FLOPs, dominates.

Dropout: the reference ports drop elements of the [B, L, L, d] interval embeddings (and of
the position embeddings and attention weights); that tensor never exists here. Elements
of the four tables are dropped instead (one mask per table and step, shared by every
position that reads a row, as DropConnect on the table), with SASRec's output dropout;
attention weights are dropped only with ``attention_dropout`` (as in attention.py; here
it costs one more [B, h, L, L] pass rather than a fused kernel). Table dropout costs nothing
measurable (B=128, h=2, L=50 and 200: within the 2% run-to-run noise of a layer's
forward+backward). A 40-epoch ml-1m-half run (L=50, personal, span 256) with and without
it ended level (test sampled NDCG@10 0.524 vs 0.531, one seed); it is kept because the
paper's setting regularises these embeddings and long runs are where that matters.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from .attention import CausalSelfAttention, SequenceContext, attention_mask
from .backbone import Backbone
from .dropout import Dropout
from .intervals import time_intervals


class TimeIntervalAttention(CausalSelfAttention):
    """CausalSelfAttention whose keys and values also carry position and interval embeddings.

    Reads the context's mask ([B, 1, L, L] bool, True = visible) and intervals ([B, L, L]
    int64 in 0..time_span). Hidden scores are set to the dtype's lowest finite value, not
    -inf, so a query with no visible key stays finite; its output is then zeroed.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float, attention_dropout: float, maxlen: int,
                 time_span: int):
        super().__init__(dim, num_heads, dropout, attention_dropout)
        self.weight_dropout = Dropout(attention_dropout)
        self.pos_k = nn.Embedding(maxlen, dim)
        self.pos_v = nn.Embedding(maxlen, dim)
        self.interval_k = nn.Embedding(time_span + 1, dim)
        self.interval_v = nn.Embedding(time_span + 1, dim)
        self.table_dropout = Dropout(dropout)

    def table(self, emb: nn.Embedding, rows: int) -> torch.Tensor:
        """The last ``rows`` rows of a table, dropped out and split into heads: [h, rows, d_h].

        Last, so that an input narrower than maxlen (the right end of the window) keeps the
        positions it has in full width; interval tables are always taken whole.
        """
        w = self.table_dropout(emb.weight[emb.num_embeddings - rows:])
        return w.view(rows, self.num_heads, -1).transpose(0, 1)

    def forward(self, x: torch.Tensor, context: SequenceContext) -> torch.Tensor:
        length, buckets = x.shape[1], self.interval_k.num_embeddings
        mask = context.mask
        r = context.intervals[:, None].expand(-1, self.num_heads, -1, -1)
        q, k, v = (self.split_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        q = q * (1.0 / math.sqrt(q.shape[-1]))
        q_rk = q @ self.table(self.interval_k, buckets).transpose(-1, -2)  # [B, h, L, S + 1]
        scores = (q @ (k + self.table(self.pos_k, length)).transpose(-1, -2)).add_(q_rk.gather(-1, r))
        a = self.weight_dropout(scores.masked_fill_(~mask, torch.finfo(scores.dtype).min).softmax(-1))
        per_bucket = a.new_zeros(*a.shape[:-1], buckets).scatter_add_(-1, r, a)  # sum_j a_ij onehot(r_ij)
        z = a @ (v + self.table(self.pos_v, length)) + per_bucket @ self.table(self.interval_v, buckets)
        z = z * mask.any(-1, keepdim=True)
        return self.dropout(self.out(self.merge_heads(z)))


class TiSASRec(Backbone):
    """The backbone with time-interval-aware attention; batches must carry "times" [B, L].

    Positions enter every layer's attention (pK, pV), not the input, and the rows stay
    left-padded (the interval and position tables are indexed by column), so attention
    reads an explicit mask where SASRec rotates its rows.
    """

    def __init__(self, cfg: ModelConfig, num_items: int):
        super().__init__(cfg, num_items, lambda: TimeIntervalAttention(
            cfg.hidden_units, cfg.num_heads, cfg.dropout_rate, cfg.attention_dropout, cfg.maxlen, cfg.time_span))
        self.time_unit, self.time_span = cfg.time_unit, cfg.time_span
        self.reset_parameters()

    def context(self, batch: dict) -> SequenceContext:
        """The causal key-padding mask and the interval buckets, computed once and shared by all layers."""
        items = batch["items"]
        return SequenceContext(mask=attention_mask(items),
                               intervals=time_intervals(batch["times"], items != 0, self.time_unit, self.time_span))

    def forward(self, batch: dict) -> torch.Tensor:
        """Hidden states of the left-padded rows as they are."""
        return self.encode(self.embed(batch["items"]), self.context(batch))

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        """`embed_items` without positions: they enter through pK, pV."""
        return self.embed_items(items)

    def real_slots(self, items: torch.Tensor) -> torch.Tensor:
        """The layers see the rows unrotated: their items are where the input's are."""
        return items != 0

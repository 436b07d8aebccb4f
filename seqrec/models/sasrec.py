"""SASRec backbone (Kang & McAuley, 2018) with post-LN, pre-LN or LiGR blocks (blocks.py).

The model API is fixed for every variant: ``forward(batch) -> hidden [B, L, d]``,
``score(hidden, items)`` for given candidates and ``score_all(hidden[, id range])`` for the
whole catalogue. Models never move data or hold a device; the trainer does.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from .attention import CausalSelfAttention
from .blocks import Residual, feed_forward
from .dropout import Dropout


def column_indices(items: torch.Tensor) -> torch.Tensor:
    """0..W-1 for items [B, W], as int64 on items' device: a cumulative sum of ``new_ones``, not
    ``torch.arange(W, device=items.device)``, whose device a traced or exported graph holds as a
    constant (tests/test_export.py)."""
    return items.new_ones(items.shape[1], dtype=torch.long).cumsum(0).sub_(1)


class PlainStream(nn.Module):
    """The ordinary single residual stream: sub-layers wrapped in Residual, no widening.

    The residual "stream" is a strategy object so the mHC variant can wrap sub-layers in
    its own residual (the first of which widens the stream to n copies) and merge the
    copies before the final norm (collapse) without the backbone knowing.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dim, self.block = cfg.hidden_units, cfg.block

    def wrap(self, sublayer: nn.Module) -> nn.Module:
        return Residual(sublayer, self.dim, self.block)

    def collapse(self, x: torch.Tensor) -> torch.Tensor:
        return x


def make_stream(cfg: ModelConfig) -> nn.Module:
    if cfg.mhc:
        from .mhc import HyperStream
        return HyperStream(cfg)
    return PlainStream(cfg)


class SASRec(nn.Module):
    def __init__(self, cfg: ModelConfig, num_items: int):
        super().__init__()
        d = cfg.hidden_units
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.maxlen + 1, d, padding_idx=0)
        self.emb_dropout = Dropout(cfg.dropout_rate)
        self.stream = make_stream(cfg)
        self.layers = nn.ModuleList()
        for _ in range(cfg.num_blocks):
            self.layers.append(self.stream.wrap(self.make_attention(cfg)))
            self.layers.append(self.stream.wrap(feed_forward(cfg)))
        self.final_norm = nn.LayerNorm(d, eps=1e-8)
        self.reset_parameters()

    def make_attention(self, cfg: ModelConfig) -> nn.Module:
        return CausalSelfAttention(cfg.hidden_units, cfg.num_heads, cfg.dropout_rate, cfg.attention_dropout)

    def reset_parameters(self) -> None:
        """Xavier-uniform Linear and Embedding weights, as in the reference port; padding rows stay zero.

        Other parameters (LayerNorm, the LiGR gates, the mHC coefficients) keep their own initialisation.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.xavier_uniform_(module.weight)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def embed(self, items: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Item embedding x sqrt(d) plus positions counted so the last slot is always maxlen.

        Inputs narrower than maxlen are read as the right end of the left-padded window
        (evaluation drops all-padding columns), so they get the same positions as in full
        width. `columns` [B, W] gives each slot's column in the left-padded input when the
        items have been reordered (see `forward`); by default slot j is column j.
        """
        valid = items != 0
        maxlen = self.pos_emb.num_embeddings - 1
        first = maxlen - items.shape[1] + 1
        columns = column_indices(items) if columns is None else columns
        x = self.item_emb(items) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb((columns + first) * valid)
        return self.emb_dropout(x) * valid[..., None]

    def encode(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Embedded inputs [B, L, d] -> hidden states [B, L, d] through the blocks and final norm."""
        for layer in self.layers:
            x = layer(x, ctx)
        return self.final_norm(self.stream.collapse(x))

    def forward(self, batch: dict) -> torch.Tensor:
        """Hidden states aligned with batch["items"] (left-padded).

        Each row is rotated so that its items come first and its padding last: then plain
        causal attention never lets a real query see padding, and SDPA's fused kernel runs
        with `is_causal` (it skips the blocks above the diagonal) instead of reading a
        [B, L, L] mask. Positions follow the items' original columns and every other
        operation is per token, so the outputs at real positions are exactly those of the
        left-padded, key-masked computation (tests/test_model.py); padded positions, unused
        by every loss and metric, differ.
        """
        items = batch["items"]
        width = items.shape[1]
        slots = column_indices(items)
        padding = (items == 0).sum(1, keepdim=True)
        columns = (slots + padding) % width  # slot -> column: the items, then the padding
        hidden = self.encode(self.embed(items.gather(1, columns), columns), {"mask": None})
        back = (slots - padding) % width  # column -> slot
        return hidden.gather(1, back[..., None].expand(-1, -1, hidden.shape[-1]))

    def real_slots(self, items: torch.Tensor) -> torch.Tensor:
        """Which slots of the layers' [B, W] inputs hold items (the rest is padding): the
        first ones of each row, which `forward` rotated to the front."""
        return column_indices(items) < (items != 0).sum(1, keepdim=True)

    def score(self, hidden: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Dot products of hidden [..., d] with items [...] (broadcasting; pass hidden[..., None, :]
        to score k candidates per position)."""
        return (self.item_emb(items) * hidden).sum(-1)

    def score_all(self, hidden: torch.Tensor, items: slice = slice(None)) -> torch.Tensor:
        """Scores of every item id (column 0 is padding) -> [..., num_items + 1], or of the ids in
        the range `items` (evaluation scores large catalogues in chunks)."""
        return hidden @ self.item_emb.weight[items].t()

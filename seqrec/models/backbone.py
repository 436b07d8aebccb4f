"""What SASRec and TiSASRec share: the item table, the block stack on a residual stream,
the final norm and the scoring API.

The two variants are siblings on this backbone, each composing the attention it needs and
owning what differs between them: where positions enter (SASRec adds a table to the input,
TiSASRec's attention holds its own), how rows are laid out for the layers (SASRec rotates
them so that padding comes last), and the `SequenceContext` its attention reads. The
model API is fixed for every variant: ``forward(batch) -> hidden [B, L, d]``,
``score(hidden, items)`` for given candidates and ``score_all(hidden[, id range])`` for the
whole catalogue (``item_vectors`` are what both take dot products with), and
``embedding_penalty()``, what --l2_emb multiplies. Models never move data or hold a device;
the trainer does.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterable

import torch
from torch import nn

from ..config import ModelConfig
from .attention import SequenceContext
from .blocks import Residual, feed_forward
from .dropout import Dropout


class PlainStream(nn.Module):
    """The ordinary single residual stream: sub-layers wrapped in Residual, no widening.

    The residual "stream" is a strategy object so the mHC variant (mhc.HyperStream) can
    wrap the sub-layers in its own residual, widen the stream to n copies in the first of
    them and merge the copies before the final norm (collapse), without the backbone knowing.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dim, self.block = cfg.hidden_units, cfg.block

    def stack(self, sublayers: Iterable[nn.Module]) -> nn.ModuleList:
        return nn.ModuleList(Residual(sublayer, self.dim, self.block) for sublayer in sublayers)

    def collapse(self, x: torch.Tensor) -> torch.Tensor:
        return x


def make_stream(cfg: ModelConfig) -> nn.Module:
    if cfg.mhc:
        from .mhc import HyperStream
        return HyperStream(cfg)
    return PlainStream(cfg)


class Backbone(nn.Module):
    """Item embedding, `num_blocks` × [attention(), FFN] on the residual stream, final LayerNorm.

    `attention` makes one block's attention sub-layer. A variant adds its own tables, then
    calls `reset_parameters` (so they get the same initialisation), and defines `forward`,
    `embed` and `real_slots`.
    """

    def __init__(self, cfg: ModelConfig, num_items: int, attention: Callable[[], nn.Module]):
        super().__init__()
        d = cfg.hidden_units
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.emb_dropout = Dropout(cfg.dropout_rate)
        self.stream = make_stream(cfg)
        ffn = functools.partial(feed_forward, cfg)
        # a generator: each sub-layer is wrapped as soon as it is made
        self.layers = self.stream.stack(make() for _ in range(cfg.num_blocks) for make in (attention, ffn))
        self.final_norm = nn.LayerNorm(d, eps=1e-8)

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

    def embed_items(self, items: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Item embedding x sqrt(d), plus `positions` [B, W, d] where a variant adds them to the
        input, then dropout; padding slots are zeroed."""
        x = self.item_emb(items) * math.sqrt(self.item_emb.embedding_dim)
        if positions is not None:
            x = x + positions
        return self.emb_dropout(x) * (items != 0)[..., None]

    def encode(self, x: torch.Tensor, context: SequenceContext) -> torch.Tensor:
        """Embedded inputs [B, L, d] -> hidden states [B, L, d] through the blocks and final norm."""
        for layer in self.layers:
            x = layer(x, context)
        return self.final_norm(self.stream.collapse(x))

    def item_vectors(self, items: slice | torch.Tensor | None = None) -> torch.Tensor:
        """The vectors every score is a dot product with: of the ids `items` (any shape), of the
        id range `items`, or (None) the whole table, row 0 being padding.

        `score` and `score_all` are defined through it, and a loss that differentiates the
        scores by hand (the chunked full cross-entropy) reads it instead of a model attribute.
        Ids go through the embedding, whose gradient skips the padding row; a range is a view;
        the whole table is the parameter itself, as a full-range view would add a copy of the
        table to its gradient.
        """
        if items is None:
            return self.item_emb.weight
        return self.item_emb.weight[items] if isinstance(items, slice) else self.item_emb(items)

    def score(self, hidden: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Dot products of hidden [..., d] with items [...] (broadcasting; pass hidden[..., None, :]
        to score k candidates per position)."""
        return (self.item_vectors(items) * hidden).sum(-1)

    def score_all(self, hidden: torch.Tensor, items: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """Scores of every item id (column 0 is padding) -> [..., num_items + 1], or of the ids in
        the range `items` (evaluation scores large catalogues in chunks), or of a set of ids [k]
        that every row shares (shared negatives): one matmul in each case."""
        return hidden @ self.item_vectors(items).t()

    def embedding_penalty(self) -> torch.Tensor:
        """The squared L2 norm of the item table: what --l2_emb multiplies.

        The model says which of its tables are penalised, so the trainer names none. Here it is
        the item table only (the TiSASRec code also penalises its position and interval tables;
        see the tisasrec preset).
        """
        return self.item_emb.weight.pow(2).sum()

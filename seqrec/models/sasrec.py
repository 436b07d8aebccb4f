"""SASRec (Kang & McAuley, 2018): learned absolute positions added to the input and causal
self-attention, on the shared backbone (backbone.py) with post-LN, pre-LN or LiGR blocks
(blocks.py)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import CausalSelfAttention, SequenceContext
from .backbone import Backbone


def column_indices(items: torch.Tensor) -> torch.Tensor:
    """0..W-1 for items [B, W], as int64 on items' device: a cumulative sum of ``new_ones``, not
    ``torch.arange(W, device=items.device)``, whose device a traced or exported graph holds as a
    constant (tests/test_export.py)."""
    return items.new_ones(items.shape[1], dtype=torch.long).cumsum(0).sub_(1)


class SASRec(Backbone):
    """The backbone with positions added to the input and plain causal attention on rows
    rotated so that padding comes last (`forward`)."""

    def __init__(self, cfg: ModelConfig, num_items: int):
        super().__init__(cfg, num_items, lambda: CausalSelfAttention(cfg.hidden_units, cfg.num_heads,
                                                                     cfg.dropout_rate, cfg.attention_dropout))
        # positions 1..maxlen; row 0, the reference port's padding row, is kept (zero, never
        # read) so that checkpoints keep their shapes
        self.pos_emb = nn.Embedding(cfg.maxlen + 1, cfg.hidden_units, padding_idx=0)
        self.reset_parameters()

    def embed(self, items: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Item embedding x sqrt(d) plus positions counted so the last slot is always maxlen.

        Inputs narrower than maxlen are read as the right end of the left-padded window
        (evaluation drops all-padding columns), so they get the same positions as in full
        width. `columns` [B, W] gives each slot's column in the left-padded input when the
        items have been reordered (see `forward`); by default slot j is column j. Padding
        slots read a position too: `embed_items` zeroes them afterwards.
        """
        maxlen = self.pos_emb.num_embeddings - 1
        first = maxlen - items.shape[1] + 1
        columns = column_indices(items) if columns is None else columns
        return self.embed_items(items, self.pos_emb(columns + first))

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
        hidden = self.encode(self.embed(items.gather(1, columns), columns), SequenceContext())
        back = (slots - padding) % width  # column -> slot
        return hidden.gather(1, back[..., None].expand(-1, -1, hidden.shape[-1]))

    def real_slots(self, items: torch.Tensor) -> torch.Tensor:
        """Which slots of the layers' [B, W] inputs hold items (the rest is padding): the
        first ones of each row, which `forward` rotated to the front."""
        return column_indices(items) < (items != 0).sum(1, keepdim=True)

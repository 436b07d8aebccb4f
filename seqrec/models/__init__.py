"""Model construction from the config: one place decides which variant is built."""
from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .popularity import Popularity
from .sasrec import SASRec
from .tisasrec import TiSASRec


def build_model(cfg: ModelConfig, num_items: int) -> nn.Module:
    """SASRec or TiSASRec (--time); either with the mHC residual stream (--mhc, see make_stream)."""
    return (TiSASRec if cfg.time else SASRec)(cfg, num_items)


__all__ = ["build_model", "Popularity", "SASRec", "TiSASRec"]

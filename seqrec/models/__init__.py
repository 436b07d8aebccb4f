"""Model construction from the config: one place decides which variant is built."""
from __future__ import annotations

from torch import nn

from ..config import ConfigError, ModelConfig
from .popularity import Popularity
from .sasrec import SASRec


def build_model(cfg: ModelConfig, num_items: int) -> nn.Module:
    if cfg.time:
        raise ConfigError("TiSASRec (--time) is not implemented yet; run with --no_time")
    if cfg.mhc:
        raise ConfigError("mHC (--mhc) is not implemented yet; run with --no_mhc")
    return SASRec(cfg, num_items)


__all__ = ["build_model", "Popularity", "SASRec"]

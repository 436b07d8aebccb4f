"""Data: read interaction files (or take DataFrames and arrays), build chronological sequences, split, batch and sample."""
from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from . import demo
from .frames import interactions_from
from .readers import DataError, Interactions, read_interactions
from .sequences import Sequences, build_sequences
from .tensors import EvalSplit, SequenceTensors


def checkout_data() -> Path | None:
    """data/ of the source checkout this package runs from, or None for an installed package
    (site-packages holds no pyproject.toml next to seqrec/)."""
    root = Path(__file__).resolve().parents[2]
    return root / "data" if (root / "pyproject.toml").is_file() and (root / "data").is_dir() else None


def resolve_path(cfg: DataConfig) -> Path:
    """--data_path as given; --dataset NAME -> data/NAME.txt in the working directory or the
    checkout; 'demo' otherwise -> the packaged demo data (generated and cached on first use)."""
    if cfg.data_path:
        return Path(cfg.data_path)
    if not cfg.dataset:
        raise DataError("no data: give --dataset NAME or --data_path FILE")
    for base in (Path("data"), checkout_data()):
        if base is not None and (base / f"{cfg.dataset}.txt").exists():
            return base / f"{cfg.dataset}.txt"
    if cfg.dataset == "demo":
        try:
            return demo.demo_path()
        except OSError as err:
            raise DataError(f"demo data: {err}") from None
    hint = " (run data/convert_ml1m.py first)" if cfg.dataset == "ml-1m" else ""
    raise DataError(f"data/{cfg.dataset}.txt: dataset '{cfg.dataset}' not found{hint}")


def load_sequences(cfg: DataConfig) -> Sequences:
    path = resolve_path(cfg)
    interactions = read_interactions(str(path), user_col=cfg.user_col, item_col=cfg.item_col, time_col=cfg.time_col)
    return build_sequences(interactions, cfg.min_user_count, cfg.min_item_count)


__all__ = ["DataError", "EvalSplit", "Interactions", "Sequences", "SequenceTensors", "build_sequences",
           "interactions_from", "load_sequences", "read_interactions", "resolve_path"]

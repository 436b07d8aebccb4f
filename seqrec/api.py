"""The Python API: train on a data frame or a file and get a Recommender back.

    import seqrec
    rec = seqrec.fit(df, user_col="userId", item_col="movieId", time_col="timestamp",
                     train_dir="runs/ml", num_epochs=50, mhc=True)
    rec = seqrec.load("runs/ml")                 # a run directory or a checkpoint file
    ids, scores = rec.recommend(["1", "7"], k=10)

Options are the `seqrec train` flags by name (``num_epochs=50``, ``mhc=False``,
``loss="gbce"``), checked and validated exactly as on the command line; precedence is
defaults < ``preset`` < ``config`` (a YAML file) < options. The run is an ordinary run
directory: ``seqrec recommend``, ``seqrec export`` and ``--resume`` work on it as on one the
CLI trained.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .callbacks import Callback
from .config import Config, compose, validate
from .serve import Recommender, sequences_of

FRAME_RUN_DIR = "runs/fit"  # where a run on in-memory data goes when no train_dir is given


def fit(data: Any = None, *, user_col: str | None = None, item_col: str | None = None,
        time_col: str | None = None, preset: str | None = None, config: str | os.PathLike | None = None,
        callbacks: Sequence[Callback] = (), **options: Any) -> Recommender:
    """Train a model and return it as a Recommender (the best validation checkpoint).

    `data` is a pandas or polars DataFrame, a pyarrow Table, a path to a CSV / text /
    ratings.dat / parquet file, or arrays ``(users, items[, timestamps])`` or a dict of
    columns; columns are found by name (``user_col`` & co. override). Without data the run
    uses ``dataset=``/``data_path=`` from the options or the config, else the demo data.
    `callbacks` see every metrics row (seqrec.callbacks.Callback).
    """
    from .cli import run, run_dir_of
    cfg = build_config(preset, config, {"user_col": user_col, "item_col": item_col, "time_col": time_col,
                                        **options}, in_memory=data is not None and not _is_path(data))
    given = None
    if _is_path(data):
        cfg.data.data_path, cfg.data.dataset = os.fspath(data), None
    elif data is not None:
        given = sequences_of(data, cfg.data)
    run(cfg, list(callbacks), data=given)
    return load(run_dir_of(cfg), cfg.train.device or "cpu")


def load(path: str | os.PathLike, device: torch.device | str = "cpu") -> Recommender:
    """The Recommender of a run directory (its best.pt, with the run's known users) or of a
    checkpoint file."""
    return Recommender.from_checkpoint(path, device)


def build_config(preset: str | None, config: str | os.PathLike | None, options: dict,
                 in_memory: bool = False) -> Config:
    """The config `seqrec train` would resolve from the same preset, file and flags (see
    `config.compose`), validated; in-memory data never falls back to the demo and runs in
    FRAME_RUN_DIR unless a train_dir is given."""
    options = {name: value for name, value in options.items() if value is not None}
    cfg = compose(preset, config, options, "seqrec.fit", demo=not in_memory)
    if in_memory and cfg.train.train_dir is None:
        cfg.train.train_dir = FRAME_RUN_DIR
    return validate(cfg)


def _is_path(data: Any) -> bool:
    return isinstance(data, (str, Path, os.PathLike))

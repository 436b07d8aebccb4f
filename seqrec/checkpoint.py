"""Atomic checkpoints that load with ``weights_only=True``.

A checkpoint is written to a temporary file in the same directory, flushed to disk
and renamed over the old one, so a crash leaves either the previous or the new file,
never a torn one. Everything inside is a tensor or a plain Python value (the config
as a dict, RNG states as tensors), which is what the safe unpickler accepts.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1
LATEST = "latest.pt"
BEST = "best.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line."""


def save(state: dict, path: str | Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as err:  # torch raises many types for foreign or damaged files
        raise CheckpointError(f"{path}: not a readable seqrec checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format_version') if isinstance(state, dict) else '?'}"
                              f" is not the supported version {FORMAT_VERSION}")
    return state


def rng_state() -> dict:
    """Torch RNG states (the library draws nothing from numpy's or Python's global RNGs)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

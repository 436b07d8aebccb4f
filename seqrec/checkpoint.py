"""Atomic checkpoints that load with ``weights_only=True``.

A checkpoint is written to a temporary file in the same directory, flushed to disk
and renamed over the old one, so a crash leaves either the previous or the new file,
never a torn one. Everything inside is a tensor or a plain Python value (the config
as a dict, RNG states as tensors), which is what the safe unpickler accepts.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1
LATEST = "latest.pt"
BEST = "best.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line."""


def _write_atomic(path: str | Path, write) -> None:
    """Write through `write(file)` into a temporary file beside `path`, flush it to disk and
    rename it over `path`: readers see the old file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:  # a failed write() names no file
            err.filename = str(path)
        raise


def save(state: dict, path: str | Path) -> None:
    """Serialised in memory first: torch.save reports a failed write (disk full) as a RuntimeError
    without the errno, while the plain write of the bytes raises the OSError that names it."""
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    _write_atomic(path, lambda f: f.write(buffer.getbuffer()))


def write_bytes_atomic(path: str | Path, data: bytes | memoryview) -> None:
    """A run file (config, results, rewritten metrics, the users' sequences) written like a checkpoint."""
    _write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def resolve(path: str | Path) -> Path:
    """What a `--checkpoint` names: a file as given, or a run directory's best.pt (its
    latest.pt when no validation has written a best one yet)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in (BEST, LATEST):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: run directory holds no {BEST} or {LATEST}")


def load(path: str | Path) -> dict:
    """A checkpoint's state (`path` a file or a run directory, see `resolve`), always on the CPU.

    RNG states must stay CPU ByteTensors (``torch.set_rng_state`` takes nothing else), and
    weights and optimizer state move to their device as they are copied into the model and
    optimizer, so a device map here would only cost a second copy.
    """
    path = resolve(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as err:  # torch raises many types for foreign or damaged files
        raise CheckpointError(f"{path}: not a readable seqrec checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format_version') if isinstance(state, dict) else '?'}"
                              f" is not the supported version {FORMAT_VERSION}")
    return state


def rng_state(device: torch.device) -> dict:
    """This process's torch RNG states: the CPU generator's and, on CUDA, its own device's.

    Only its own device: a rank's dropout draws come from the GPU it trains on, and a
    machine that resumes the run may have fewer GPUs than the one that saved it. The
    library draws nothing from numpy's or Python's global RNGs.
    """
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore `rng_state(device)`'s output. Older checkpoints held every visible GPU's state
    (a list); the entry of this device is taken from those."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda.cpu(), device)

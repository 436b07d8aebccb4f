"""Export of the scoring model to TorchScript, ONNX or torch.export: ``seqrec export --checkpoint CKPT --out FILE``.

The exported model maps a left-padded [B, maxlen] int64 tensor of item indices (and, for
TiSASRec, a [B, maxlen] int64 tensor of unix timestamps, 0 at padding) to the scores
[B, num_items + 1] of every item as the next one after the last position, exactly
``model.score_all(model(batch)[:, -1])``; column 0 is the padding id. The batch size is
dynamic, the sequence length is fixed at maxlen. A JSON sidecar (``FILE.json``) holds the
item-id mapping (index i is ``item_ids[i - 1]``), maxlen and the input names, so the file
can be served by plain torch or onnxruntime without seqrec or the checkpoint.

TorchScript comes from ``torch.jit.trace`` (scripting would need every model file written in
the TorchScript subset); tracing records the ops of one example batch, so each export is
checked against the eager model on a second batch of another size, with padding, and refused
if they differ (torch 2.13 marks jit.trace/jit.load deprecated, in favour of torch.export,
but TorchScript is still what libtorch and most servers load). ONNX (``pip install -e
'.[onnx]'``) uses torch's dynamo exporter; it has no translation for ``aten.cummin``
(TiSASRec's ``personal`` time unit), so one is given here. ``pt2`` is a ``torch.export``
program (``torch.export.save``; load with ``torch.export.load(FILE).module()``), of the same
ScoringModel with the same dynamic batch dimension.

TorchScript and pt2 graphs hold no device: the models build every tensor from their inputs
(no ``device=x.device``, which a trace or an export records as a constant), and the device
torch.export writes by itself, in the metadata check before each dtype conversion, is dropped
from the program (`exported_program`); tests/test_export.py checks every variant's graphs (an
mHC program still holds its torch.autocast's device type, from mhc.py). A file exported on one
device runs on another: ``load_exported(FILE, fmt, device)`` puts its weights there.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import CheckpointError
from .serve import Recommender

FORMATS = ("torchscript", "onnx", "pt2")
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


class ExportError(RuntimeError):
    """An export that could not be made or does not reproduce the eager scores; one line."""


class ScoringModel(nn.Module):
    """items [B, L] (and times [B, L]) -> scores [B, num_items + 1] after the last position."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, items: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        batch = {"items": items} if times is None else {"items": items, "times": times}
        return self.model.score_all(self.model(batch)[:, -1])


def sidecar_path(path: str | Path) -> Path:
    return Path(f"{path}.json")


def example_inputs(batch_size: int, maxlen: int, num_items: int, uses_time: bool,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Left-padded random histories of lengths 1..maxlen (the first row full) and ascending timestamps."""
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(1, num_items + 1, (batch_size, maxlen), generator=gen)
    lengths = torch.randint(1, maxlen + 1, (batch_size,), generator=gen)
    lengths[0] = maxlen
    items[torch.arange(maxlen)[None, :] < (maxlen - lengths)[:, None]] = 0
    if not uses_time:
        return (items,)
    gaps = torch.randint(0, 3 * 86400, (batch_size, maxlen), generator=gen)
    times = torch.where(items != 0, 1_600_000_000 + gaps.cumsum(1), 0)
    return items, times


def export(checkpoint: str | Path, out: str | Path, fmt: str = "torchscript") -> Path:
    """Write the scoring model of a checkpoint to ``out`` and its sidecar; returns the sidecar's path."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    rec = Recommender.from_checkpoint(str(checkpoint))
    scorer = ScoringModel(rec.model).eval()
    names = ["items", "times"] if rec.uses_time else ["items"]
    num_items = len(rec.item_ids)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_writable(out)
    with torch.no_grad():
        {"torchscript": _to_torchscript, "onnx": _to_onnx, "pt2": _to_pt2}[fmt](
            scorer, example_inputs(2, rec.maxlen, num_items, rec.uses_time), names, out)
        probe = example_inputs(5, rec.maxlen, num_items, rec.uses_time, seed=1)
        try:
            torch.testing.assert_close(load_exported(out, fmt)(*probe), scorer(*probe), **TOLERANCE)
        except AssertionError as err:
            out.unlink()  # a file whose scores are wrong is not kept
            raise ExportError(f"{out}: exported scores differ from the model's: {str(err).splitlines()[0]}") from None
    sidecar = sidecar_path(out)
    sidecar.write_text(json.dumps({
        "format": fmt, "inputs": names, "maxlen": rec.maxlen, "num_items": num_items,
        "output": "scores [B, num_items + 1] of the next item; column 0 is padding",
        "item_ids": rec.item_ids}) + "\n")
    return sidecar


def _check_writable(out: Path) -> None:
    """Refuse a target that cannot be written with an OSError naming it, before the export:
    torch's C++ writers report one as a RuntimeError ("[enforce fail at inline_container.cc]")."""
    if out.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(out))
    if not os.access(out if out.exists() else out.parent, os.W_OK):  # also EROFS, for root too
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out))


def load_exported(path: str | Path, fmt: str = "torchscript",
                  device: torch.device | str | None = None) -> Callable[..., torch.Tensor]:
    """The exported model as a function of (items[, times]) tensors returning a scores tensor;
    its weights on ``device`` (default: where they were exported) for torchscript and pt2."""
    if fmt == "torchscript":
        return torch.jit.load(str(path), map_location=device)
    if fmt == "pt2":
        program = torch.export.load(str(path))
        if device is not None:
            from torch.export.passes import move_to_device_pass
            program = move_to_device_pass(program, device)
        return program.module()
    if device is not None and torch.device(device).type != "cpu":
        raise ExportError("onnx files are run by onnxruntime's CPU provider here")
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda *inputs: torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0])


def _to_torchscript(scorer: nn.Module, inputs: tuple, names: list[str], out: Path) -> None:
    # Tracer warnings name shapes and Python numbers that are constants of the model
    # (head size, mHC's three gates); the check against a second batch size in export()
    # is what guards against a recorded shape.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=DeprecationWarning)
        traced = torch.jit.trace(scorer, inputs, check_trace=False)
    traced.save(str(out))


def exported_program(scorer: nn.Module, inputs: tuple, names: list[str]) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the scoring model, batch dimension dynamic, holding no device.

    Before each dtype conversion (``.to(dtype)``, ``.long()``, ...) torch.export inserts
    ``aten._assert_tensor_metadata`` with the input's dtype, layout and device; the device
    would make the program fail on any other one, so it is dropped (dtype and layout are
    still checked). ``torch.export.passes.move_to_device_pass`` would rewrite it at load
    instead, but a program without it also runs where that pass is not applied.
    """
    batch = torch.export.Dim("batch")
    program = torch.export.export(scorer, inputs, dynamic_shapes={name: {0: batch} for name in names})
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                if node.target is torch.ops.aten._assert_tensor_metadata.default and "device" in node.kwargs:
                    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "device"}
            module.recompile()
    return program


def _to_pt2(scorer: nn.Module, inputs: tuple, names: list[str], out: Path) -> None:
    torch.export.save(exported_program(scorer, inputs, names), str(out))


def _to_onnx(scorer: nn.Module, inputs: tuple, names: list[str], out: Path) -> None:
    try:
        import onnxruntime  # noqa: F401  (load_exported needs it to check the export)
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as err:
        raise ExportError(f"--format onnx needs onnx, onnxruntime and onnxscript: pip install -e '.[onnx]' "
                          f"({err.name} missing)") from None
    batch = torch.export.Dim("batch")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # torchvision-not-installed notes
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")  # items' and times' B
        torch.onnx.export(scorer, inputs, str(out), input_names=names, output_names=["scores"], dynamo=True,
                          dynamic_shapes={name: {0: batch} for name in names}, verbose=False,
                          custom_translation_table={torch.ops.aten.cummin.default: _onnx_cummin()})


def _onnx_cummin():
    """aten.cummin along the last axis in ONNX: the min over keys j <= i of a [..., L, L] grid,
    and the last j <= i holding it (torch's index on ties). Only personal-unit TiSASRec uses it,
    on [B, L] gaps, beside [B, L, L] interval tensors of the same size as the grid."""
    from onnxscript import opset18 as op

    def cummin(x, dim: int):
        if dim not in (-1, len(x.shape) - 1):
            raise NotImplementedError("cummin is exported along the last axis only")
        length = op.Shape(x, start=-1)
        lower = op.Trilu(op.Expand(op.Constant(value_int=1), op.Concat(length, length, axis=0)), upper=0)
        visible = op.Cast(lower, to=9)  # 9: BOOL; [L, L], key j <= query i
        keys = op.Unsqueeze(x, [-2])
        values = op.ReduceMin(op.Where(visible, keys, op.ReduceMax(x)), [-1], keepdims=0)
        positions = op.Range(op.Constant(value_int=0), op.Squeeze(length), op.Constant(value_int=1))
        hit = op.And(visible, op.Equal(keys, op.Unsqueeze(values, [-1])))
        return values, op.ReduceMax(op.Where(hit, positions, op.Constant(value_int=-1)), [-1], keepdims=0)

    return cummin


def main(argv: list[str] | None = None) -> int:
    """`seqrec export --checkpoint CKPT --out FILE [--format torchscript|onnx|pt2]`."""
    parser = argparse.ArgumentParser(prog="seqrec export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="best.pt or latest.pt of a run")
    parser.add_argument("--out", required=True, help="file to write (its item-id mapping goes to FILE.json)")
    parser.add_argument("--format", default="torchscript", choices=FORMATS,
                        help="torchscript (built in), onnx (needs pip install -e '.[onnx]') or pt2 "
                             "(a torch.export program)")
    args = parser.parse_args(argv)
    try:
        sidecar = export(args.checkpoint, args.out, args.format)
    except (ExportError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the target or its sidecar: a read-only directory, a full disk
        # A failed write() carries no file name (only open() does); export writes only these two.
        name = err.filename or f"{args.out} (or {sidecar_path(args.out)})"
        print(f"error: cannot write {name}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.format}) and {sidecar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

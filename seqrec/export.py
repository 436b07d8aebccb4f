"""Export of a checkpoint's recommender, to be served without seqrec: ``seqrec export --checkpoint CKPT --out FILE``.

The default format, ``pt2``, is a ``torch.export`` program of a top-k scorer
(``torch.export.save``; load with ``torch.export.load("model.pt2").module()``), holding only
aten ops. Its positional inputs are a left-padded [B, maxlen] int64 tensor of item indices
(0 = padding) and, for TiSASRec, a [B, maxlen] int64 tensor of unix timestamps (0 at padding);
the batch size is dynamic, the sequence length fixed at maxlen. It returns a plain tuple
``(item_indices, scores)``, each [B, k], best first. In the graph the padding index and every
item of the input row (the seen items) score -inf before ``topk``, so a server gets each row's
recommendations without a catalogue-wide row of scores to transfer and mask. The graph sees
only its input: of a history longer than maxlen the older items stay eligible
(``Recommender.recommend_histories`` excludes the whole history). A row with fewer than k
eligible items ends in -inf scores, whose indices are no recommendation. k is fixed at export
(``--k``, default 10, capped at the number of items); ``--k 0`` exports the scores of every
item instead, [B, num_items + 1] with column 0 the padding id, exactly
``model.score_all(model(batch)[:, -1])``. ONNX (``pip install -e '.[onnx]'``; torch's dynamo
exporter) and TorchScript hold the same graph and outputs as pt2 for the same k. A JSON
sidecar (``FILE.json``) holds the format, the input names, maxlen, k, the outputs and the
item-id list (index i is ``item_ids[i - 1]``).

Every export is run against the eager model on a second batch of another size, with padding,
and refused if they differ: top k is compared allowing ties (the same scores, and each index
an item of its score), since topk orders tied items as its kernel happens to.

TorchScript is a legacy format: torch deprecates ``torch.jit`` in favour of torch.export, and
it stays only for servers that load TorchScript (libtorch). It comes from ``torch.jit.trace``
(scripting would need every model file written in the TorchScript subset), which records the
ops of one example batch: the check above on another batch size guards against a recorded
shape. torch's deprecation warnings of the jit calls made here are silenced (``seqrec
export`` says once that the format is legacy). ONNX has no translation for ``aten.cummin``
(TiSASRec's ``personal`` time unit), so one is given here.

TorchScript and pt2 graphs hold no device: the models build every tensor from their inputs
(no ``device=x.device``, which a trace or an export records as a constant), and the device
torch.export writes by itself, in the metadata check before each dtype conversion, is dropped
from the program (`exported_program`); tests/test_export.py checks every variant's graphs. A
file exported on one device runs on another: ``load_exported(FILE, fmt, device)`` puts its
weights there.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .checkpoint import CheckpointError, resolve
from .serve import Recommender

FORMATS = ("pt2", "onnx", "torchscript")
DEFAULT_K = 10
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


class ExportError(RuntimeError):
    """An export that could not be made or does not reproduce the eager scores; one line."""


class ScoringModel(nn.Module):
    """items [B, L] (and times [B, L]) -> scores [B, num_items + 1] after the last position."""

    outputs = {"scores": "[B, num_items + 1] float32 score of each item index as the next item; "
                         "column 0 is padding"}

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, items: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        batch = {"items": items} if times is None else {"items": items, "times": times}
        return self.model.score_all(self.model(batch)[:, -1])

    def assert_matches(self, output, inputs: tuple[torch.Tensor, ...]) -> None:
        """Raise AssertionError where `output` (of an exported copy, on `inputs`) is not this model's."""
        torch.testing.assert_close(output, self(*inputs), **TOLERANCE)


class TopKScorer(ScoringModel):
    """items [B, L] (and times [B, L]) -> (item_indices, scores), each [B, k], of the k best
    items that are neither padding nor in the row: a server gets recommendations, not a
    catalogue-wide row of scores to mask and sort."""

    outputs = {"item_indices": "[B, k] int64, best first; index i is item_ids[i - 1]",
               "scores": "[B, k] float32, descending; -inf where a row has fewer than k eligible "
                         "items (its index is no recommendation)"}

    def __init__(self, model: nn.Module, k: int):
        super().__init__(model)
        self.k = k

    def eligible_scores(self, items: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        """All scores, with the padding index 0 and the row's items at -inf (one scatter: the row
        gets a leading 0, since a full row holds no padding)."""
        seen = nn.functional.pad(items, (1, 0))
        return super().forward(items, times).scatter(1, seen, float("-inf"))

    def forward(self, items: torch.Tensor, times: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        top = self.eligible_scores(items, times).topk(self.k, dim=1)
        return top.indices, top.values

    def assert_matches(self, output, inputs: tuple[torch.Tensor, ...]) -> None:
        """Allowing ties, whose order topk leaves to its kernel: the scores are this model's top k,
        and each index is an eligible item of its score."""
        indices, values = output
        eligible = self.eligible_scores(*inputs)
        torch.testing.assert_close(values, eligible.topk(self.k, dim=1).values, **TOLERANCE)
        torch.testing.assert_close(eligible.gather(1, indices), values, **TOLERANCE)


def build_scorer(model: nn.Module, k: int) -> ScoringModel:
    """The module to export: the top k, or (k = 0) the scores of all items."""
    return (TopKScorer(model, k) if k else ScoringModel(model)).eval()


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


def export(checkpoint: str | Path, out: str | Path, fmt: str = "pt2", k: int = DEFAULT_K) -> Path:
    """Write the scorer of a checkpoint (a file, or a run directory: its best.pt) to ``out``,
    top ``k`` (at most the number of items; 0: all scores), and its sidecar; returns the sidecar's path."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if k < 0:
        raise ExportError(f"--k must be 0 (the scores of all items) or more, got {k}")
    rec = Recommender.from_checkpoint(str(checkpoint))
    num_items = len(rec.item_ids)
    k = min(k, num_items)
    scorer = build_scorer(rec.model, k)
    names = ["items", "times"] if rec.uses_time else ["items"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_writable(out)
    with torch.no_grad():
        WRITERS[fmt](scorer, example_inputs(2, rec.maxlen, num_items, rec.uses_time), names, out)
        probe = example_inputs(5, rec.maxlen, num_items, rec.uses_time, seed=1)
        try:
            scorer.assert_matches(load_exported(out, fmt)(*probe), probe)
        except AssertionError as err:
            out.unlink()  # a file whose scores are wrong is not kept
            raise ExportError(f"{out}: exported scores differ from the model's: {str(err).splitlines()[0]}") from None
    sidecar = sidecar_path(out)
    sidecar.write_text(json.dumps({
        "format": fmt, "inputs": names, "maxlen": rec.maxlen, "k": k, "num_items": num_items,
        "outputs": scorer.outputs, "item_ids": rec.item_ids}) + "\n")
    return sidecar


def _check_writable(out: Path) -> None:
    """Refuse a target that cannot be written with an OSError naming it, before the export:
    torch's C++ writers report one as a RuntimeError ("[enforce fail at inline_container.cc]")."""
    if out.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(out))
    if not os.access(out if out.exists() else out.parent, os.W_OK):  # also EROFS, for root too
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out))


@contextlib.contextmanager
def _legacy_jit() -> Iterator[None]:
    """torch.jit.trace, save and load warn on every call that TorchScript is deprecated; the
    format is documented as legacy and kept on purpose, so the calls made here are quiet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is (deprecated|not supported)",
                                category=DeprecationWarning)
        yield


def load_exported(path: str | Path, fmt: str = "pt2",
                  device: torch.device | str | None = None) -> Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]:
    """The exported model as a function of (items[, times]) tensors returning what it was
    exported to return (a scores tensor, or the (item_indices, scores) tuple); its weights on
    ``device`` (default: where they were exported) for torchscript and pt2."""
    if fmt == "torchscript":
        with _legacy_jit():
            return torch.jit.load(str(path), map_location=device)
    if fmt == "pt2":
        with open(path, "rb") as f:  # a file object: torch logs a warning for a name not ending in .pt2
            program = torch.export.load(f)
        if device is not None:
            from torch.export.passes import move_to_device_pass
            program = move_to_device_pass(program, device)
        return program.module()
    if device is not None and torch.device(device).type != "cpu":
        raise ExportError("onnx files are run by onnxruntime's CPU provider here")
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: torch.Tensor):
        outputs = tuple(torch.from_numpy(o) for o in session.run(None, {n: t.numpy() for n, t in zip(names, inputs)}))
        return outputs if len(outputs) > 1 else outputs[0]
    return run


def _to_torchscript(scorer: nn.Module, inputs: tuple, names: list[str], out: Path) -> None:
    # Tracer warnings name shapes and Python numbers that are constants of the model
    # (head size, mHC's three gates, k); the check against a second batch size in export()
    # is what guards against a recorded shape.
    with _legacy_jit():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(scorer, inputs, check_trace=False)
        traced.save(str(out))


def exported_program(scorer: nn.Module, inputs: tuple, names: list[str]) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a scorer, batch dimension dynamic, holding no device.

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
    with open(out, "wb") as f:  # see load_exported
        torch.export.save(exported_program(scorer, inputs, names), f)


def _to_onnx(scorer: ScoringModel, inputs: tuple, names: list[str], out: Path) -> None:
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
        torch.onnx.export(scorer, inputs, str(out), input_names=names, output_names=list(scorer.outputs),
                          dynamo=True, dynamic_shapes={name: {0: batch} for name in names}, verbose=False,
                          custom_translation_table={torch.ops.aten.cummin.default: _onnx_cummin()})


WRITERS = {"pt2": _to_pt2, "onnx": _to_onnx, "torchscript": _to_torchscript}


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
    """`seqrec export --checkpoint CKPT --out FILE [--k 10] [--format pt2|onnx|torchscript]`."""
    parser = argparse.ArgumentParser(prog="seqrec export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run directory (its best.pt) or a checkpoint file")
    parser.add_argument("--out", required=True, help="file to write, e.g. model.pt2 (its item-id mapping goes "
                                                     "to FILE.json)")
    parser.add_argument("--k", type=int, default=DEFAULT_K,
                        help=f"recommendations per row, fixed in the graph (default {DEFAULT_K}, at most the "
                             "number of items); 0 exports the scores of all items instead")
    parser.add_argument("--format", default="pt2", choices=FORMATS,
                        help="pt2 (a torch.export program, the default), onnx (needs pip install -e '.[onnx]') "
                             "or torchscript (legacy)")
    args = parser.parse_args(argv)
    if args.format == "torchscript":
        print("note: torchscript is a legacy format (torch deprecates torch.jit); the default pt2 replaces it",
              file=sys.stderr)
    try:
        checkpoint = resolve(args.checkpoint)
        sidecar = export(checkpoint, args.out, args.format, args.k)
    except (ExportError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the target or its sidecar: a read-only directory, a full disk
        # A failed write() carries no file name (only open() does); export writes only these two.
        name = err.filename or f"{args.out} (or {sidecar_path(args.out)})"
        print(f"error: cannot write {name}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.format} of {checkpoint}) and {sidecar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

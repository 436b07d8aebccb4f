"""Export of the scoring model: exported scores equal the eager model's for every variant, at
batch sizes other than the one traced, the TorchScript file runs without seqrec, and no exported
graph holds a device."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils import _pytree as pytree

from conftest import small_config, write_interactions
from seqrec import export as ex
from seqrec.cli import console, run
from seqrec.config import TIME_UNITS
from seqrec.data import build_sequences, read_interactions
from seqrec.models import build_model
from seqrec.serve import Recommender

VARIANTS = {
    "sasrec": {},
    "sasrec+mhc": {"model__mhc": True},
    "tisasrec": {"model__time": True, "model__time_unit": "personal"},
    "tisasrec+mhc": {"model__time": True, "model__mhc": True},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def trained(request, tmp_path_factory):
    """(checkpoint, data file) of a one-epoch run of the variant."""
    tmp = tmp_path_factory.mktemp(request.param.replace("+", "_"))
    data = write_interactions(tmp / "toy.txt")
    run(small_config(data, tmp / "run", train__num_epochs=1, **VARIANTS[request.param]))
    return tmp / "run" / "best.pt", data


def real_batch(rec: Recommender, data_file, users: int = 3) -> tuple[torch.Tensor, ...]:
    """Left-padded inputs of the first users' histories, as serving encodes them."""
    seqs = build_sequences(read_interactions(str(data_file)))
    spans = [slice(seqs.offsets[u], seqs.offsets[u + 1]) for u in range(users)]
    histories = [[seqs.item_ids[i - 1] for i in seqs.items[s]] for s in spans]
    batch = rec._encode(histories, [seqs.times[s].tolist() for s in spans], strict=True)
    assert (batch["items"] == 0).any()  # the histories are shorter than maxlen: padding is exercised
    return (batch["items"], batch["times"]) if rec.uses_time else (batch["items"],)


def check_format(fmt: str, trained, tmp_path) -> None:
    checkpoint, data_file = trained
    out = tmp_path / f"model.{fmt}"
    sidecar = ex.export(checkpoint, out, fmt)
    rec = Recommender.from_checkpoint(str(checkpoint))
    meta = json.loads(sidecar.read_text())
    assert meta["item_ids"] == rec.item_ids and meta["maxlen"] == rec.maxlen
    assert meta["inputs"] == (["items", "times"] if rec.uses_time else ["items"])
    exported, eager = ex.load_exported(out, fmt), ex.ScoringModel(rec.model)
    for inputs in (real_batch(rec, data_file), ex.example_inputs(7, rec.maxlen, len(rec.item_ids), rec.uses_time, 5)):
        with torch.no_grad():
            expected = eager(*inputs)
        assert expected.shape == (len(inputs[0]), len(rec.item_ids) + 1)
        torch.testing.assert_close(exported(*inputs), expected, rtol=1e-5, atol=1e-5)


def test_torchscript_scores_equal_eager(trained, tmp_path):
    check_format("torchscript", trained, tmp_path)


def test_pt2_scores_equal_eager_and_run_on_another_device(trained, tmp_path):
    check_format("pt2", trained, tmp_path)
    # The weights move at load (move_to_device_pass); "meta" stands in for an accelerator: an op
    # left on the export's device would fail against meta tensors.
    checkpoint, data_file = trained
    rec = Recommender.from_checkpoint(str(checkpoint))
    inputs = real_batch(rec, data_file)
    scores = ex.load_exported(tmp_path / "model.pt2", "pt2", device="meta")(*(t.to("meta") for t in inputs))
    assert scores.device.type == "meta" and scores.shape == (len(inputs[0]), len(rec.item_ids) + 1)


def test_onnx_scores_equal_eager(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    check_format("onnx", trained, tmp_path)


FRESH_PROCESS = """
import json, sys
sys.modules["seqrec"] = None  # any import of seqrec now fails
import torch
model = torch.jit.load(sys.argv[1])
meta = json.load(open(sys.argv[1] + ".json"))
inputs = torch.load(sys.argv[2])
torch.save(model(*inputs[:len(meta["inputs"])]), sys.argv[3])
"""


def test_torchscript_runs_without_seqrec(trained, tmp_path):
    checkpoint, data_file = trained
    assert console(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.pt")]) == 0
    rec = Recommender.from_checkpoint(str(checkpoint))
    inputs = real_batch(rec, data_file, users=4)
    torch.save(inputs, tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "m.pt"), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "scores.pt")], check=True, cwd=tmp_path)
    with torch.no_grad():
        expected = ex.ScoringModel(rec.model)(*inputs)
    torch.testing.assert_close(torch.load(tmp_path / "scores.pt"), expected, rtol=1e-5, atol=1e-5)


def test_export_refuses_a_wrong_trace_and_bad_input(tmp_path, monkeypatch, capsys):
    data = write_interactions(tmp_path / "toy.txt")
    run(small_config(data, tmp_path / "run", train__num_epochs=1))
    checkpoint = tmp_path / "run" / "best.pt"
    monkeypatch.setattr(ex, "load_exported", lambda path, fmt: lambda items: torch.zeros(len(items), 41))
    with pytest.raises(ex.ExportError, match="differ"):
        ex.export(checkpoint, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.pt.json").exists()  # nothing wrong is kept
    assert console(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


# A device recorded in a graph: `torch.arange(n, device=x.device)` traces to a Device constant and
# exports with a device kwarg, fixed to the device of the export; run elsewhere, the graph fails
# (a tensor on the wrong device) or computes there. Shapes' "device=cpu" in the printed graphs
# are type annotations of values, not constants, and are not looked at.


def _is_device(value) -> bool:
    if isinstance(value, torch.device):
        return True
    try:
        return isinstance(value, str) and torch.device(value) is not None
    except (RuntimeError, ValueError):
        return False


def _script_nodes(block):
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _script_nodes(inner)


def script_device_literals(module: torch.jit.ScriptModule) -> list[str]:
    """Device constants (and strings naming a device) of a TorchScript module's inlined graph,
    and `torch.device(` in the code of it and its submodules."""
    found = []
    for node in _script_nodes(module.inlined_graph):
        if node.kind() != "prim::Constant" or not node.outputsSize():
            continue
        kind = node.output().type().kind()
        if kind == "DeviceObjType" or kind == "StringType" and _is_device(node.output().toIValue()):
            found.append(str(node).strip())
    for name, sub in module.named_modules():
        try:
            code = sub.code
        except (AttributeError, RuntimeError):  # a container without forward
            continue
        found += [f"{name or 'top'}.code: {line.strip()}" for line in code.splitlines() if "torch.device(" in line]
    return found


def program_device_literals(program: torch.export.ExportedProgram) -> list[str]:
    """Nodes of an exported program (and of its nested graphs) with a device among their args or kwargs."""
    found = []
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                if any(_is_device(v) for v in pytree.tree_leaves((node.args, node.kwargs))):
                    found.append(node.format_node())
    return found


def assert_program_holds_no_device(program: torch.export.ExportedProgram) -> None:
    assert program_device_literals(program) == []


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_exported_files_hold_no_device(trained, fmt, tmp_path):
    """What `seqrec export` writes, loaded back, holds no device constant or argument."""
    checkpoint, _ = trained
    out = tmp_path / f"model.{fmt}"
    assert console(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--format", fmt]) == 0
    if fmt == "torchscript":
        assert script_device_literals(torch.jit.load(str(out))) == []
    else:
        assert_program_holds_no_device(torch.export.load(str(out)))


@pytest.mark.parametrize("unit", TIME_UNITS)
def test_tisasrec_exports_hold_no_device_for_every_time_unit(unit, tmp_path):
    """Each time unit's interval code, traced and exported (an untrained model has the same graph;
    mHC is covered by the trained variants)."""
    cfg = small_config(tmp_path / "unused.txt", tmp_path, model__time=True, model__time_unit=unit).model
    scorer = ex.ScoringModel(build_model(cfg, 40)).eval()
    inputs = ex.example_inputs(2, cfg.maxlen, 40, uses_time=True)
    with torch.no_grad():
        ex._to_torchscript(scorer, inputs, ["items", "times"], tmp_path / "m.pt")
        program = ex.exported_program(scorer, inputs, ["items", "times"])
    assert script_device_literals(torch.jit.load(str(tmp_path / "m.pt"))) == []
    assert_program_holds_no_device(program)


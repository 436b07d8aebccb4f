"""Export: the default pt2 program's top k equals the eager Recommender's (ties allowed) in a
process that cannot import seqrec, every format reproduces the eager scorer at batch sizes
other than the one traced, the graphs hold only aten ops and no device, and TorchScript, the
legacy format, raises none of torch's jit deprecation warnings."""
from __future__ import annotations

import inspect
import json
import operator
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
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
K = 25  # of the toy data's 40 items: rows with more than 15 distinct items have fewer than K eligible


@pytest.fixture(scope="module", params=list(VARIANTS))
def trained(request, tmp_path_factory):
    """(run directory, data file) of a one-epoch run of the variant."""
    tmp = tmp_path_factory.mktemp(request.param.replace("+", "_"))
    data = write_interactions(tmp / "toy.txt")
    run(small_config(data, tmp / "run", train__num_epochs=1, **VARIANTS[request.param]))
    return tmp / "run", data


@pytest.fixture(scope="module")
def pt2(trained):
    """(run directory, data file, file) of `seqrec export` with the default format, top K."""
    run_dir, data = trained
    out = run_dir.parent / "model.pt2"
    assert console(["export", "--checkpoint", str(run_dir / "best.pt"), "--out", str(out), "--k", str(K)]) == 0
    return run_dir, data, out


@pytest.fixture(scope="module")
def sasrec_run(tmp_path_factory):
    """A SASRec run directory, for the tests of options that do not depend on the model."""
    tmp = tmp_path_factory.mktemp("sasrec_options")
    run(small_config(write_interactions(tmp / "toy.txt"), tmp / "run", train__num_epochs=1))
    return tmp / "run"


def histories(data_file, users: int, maxlen: int) -> tuple[list[list[str]], list[list[int]]]:
    """The last maxlen items (original ids) and timestamps of the first users of the data: the
    whole input row of each, so "seen" means the same to the graph and to the Recommender."""
    seqs = build_sequences(read_interactions(str(data_file)))
    spans = [slice(max(seqs.offsets[u], seqs.offsets[u + 1] - maxlen), seqs.offsets[u + 1]) for u in range(users)]
    return ([[str(seqs.item_ids[i - 1]) for i in seqs.items[s]] for s in spans],
            [seqs.times[s].tolist() for s in spans])


def encode(meta: dict, histories: list, times: list) -> tuple:
    """What a server does with the sidecar alone (this function also runs in the process without
    seqrec): ids to indices (index i is item_ids[i - 1]), the last maxlen of each row, left-padded with 0."""
    index = {item: i + 1 for i, item in enumerate(meta["item_ids"])}
    columns = {"items": [[index[item] for item in row] for row in histories], "times": times}
    tensors = []
    for name in meta["inputs"]:
        tensor = torch.zeros(len(histories), meta["maxlen"], dtype=torch.long)
        for row, values in enumerate(columns[name]):
            values = values[-meta["maxlen"]:]
            if values:
                tensor[row, -len(values):] = torch.tensor(values)
        tensors.append(tensor)
    return tuple(tensors)


def check_format(fmt: str, out, run_dir, data_file, k: int) -> None:
    """The file's sidecar describes it, and its outputs are the eager scorer's on real
    histories (padded) and on random ones at another batch size."""
    rec = Recommender.from_checkpoint(run_dir)
    meta = json.loads(ex.sidecar_path(out).read_text())
    assert meta["format"] == fmt and meta["k"] == k and meta["maxlen"] == rec.maxlen
    assert meta["item_ids"] == rec.item_ids and meta["num_items"] == len(rec.item_ids)
    assert meta["inputs"] == (["items", "times"] if rec.uses_time else ["items"])
    assert list(meta["outputs"]) == (["item_indices", "scores"] if k else ["scores"])
    exported, eager = ex.load_exported(out, fmt), ex.build_scorer(rec.model, k)
    real = encode(meta, *histories(data_file, 4, rec.maxlen))
    assert (real[0] == 0).any()  # padding is exercised
    for inputs in (real, ex.example_inputs(7, rec.maxlen, len(rec.item_ids), rec.uses_time, 5)):
        with torch.no_grad():
            got = exported(*inputs)
            eager.assert_matches(got, inputs)
        shapes = [tuple(t.shape) for t in (got if k else (got,))]
        assert shapes == ([(len(inputs[0]), k)] * 2 if k else [(len(inputs[0]), len(rec.item_ids) + 1)])


def test_pt2_top_k_equals_eager_and_runs_on_another_device(pt2):
    run_dir, data_file, out = pt2
    check_format("pt2", out, run_dir, data_file, K)
    # The weights move at load (move_to_device_pass); "meta" stands in for an accelerator: an op
    # left on the export's device would fail against meta tensors.
    meta = json.loads(ex.sidecar_path(out).read_text())
    inputs = encode(meta, *histories(data_file, 3, meta["maxlen"]))
    indices, scores = ex.load_exported(out, "pt2", device="meta")(*(t.to("meta") for t in inputs))
    assert indices.device.type == scores.device.type == "meta" and scores.shape == (3, K)


def no_jit_deprecation(call, *args):
    """call(*args), asserting that it raised none of torch's jit deprecation warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call(*args)
    assert [str(w.message) for w in caught if "torch.jit" in str(w.message)] == []
    return result


def test_torchscript_is_legacy_quiet_and_equals_eager(trained, tmp_path, capsys):
    run_dir, data_file = trained
    out = tmp_path / "model.pt"
    argv = ["export", "--checkpoint", str(run_dir), "--out", str(out), "--format", "torchscript", "--k", str(K)]
    assert no_jit_deprecation(console, argv) == 0
    assert capsys.readouterr().err.startswith("note: torchscript is a legacy format")
    no_jit_deprecation(check_format, "torchscript", out, run_dir, data_file, K)


def test_onnx_top_k_equals_eager(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run_dir, data_file = trained
    ex.export(run_dir, tmp_path / "model.onnx", "onnx", K)
    check_format("onnx", tmp_path / "model.onnx", run_dir, data_file, K)


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_k_0_exports_the_scores_of_all_items(fmt, sasrec_run, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    out = tmp_path / f"model.{fmt}"
    ex.export(sasrec_run, out, fmt, k=0)
    check_format(fmt, out, sasrec_run, sasrec_run.parent / "toy.txt", 0)


CHILD = textwrap.dedent(inspect.getsource(encode)) + """
import json, sys
sys.modules["seqrec"] = None  # installed (editable or not) beside torch, so blocked rather than off the path
try:
    import seqrec
except ImportError:
    pass
else:
    raise SystemExit("seqrec is importable")
import torch
path, request, answer = sys.argv[1:]
with open(path + ".json") as f:
    meta = json.load(f)
with open(request) as f:
    request = json.load(f)
model = torch.export.load(path).module()
with torch.no_grad():
    indices, scores = model(*encode(meta, request["histories"], request["times"]))
ids = [[meta["item_ids"][i - 1] if s > float("-inf") else None for i, s in zip(*row)]
       for row in zip(indices.tolist(), scores.tolist())]
with open(answer, "w") as f:
    json.dump({"ids": ids, "scores": scores.tolist()}, f)
"""


def assert_same_top_k(ids, scores, expected_ids, expected_scores, tol: float = 1e-5) -> None:
    """Equal scores (within tol); equal ids wherever the score is not tied with another of its row,
    since tied items come in the order their topk kernel happens to give."""
    np.testing.assert_allclose(scores, expected_scores, rtol=tol, atol=tol)  # -inf only where -inf
    for row, (row_ids, row_scores) in enumerate(zip(expected_ids, expected_scores)):
        for j, score in enumerate(row_scores):
            if np.isneginf(score):
                assert ids[row][j] is None and row_ids[j] is None
            elif np.sum(np.abs(row_scores - score) <= tol) == 1:
                assert ids[row][j] == row_ids[j], (row, j)


def test_pt2_runs_without_seqrec_and_matches_the_recommender(pt2, tmp_path):
    """`python -I` from a directory outside the checkout (no cwd, no PYTHONPATH on sys.path)
    loads the file with torch.export.load, encodes histories and maps indices back to ids with
    the sidecar alone; the result is Recommender.recommend_histories' top K, seen items excluded."""
    run_dir, data_file, out = pt2
    rec = Recommender.from_checkpoint(run_dir)
    rows, times = histories(data_file, 8, rec.maxlen)
    (tmp_path / "request.json").write_text(json.dumps({"histories": rows, "times": times}))
    subprocess.run([sys.executable, "-I", "-c", CHILD, str(out), str(tmp_path / "request.json"),
                    str(tmp_path / "answer.json")], check=True, cwd=tmp_path)
    answer = json.loads((tmp_path / "answer.json").read_text())
    expected_ids, expected_scores = rec.recommend_histories(rows, k=K, times=times if rec.uses_time else None,
                                                             exclude_seen=True)
    assert_same_top_k(answer["ids"], np.array(answer["scores"], dtype=np.float32), expected_ids, expected_scores)
    tails = np.isneginf(expected_scores).any(axis=1)
    assert tails.any() and not tails.all()  # rows with fewer than K eligible items end in -inf, the others do not


def test_checkpoint_may_be_a_run_directory(sasrec_run, tmp_path, capsys):
    """A run directory means its best.pt, else its latest.pt; one without either is one line, exit 2."""
    out = tmp_path / "model.pt2"
    assert console(["export", "--checkpoint", str(sasrec_run), "--out", str(out)]) == 0
    assert f"(pt2 of {sasrec_run / 'best.pt'})" in capsys.readouterr().out
    meta = json.loads(ex.sidecar_path(out).read_text())
    assert (meta["format"], meta["k"]) == ("pt2", ex.DEFAULT_K)
    latest_only = tmp_path / "latest_only"
    latest_only.mkdir()
    shutil.copy(sasrec_run / "latest.pt", latest_only)
    assert console(["export", "--checkpoint", str(latest_only), "--out", str(tmp_path / "m.pt"), "--k", "3",
                    "--format", "torchscript"]) == 0
    assert f"(torchscript of {latest_only / 'latest.pt'})" in capsys.readouterr().out


def test_k_is_capped_at_the_catalogue_and_a_negative_k_is_refused(sasrec_run, tmp_path, capsys):
    out = tmp_path / "m.pt"
    ex.export(sasrec_run, out, "torchscript", k=1000)
    assert json.loads(ex.sidecar_path(out).read_text())["k"] == 40
    assert console(["export", "--checkpoint", str(sasrec_run), "--out", str(out), "--k", "-1"]) == 2
    assert capsys.readouterr().err == "error: --k must be 0 (the scores of all items) or more, got -1\n"


def test_export_refuses_a_wrong_trace_and_bad_input(sasrec_run, tmp_path, monkeypatch, capsys):
    def wrong(path, fmt):  # a trace that recorded something else: item 0, score 0, for every row
        return lambda items: (torch.zeros(len(items), ex.DEFAULT_K, dtype=torch.long),
                              torch.zeros(len(items), ex.DEFAULT_K))
    monkeypatch.setattr(ex, "load_exported", wrong)
    with pytest.raises(ex.ExportError, match="differ"):
        ex.export(sasrec_run, tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists() and not (tmp_path / "m.pt2.json").exists()  # nothing wrong is kept
    assert console(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.pt2")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert console(["export", "--checkpoint", str(empty), "--out", str(tmp_path / "x.pt2")]) == 2
    assert capsys.readouterr().err == f"error: {empty}: run directory holds no best.pt or latest.pt\n"


# Only aten ops: a server that runs the program (torch.export.load, AOTInductor, ExecuTorch) needs
# no Python module of ours and no custom op. Python's getitem picks an output of a multi-output op
# (topk), and operator.mul etc. compute sizes from the symbolic batch dimension: neither is a tensor op.

def _allowed(node: torch.fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace == "aten"
    on_sizes = getattr(target, "__module__", None) == "_operator" and isinstance(node.meta.get("val"), torch.SymInt)
    return target is operator.getitem or on_sizes


def non_aten_nodes(program: torch.export.ExportedProgram) -> list[str]:
    """The nodes of the program's graph that compute anything but aten ops (a call_module, a
    higher-order op such as an autocast region, a custom op, a Python function)."""
    computing = (node for node in program.graph.nodes if node.op not in ("placeholder", "get_attr", "output"))
    return [node.format_node() for node in computing if not (node.op == "call_function" and _allowed(node))]


def test_pt2_graph_holds_only_aten_ops(pt2):
    program = torch.export.load(str(pt2[2]))
    assert non_aten_nodes(program) == []
    assert torch.ops.aten.topk.default in {node.target for node in program.graph.nodes}


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


def test_exported_files_hold_no_device(pt2, tmp_path):
    """What `seqrec export` writes, loaded back, holds no device constant or argument."""
    run_dir, _, out = pt2
    assert program_device_literals(torch.export.load(str(out))) == []
    traced = tmp_path / "model.pt"
    assert console(["export", "--checkpoint", str(run_dir), "--out", str(traced), "--format", "torchscript"]) == 0
    assert script_device_literals(ex.load_exported(traced, "torchscript")) == []


@pytest.mark.parametrize("unit", TIME_UNITS)
def test_tisasrec_exports_hold_no_device_for_every_time_unit(unit, tmp_path):
    """Each time unit's interval code, traced and exported (an untrained model has the same graph;
    mHC is covered by the trained variants), only aten ops in the program."""
    cfg = small_config(tmp_path / "unused.txt", tmp_path, model__time=True, model__time_unit=unit).model
    scorer = ex.build_scorer(build_model(cfg, 40), ex.DEFAULT_K)
    inputs = ex.example_inputs(2, cfg.maxlen, 40, uses_time=True)
    with torch.no_grad():
        ex._to_torchscript(scorer, inputs, ["items", "times"], tmp_path / "m.pt")
        program = ex.exported_program(scorer, inputs, ["items", "times"])
    assert script_device_literals(ex.load_exported(tmp_path / "m.pt", "torchscript")) == []
    assert program_device_literals(program) == [] and non_aten_nodes(program) == []

"""Export of the scoring model: exported scores equal the eager model's for every variant, at
batch sizes other than the one traced, and the TorchScript file runs without seqrec."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import small_config, write_interactions
from seqrec import export as ex
from seqrec.cli import console, run
from seqrec.data import build_sequences, read_interactions
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

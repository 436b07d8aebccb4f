"""--compile traces the training forward and loss as one graph (fullgraph: a graph break is an
error), specialised to a small fixed set of shapes, and trains like eager.

The trainer's torch.compile call is kept but pointed at the aot_eager backend (the same
Dynamo trace and AOTAutograd joint graph as inductor, without its minutes of C++ codegen
on this CPU), with a counter of compilations.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close_parameters, small_config
from seqrec import checkpoint as ckpt
from seqrec import trainer as trainer_module
from seqrec.cli import run
from seqrec.trainer import Trainer


@pytest.fixture
def compiles(monkeypatch):
    """Every graph Dynamo hands to the backend (one per compilation or recompilation)."""
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    original = torch.compile

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def compile_(model, **kwargs):
        assert kwargs["fullgraph"] and kwargs["dynamic"] is False
        kwargs.pop("mode")
        return original(model, backend=backend, **kwargs)

    monkeypatch.setattr(trainer_module.torch, "compile", compile_)
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


def widths_seen(monkeypatch) -> list:
    shapes = []
    original = Trainer.batch

    def spy(self, users, epoch, width):
        batch = original(self, users, epoch, width)
        shapes.append(tuple(batch["items"].shape))
        return batch

    monkeypatch.setattr(Trainer, "batch", spy)
    return shapes


CASES = {
    "sasrec": {},
    "tisasrec": {"model__time": True},
    "sasrec+mhc": {"model__mhc": True},
    "tisasrec+mhc": {"model__time": True, "model__mhc": True},
    "ligr": {"model__block": "ligr", "model__ffn_mult": 2},
    "gbce": {"train__loss": "gbce", "train__num_negatives": 8},
    "sampled_softmax+logq+shared": {"train__loss": "sampled_softmax", "train__num_negatives": 8,
                                    "train__logq": True, "train__shared_negatives": True},
    "ce": {"train__loss": "ce"},
}


@pytest.mark.parametrize("case", CASES)
def test_compiled_step_is_one_graph_per_shape_and_trains_like_eager(data_file, tmp_path, monkeypatch, compiles, case):
    kw = dict(train__num_epochs=1, train__length_buckets=3, model__dropout_rate=0.0, **CASES[case])
    run(small_config(data_file, tmp_path / "eager", **kw))
    shapes = widths_seen(monkeypatch)
    run(small_config(data_file, tmp_path / "compiled", train__compile=True, **kw))
    maxlen = 20
    assert {rows for rows, _ in shapes} == {-(-16 // 3)}  # every micro-batch padded to the largest one's rows
    assert all(width % 3 == 0 or width == maxlen for _, width in shapes)  # widths rounded up to maxlen / 8 = 3
    assert 1 <= len(compiles) <= len(set(shapes))  # no graph break (fullgraph), one graph per shape at most
    assert_close_parameters(ckpt.load(tmp_path / "eager" / "latest.pt")["model"],
                            ckpt.load(tmp_path / "compiled" / "latest.pt")["model"], 1e-4)


def test_compiled_run_keeps_mhc_on_traceable_ops(data_file, tmp_path, compiles):
    """The CPU kernel of mHC is a ctypes call Dynamo cannot trace: compiled runs use the PyTorch path."""
    cfg = small_config(data_file, tmp_path / "r", train__compile=True, model__mhc=True)
    from seqrec.cli import load_data
    data, seqs = load_data(cfg, torch.device("cpu"))
    trainer = Trainer(cfg, data, torch.device("cpu"), tmp_path / "r", list(seqs.item_ids.astype(str)))
    assert cfg.model.mhc_native  # the run's config keeps the user's setting ...
    assert all(not getattr(m, "native", False) for m in trainer.model.modules())  # ... the traced model does not

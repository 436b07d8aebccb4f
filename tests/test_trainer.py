import json
import math

import pytest
import torch

from conftest import SCALE_SENSITIVE, assert_close_parameters, metric_rows, small_config, train_losses
from seqrec import checkpoint as ckpt
from seqrec import provenance
from seqrec.cli import run
from seqrec.config import ConfigError
from seqrec.losses import BCELoss
from seqrec.trainer import TrainingError


def params(path):
    return ckpt.load(path)["model"]


@pytest.mark.parametrize("kw", [
    {},  # SASRec, BCE, dropout on: the RNG streams carry over
    {"model__time": True, "model__mhc": True},  # the seed's default model
    {"model__time": True, "model__mhc": True, "train__amp": "fp16"},  # fp16 autocast with the GradScaler
    {"train__loss": "sampled_softmax", "train__num_negatives": 8, "train__shared_negatives": True},
], ids=["sasrec", "tisasrec+mhc", "tisasrec+mhc-fp16", "shared-negatives"])
def test_resume_equals_uninterrupted(data_file, tmp_path, kw):
    run(small_config(data_file, tmp_path / "straight", train__num_epochs=4, train__eval_every=2, **kw))
    run(small_config(data_file, tmp_path / "split", train__num_epochs=2, train__eval_every=2, **kw))
    run(small_config(data_file, tmp_path / "split", train__num_epochs=4, train__eval_every=2, run__resume=True, **kw))
    a, b = params(tmp_path / "straight" / "latest.pt"), params(tmp_path / "split" / "latest.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trained = lambda d: [r for r in metric_rows(tmp_path / d) if r["type"] != "test"]  # noqa: E731
    assert trained("straight") == trained("split")  # no duplicated or missing rows after resume


def test_resume_after_a_crash_mid_epoch(data_file, tmp_path, monkeypatch):
    kw = dict(train__num_epochs=3, train__length_buckets=1)  # one loss call per step
    run(small_config(data_file, tmp_path / "straight", **kw))
    calls = {"n": 0}
    original = BCELoss.__call__

    def crash_mid_epoch_3(self, *args):
        calls["n"] += 1
        if calls["n"] == 10:  # second step of epoch 3 (4 steps/epoch)
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(BCELoss, "__call__", crash_mid_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run(small_config(data_file, tmp_path / "crashed", **kw))
    assert ckpt.load(tmp_path / "crashed" / "latest.pt")["epoch"] == 2
    monkeypatch.setattr(BCELoss, "__call__", original)
    run(small_config(data_file, tmp_path / "crashed", run__resume=True, **kw))
    a, b = params(tmp_path / "straight" / "latest.pt"), params(tmp_path / "crashed" / "latest.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_needs_resume_or_overwrite(data_file, tmp_path):
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    with pytest.raises(ConfigError, match="--resume to continue it or --overwrite"):
        run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1, run__overwrite=True))
    rows = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(r)["type"] == "train" for r in rows) == 1


def test_resume_refuses_a_reshaped_model(data_file, tmp_path):
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    with pytest.raises(TrainingError, match="--hidden_units 32 differs"):
        run(small_config(data_file, tmp_path / "r", train__num_epochs=2, run__resume=True, model__hidden_units=32))


def test_a_checkpoint_from_before_the_block_option_resumes(data_file, tmp_path):
    """Its model config says norm_first and has no block or ffn_mult: read through the schema,
    it is the post-LN model of today's defaults, so resuming is not refused as a reshape."""
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    state = ckpt.load(tmp_path / "r" / "latest.pt")
    model = state["config"]["model"]
    del model["block"], model["ffn_mult"]
    model["norm_first"] = False
    ckpt.save(state, tmp_path / "r" / "latest.pt")
    run(small_config(data_file, tmp_path / "r", train__num_epochs=2, run__resume=True))
    assert ckpt.load(tmp_path / "r" / "latest.pt")["epoch"] == 2
    model["norm_first"] = True  # a pre-LN run is another model
    ckpt.save(state, tmp_path / "r" / "latest.pt")
    with pytest.raises(TrainingError, match="--block post differs from the checkpoint's pre"):
        run(small_config(data_file, tmp_path / "r", train__num_epochs=3, run__resume=True))


def nan_at(steps):
    calls = {"n": 0}
    original = BCELoss.__call__

    def call(self, model, hidden, batch):
        calls["n"] += 1
        loss, count = original(self, model, hidden, batch)
        return (loss * math.nan if calls["n"] in steps else loss), count
    return call


def test_nan_step_is_skipped_and_never_checkpointed(data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(BCELoss, "__call__", nan_at({3, 4}))
    seen = []
    from seqrec.trainer import Trainer
    original_step = Trainer.train_step

    def spy(self, users, epoch):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        out = original_step(self, users, epoch)
        seen.append(all(torch.equal(before[k], v) for k, v in self.model.state_dict().items()))
        return out

    monkeypatch.setattr(Trainer, "train_step", spy)
    run(small_config(data_file, tmp_path / "r", train__num_epochs=2, train__length_buckets=1))  # 4 steps per epoch, 1 loss call each
    assert len(seen) == 8 and seen[2] and seen[3] and not any(seen[:2]) and not any(seen[4:])  # exactly the NaN steps left weights as they were
    state = ckpt.load(tmp_path / "r" / "latest.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(s["exp_avg"]).all() for s in state["optimizer"]["state"].values())


def test_consecutive_nan_steps_stop_the_run(data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(BCELoss, "__call__", nan_at(set(range(6, 100))))
    with pytest.raises(TrainingError, match="3 consecutive non-finite steps"):
        run(small_config(data_file, tmp_path / "r", train__num_epochs=3, train__max_bad_steps=3,
                         train__length_buckets=1))  # one loss call per step
    assert ckpt.load(tmp_path / "r" / "latest.pt")["epoch"] == 1  # epoch 1's checkpoint survives intact


def test_checkpoint_is_weights_only_and_atomic(data_file, tmp_path, monkeypatch):
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    path = tmp_path / "r" / "latest.pt"
    state = torch.load(path, weights_only=True)
    assert state["format_version"] == ckpt.FORMAT_VERSION and state["config"]["model"]["hidden_units"] == 16
    before = path.read_bytes()

    def disk_full(fd):  # the bytes went into the temporary file; making them durable fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", disk_full)
    with pytest.raises(OSError) as err:
        ckpt.save({"x": torch.ones(1000)}, path)
    assert err.value.filename == str(path)  # the error names the checkpoint, for the one-line message
    assert path.read_bytes() == before and not list(path.parent.glob(".latest.pt.*"))


def test_inference_only_reproduces_final_metrics(data_file, tmp_path):
    results = run(small_config(data_file, tmp_path / "r", train__num_epochs=2))
    again = run(small_config(data_file, tmp_path / "other", run__inference_only=True,
                             run__state_dict_path=str(tmp_path / "r" / "best.pt")))
    assert again["test"] == results["test"]


def test_demo_run_beats_popularity(tmp_path, monkeypatch):
    """A short run on the packaged demo data (as generated here, into a fresh cache) must clearly
    beat ranking by popularity."""
    from seqrec.cli import load_data
    from seqrec.data import demo
    from seqrec.evaluate import evaluate
    from seqrec.models import Popularity
    monkeypatch.setenv("SEQREC_CACHE_DIR", str(tmp_path / "cache"))
    cfg = small_config(demo.demo_path(), tmp_path / "r", train__num_epochs=10, train__eval_every=5,
                       train__batch_size=128, train__warmup_steps=20, model__maxlen=50, model__hidden_units=32,
                       eval__eval_negatives=100, eval__eval_batch_size=512)
    results = run(cfg)
    data, _ = load_data(cfg, torch.device("cpu"))
    pop = evaluate(Popularity(data.item_counts), data.splits["test"], cfg.eval, data.num_items)
    assert results["test"]["full/NDCG@10"] > 2 * pop["full/NDCG@10"]
    assert results["test"]["sampled/NDCG@10"] > pop["sampled/NDCG@10"] + 0.1


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(data_file, tmp_path, amp):
    """Autocast on CPU (bf16; fp16 with the GradScaler): the full model trains to finite weights
    that differ from the fp32 run's by rounding (so autocast was in effect) but not by more,
    and evaluation (always fp32) still works."""
    kw = dict(model__time=True, model__mhc=True, train__num_epochs=2, model__dropout_rate=0.0)
    results = run(small_config(data_file, tmp_path / "r", train__amp=amp, **kw))
    run(small_config(data_file, tmp_path / "fp32", **kw))
    state = ckpt.load(tmp_path / "r" / "latest.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    weights, fp32 = state["model"]["item_emb.weight"], params(tmp_path / "fp32" / "latest.pt")["item_emb.weight"]
    assert 1e-6 < (weights - fp32).norm() / fp32.norm() < 1e-2  # measured: bf16 4.5e-4, fp16 9e-5
    assert (state["scaler"] != {}) == (amp == "fp16")  # the scaler's state is checkpointed only when used
    assert 0 < results["test"]["sampled/NDCG@10"] < 1


def test_early_stopping_after_patience_evaluations(data_file, tmp_path, monkeypatch):
    from seqrec.trainer import Trainer
    scores = iter([0.5, 0.6, 0.55, 0.58, 0.9, 0.9])  # best at epoch 2, then 2 evaluations without improvement
    original = Trainer.validate
    monkeypatch.setattr(Trainer, "validate",
                        lambda self: {**original(self), "sampled/NDCG@10": next(scores)})
    results = run(small_config(data_file, tmp_path / "r", train__num_epochs=6, train__early_stop_patience=2))
    assert results["best_epoch"] == 2 and results["epochs"] == 4
    assert ckpt.load(tmp_path / "r" / "best.pt")["epoch"] == 2


def test_compiled_training_matches_eager(data_file, tmp_path):
    """--compile changes kernels, not the computation (dropout off: compiled code has its own RNG)."""
    kw = dict(train__num_epochs=1, train__eval_every=1, model__dropout_rate=0.0, model__num_blocks=1)
    eager = run(small_config(data_file, tmp_path / "eager", **kw))
    compiled = run(small_config(data_file, tmp_path / "compiled", train__compile=True, **kw))
    assert_close_parameters(params(tmp_path / "eager" / "latest.pt"), params(tmp_path / "compiled" / "latest.pt"), 1e-4)
    assert compiled["valid"]["sampled/NDCG@10"] == pytest.approx(eager["valid"]["sampled/NDCG@10"], abs=1e-3)


@pytest.mark.parametrize("model_kw", [dict(model__time=False, model__mhc=False), dict(model__time=True, model__mhc=True)])
def test_length_buckets_change_work_not_gradients(data_file, tmp_path, model_kw):
    """Grouping a batch by history length (each group cut to its longest history) sums the
    same per-position losses: with dropout off the trained weights match the unbucketed run
    up to float summation order (which Adam amplifies in the small mHC gates of the last
    block: up to 4.6e-5 seen on mHC's PyTorch path, 1.1e-4 on its CPU kernel, every other
    tensor below 1e-5), with and without gradient accumulation. A misaligned cut gives
    differences near 1e-1."""
    kw = dict(train__num_epochs=2, train__eval_every=2, model__dropout_rate=0.0, **SCALE_SENSITIVE, **model_kw)
    run(small_config(data_file, tmp_path / "one", train__length_buckets=1, **kw))
    reference = params(tmp_path / "one" / "latest.pt")
    for buckets, accum in ((4, 1), (3, 2)):
        run_dir = tmp_path / f"b{buckets}a{accum}"
        run(small_config(data_file, run_dir, train__length_buckets=buckets, train__grad_accum_steps=accum, **kw))
        assert_close_parameters(reference, params(run_dir / "latest.pt"), 3e-4)
        assert train_losses(run_dir) == pytest.approx(train_losses(tmp_path / "one"), rel=1e-5)


def test_each_start_and_resume_records_its_provenance(data_file, tmp_path):
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    run(small_config(data_file, tmp_path / "r", train__num_epochs=2, run__resume=True))
    rows = [json.loads(line) for line in (tmp_path / "r" / "runs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 4]  # 4 steps per epoch: the resume starts after epoch 1
    assert all(r["torch"] == torch.__version__ and r["world_size"] == 1 and r["device"].startswith("CPU")
               for r in rows)
    assert rows[0]["code"] == provenance.code_version()  # a commit id in a git checkout, else None


def test_callbacks_see_every_row_the_run_writes(data_file, tmp_path):
    """Each event gets the row metrics.jsonl gets, in order; a resumed run continues the rows."""
    from seqrec.callbacks import Callback

    class Recorder(Callback):
        def __init__(self):
            self.events = []

        def on_train_start(self, trainer, row):
            self.events.append(("start", row))

        def on_step_logged(self, trainer, row):
            self.events.append(("logged", row))

        def on_validation(self, trainer, row):
            self.events.append(("valid", row))

        def on_train_end(self, trainer, row):
            self.events.append(("end", row))

    kw = dict(train__log_every=3, train__eval_every=2, train__length_buckets=1)
    first, second = Recorder(), Recorder()
    run(small_config(data_file, tmp_path / "r", train__num_epochs=2, **kw), callbacks=[first])
    run(small_config(data_file, tmp_path / "r", train__num_epochs=3, run__resume=True, **kw), callbacks=[second])
    for recorder, resumed in ((first, False), (second, True)):
        assert recorder.events[0][0] == "start" and recorder.events[0][1]["resumed"] is resumed
        assert recorder.events[-1][0] == "end" and "test" in recorder.events[-1][1]
    written = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    seen = [row for recorder in (first, second) for kind, row in recorder.events if kind in ("logged", "valid")]
    assert seen == [row for row in written if row["type"] != "test"]
    assert [r["type"] for r in written if r["type"] != "test"] == [
        "step", "train", "step", "train", "valid", "step", "train", "valid"]  # 4 steps per epoch, a row every 3


def test_a_run_without_test_never_evaluates_it(data_file, tmp_path, monkeypatch):
    import seqrec.trainer as trainer_module
    splits = []
    original = trainer_module.evaluate
    monkeypatch.setattr(trainer_module, "evaluate",
                        lambda model, split, *a: (splits.append(split), original(model, split, *a))[1])
    results = run(small_config(data_file, tmp_path / "r", train__num_epochs=1), test=False)
    assert "test" not in results and "valid" in results
    assert len(splits) == 2  # the epoch's validation and the best checkpoint's; a test pass would be a third
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert "test" not in {r["type"] for r in rows}

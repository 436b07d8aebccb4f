"""TensorBoard and MLflow sinks on real libraries: tiny runs, read back with each tool's reader."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from conftest import small_config, write_interactions
from seqrec import tracking
from seqrec.cli import main as cli_main
from seqrec.cli import run
from seqrec.config import ConfigError

MLFLOW_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_ALLOW_FILE_STORE")


@pytest.fixture(autouse=True)
def _restore_env():
    """The sinks set MLflow's env defaults in os.environ; give every test the environment it started with."""
    saved = {k: os.environ.get(k) for k in MLFLOW_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metric_names_for_mlflow():
    assert tracking.mlflow_name("sampled/NDCG@10") == "sampled/NDCG_at_10"
    assert tracking.mlflow_name("full/Recall@20") == "full/Recall_at_20"
    assert tracking.mlflow_name("train/seq_per_s") == "train/seq_per_s"
    assert tracking.mlflow_name("a%b") == "a_b"
    row = {"type": "train", "epoch": 2, "step": 8, "loss": 0.5, "lr": 1e-3, "seq_per_s_rank": [10.0, 12.0]}
    assert tracking.row_scalars(row) == {"train/loss": 0.5, "train/lr": 1e-3, "train/seq_per_s_rank/0": 10.0,
                                         "train/seq_per_s_rank/1": 12.0}


def test_missing_library_is_a_one_line_config_error(tmp_path, monkeypatch, capsys):
    data = write_interactions(tmp_path / "toy.txt")
    cfg = small_config(data, tmp_path / "run")
    cfg.track.mlflow = "sqlite:///x.db"
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets when it is not installed
    with pytest.raises(ConfigError, match=r"pip install 'seqrec\[track\]'"):
        tracking.from_config(cfg, tmp_path / "run")
    cfg.track.mlflow = None
    cfg.track.tensorboard = True
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"--tensorboard needs .*seqrec\[track\]"):
        tracking.from_config(cfg, tmp_path / "run")
    # Through the command line: exit code 2 and one line, before anything is written.
    code = cli_main(["--data_path", str(data), "--train_dir", str(tmp_path / "cli"), "--no_time", "--no_mhc",
                     "--device", "cpu", "--mlflow", "sqlite:///x.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "seqrec[track]" in err[0], err
    assert not (tmp_path / "cli").exists()
    cfg.track.tensorboard = False
    cfg.track.mlflow_experiment = "x"
    with pytest.raises(ConfigError, match="need --mlflow"):
        tracking.from_config(cfg, tmp_path / "run")


def test_tensorboard_event_files_and_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data = write_interactions(tmp_path / "toy.txt")
    run_dir = tmp_path / "run"
    cfg = small_config(data, run_dir, train__num_epochs=2, train__log_every=2, model__mhc=True,
                       model__mhc_expansion_rate=2, model__num_blocks=1)
    cfg.track.tensorboard = True
    run(cfg, test=False)

    def scalars():
        acc = EventAccumulator(str(run_dir))
        acc.Reload()
        return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    acc, got = scalars()
    written = rows(run_dir)
    train = [r for r in written if r["type"] == "train"]
    valid = [r for r in written if r["type"] == "valid"]
    steps = [r for r in written if r["type"] == "step"]
    assert steps, "log_every 2 should give step rows"
    for tag in ("train/loss", "train/lr", "train/seq_per_s", "sampled/NDCG@10", "full/NDCG@10",
                "mhc/gain_row", "mhc/gain_col", "best/sampled/NDCG@10", "best_epoch"):
        assert tag in got, (tag, sorted(got))
    assert [s for s, _ in got["train/seq_per_s"]] == [r["step"] for r in train]
    assert [s for s, _ in got["train/loss"]] == sorted(r["step"] for r in train + steps)
    assert [s for s, _ in got["sampled/NDCG@10"]] == [r["step"] for r in train]  # validated after each epoch
    assert [v for _, v in got["sampled/NDCG@10"]] == pytest.approx([r["sampled/NDCG@10"] for r in valid], rel=1e-6)
    assert [v for _, v in got["mhc/gain_row"]] == pytest.approx([r["mhc/gain_row"] for r in valid], rel=1e-6)
    assert not any(t.startswith("test/") for t in got), "test=False never evaluates the test split"

    # A resume continues the same event stream: every epoch's validation once, no duplicates.
    cfg.train.num_epochs, cfg.run.resume = 3, True
    run(cfg, test=False)
    _, got = scalars()
    valid = [r for r in rows(run_dir) if r["type"] == "valid"]
    assert len(valid) == 3
    assert [v for _, v in got["sampled/NDCG@10"]] == pytest.approx([r["sampled/NDCG@10"] for r in valid], rel=1e-6)
    # A fresh start (--overwrite) drops the old run's event files.
    cfg.train.num_epochs, cfg.run.resume, cfg.run.overwrite = 1, False, True
    run(cfg, test=False)
    _, got = scalars()
    assert len(got["sampled/NDCG@10"]) == 1
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes seconds)."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}", root


def test_mlflow_run_params_metrics_tags_artifacts_and_resume(tmp_path, mlflow_store, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient
    uri, store_root = mlflow_store
    monkeypatch.chdir(tmp_path)  # nothing may land in the current directory
    data = write_interactions(tmp_path / "toy.txt")
    run_dir = tmp_path / "runs" / "sasrec-small"
    cfg = small_config(data, run_dir, train__num_epochs=2, train__log_every=2)
    cfg.track.mlflow, cfg.track.mlflow_log_model = uri, True
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    run(cfg)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"  # set because it was unset

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sasrec-small")  # default: the run directory's name
    assert experiment is not None
    mlflow.set_tracking_uri(uri)
    try:
        frame = mlflow.search_runs(experiment_names=["sasrec-small"])
    finally:
        mlflow.set_tracking_uri(None)
    assert len(frame) == 1
    run_id = (run_dir / tracking.RUN_ID_FILE).read_text().strip()
    assert frame["run_id"][0] == run_id
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["hidden_units"] == "16" and got.data.params["loss"] == "bce"
    assert got.data.params["early_stop_patience"] == "0"
    tags = got.data.tags
    assert tags["variant"] == "sasrec" and tags["world_size"] == "1" and tags["device"] == "cpu"
    assert tags["amp"] == "off"
    written = rows(run_dir)
    valid = [r for r in written if r["type"] == "valid"]
    train = [r for r in written if r["type"] == "train"]
    history = client.get_metric_history(run_id, "sampled/NDCG_at_10")
    assert [m.step for m in history] == [r["step"] for r in train]
    assert [m.value for m in history] == pytest.approx([r["sampled/NDCG@10"] for r in valid])
    assert {"train/loss", "train/lr", "train/seq_per_s", "best/sampled/NDCG_at_10", "test/sampled/NDCG_at_10",
            "best_epoch"} <= set(got.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "results.json", "metrics.jsonl", "best.pt", "curves.png"} <= artifacts, artifacts
    artifact_dir = Path(got.info.artifact_uri.removeprefix("file://"))
    assert artifact_dir.is_relative_to(store_root) and (artifact_dir / "best.pt").exists()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()

    # Resume: the same MLflow run, params untouched, the changed setting as a tag.
    cfg.train.num_epochs, cfg.run.resume, cfg.train.early_stop_patience = 3, True, 5
    run(cfg)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    again = client.get_run(run_id)
    assert again.info.status == "FINISHED"
    assert again.data.params["early_stop_patience"] == "0"
    assert again.data.tags["changed.early_stop_patience"].startswith("0 -> 5")
    assert "changed.resume" not in again.data.tags
    steps = [m.step for m in client.get_metric_history(run_id, "sampled/NDCG_at_10")]
    assert steps == [r["step"] for r in rows(run_dir) if r["type"] == "train"]

    # --overwrite starts a new MLflow run.
    cfg.train.num_epochs, cfg.run.resume, cfg.run.overwrite = 1, False, True
    run(cfg, test=False)
    assert len(client.search_runs([experiment.experiment_id])) == 2
    assert (run_dir / tracking.RUN_ID_FILE).read_text().strip() != run_id


def test_mlflow_file_store_keeps_artifacts_in_the_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    data = write_interactions(tmp_path / "toy.txt")
    cfg = small_config(data, tmp_path / "run", train__num_epochs=1)
    cfg.track.mlflow, cfg.track.mlflow_experiment = "file:./store", "file-exp"
    run(cfg, test=False)
    client = MlflowClient(tracking_uri="file:./store")
    experiment = client.get_experiment_by_name("file-exp")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    assert Path(found.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path / "store")
    assert "sampled/NDCG_at_10" in found.data.metrics


def test_mlflow_server_down_is_reported_once_and_training_goes_on(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    data = write_interactions(tmp_path / "toy.txt")
    run_dir = tmp_path / "run"
    cfg = small_config(data, run_dir, train__num_epochs=2, train__log_every=2)
    cfg.track.mlflow = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    results = run(cfg)
    elapsed = time.monotonic() - start
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "mlflow" in line and "warning" in line]
    assert len(warnings) == 1, out
    assert "logging is off" in warnings[0] and "metrics.jsonl is complete" in warnings[0]
    assert elapsed < 60
    written = rows(run_dir)
    assert [r["epoch"] for r in written if r["type"] == "valid"] == [1, 2]
    assert [r["type"] for r in written].count("test") == 1 and "test" in results
    assert not (run_dir / tracking.RUN_ID_FILE).exists()


def test_only_the_main_rank_logs(tmp_path, monkeypatch):
    import types

    import torch
    cfg = small_config(tmp_path / "toy.txt", tmp_path / "run")
    cfg.track.mlflow = f"sqlite:///{tmp_path / 'never.db'}"
    sinks = [tracking.MLflowSink(cfg, tmp_path / "run"), tracking.TensorBoardSink(tmp_path / "run")]
    trainer = types.SimpleNamespace(step=0, epoch=0, device=torch.device("cpu"), cfg=cfg, amp_dtype=None)
    monkeypatch.setattr(tracking.dist, "is_main", lambda: False)
    (tmp_path / "run").mkdir()
    for sink in sinks:
        sink.on_train_start(trainer, {"type": "start", "step": 0, "epoch": 0, "resumed": False})
        sink.on_validation(trainer, {"type": "valid", "epoch": 1, "sampled/NDCG@10": 0.5})
        sink.on_train_end(trainer, {"best_epoch": 1, "epochs": 1, "valid": {"sampled/NDCG@10": 0.5}})
    assert sinks[0].client is None and sinks[1].writer is None
    assert list((tmp_path / "run").iterdir()) == [] and not (tmp_path / "never.db").exists()

"""The Python API: seqrec.fit on data frames, files and arrays, and seqrec.load."""
from __future__ import annotations

import json

import pytest

import seqrec
from conftest import write_interactions
from seqrec.config import ConfigError
from seqrec.trainer import TrainingError

TINY = dict(maxlen=20, hidden_units=16, num_blocks=1, num_heads=2, time=False, mhc=False, num_epochs=2,
            batch_size=16, eval_every=1, warmup_steps=2, eval_negatives=20, device="cpu")


@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    """The toy interactions as a pandas frame with MovieLens column names, and as a CSV file."""
    pd = pytest.importorskip("pandas")
    path = write_interactions(tmp_path_factory.mktemp("api") / "toy.txt")
    df = pd.read_csv(path, sep=" ", names=["userId", "movieId", "timestamp"])
    csv = path.with_suffix(".csv")
    df.to_csv(csv, index=False)
    return df, csv


def results(run_dir):
    """results.json without its wall time."""
    out = json.loads((run_dir / "results.json").read_text())
    del out["train_seconds"]
    return out


def test_fit_on_a_frame_equals_fit_on_its_csv(frame, tmp_path):
    df, csv = frame
    rec = seqrec.fit(df, user_col="userId", item_col="movieId", time_col="timestamp",
                     train_dir=str(tmp_path / "frame"), **TINY)
    seqrec.fit(csv, train_dir=str(tmp_path / "csv"), **TINY)
    assert results(tmp_path / "frame") == results(tmp_path / "csv")
    ids, scores = rec.recommend(["1", "7"], k=5)
    assert ids.shape == scores.shape == (2, 5)
    assert (rec.recommend([1, 7], k=5)[0] == ids).all()
    loaded = seqrec.load(tmp_path / "frame")
    assert (loaded.recommend(["1", "7"], k=5)[0] == ids).all()
    assert loaded.evaluate()["test"] == pytest.approx(results(tmp_path / "frame")["test"], abs=1e-6)


def test_fit_on_polars_arrow_parquet_and_arrays_gives_the_same_run(frame, tmp_path):
    df, _ = frame
    expected = None
    sources = {"arrays": (df.userId.to_numpy(), df.movieId.to_numpy(), df.timestamp.to_numpy())}
    pl = pytest.importorskip("polars")
    pa = pytest.importorskip("pyarrow")
    sources["polars"] = pl.from_pandas(df)
    sources["arrow"] = pa.Table.from_pandas(df)
    df.to_parquet(tmp_path / "toy.parquet")
    sources["parquet"] = tmp_path / "toy.parquet"
    for name, data in sources.items():
        seqrec.fit(data, train_dir=str(tmp_path / name), **{**TINY, "num_epochs": 1})
        expected = expected or results(tmp_path / name)
        assert results(tmp_path / name) == expected, name


def test_a_frame_run_resumes_only_on_the_same_frame(frame, tmp_path):
    df, _ = frame
    seqrec.fit(df, train_dir=str(tmp_path / "r"), **{**TINY, "num_epochs": 1})
    seqrec.fit(df, train_dir=str(tmp_path / "r"), resume=True, **TINY)  # one more epoch
    assert results(tmp_path / "r")["epochs"] == 2
    later = df.assign(timestamp=df.timestamp.where(df.index != 3, df.timestamp + 1))
    with pytest.raises(TrainingError, match="the interactions differ from the ones the checkpoint was trained on"):
        seqrec.fit(later, train_dir=str(tmp_path / "r"), resume=True, **{**TINY, "num_epochs": 3})


def test_options_are_the_flags_checked_as_on_the_command_line(frame, tmp_path):
    df, _ = frame
    with pytest.raises(ConfigError, match="seqrec.fit: unknown key 'num_epoch'"):
        seqrec.fit(df, train_dir=str(tmp_path / "r"), num_epoch=3)
    with pytest.raises(ConfigError, match="hidden_units"):
        seqrec.fit(df, train_dir=str(tmp_path / "r"), **{**TINY, "hidden_units": 15})
    assert not (tmp_path / "r").exists()


def test_precedence_is_preset_then_config_file_then_options(tmp_path):
    from seqrec.api import build_config
    cfg = build_config("gsasrec", None, {"data_path": "x.txt"})
    assert cfg.train.loss == "gbce" and cfg.data.dataset is None  # the demo only when nothing names data
    config = tmp_path / "c.yaml"
    config.write_text("loss: bce\nlr: 0.01\n")
    cfg = build_config("gsasrec", config, {"data_path": "x.txt", "lr": 0.002})
    assert cfg.train.loss == "bce" and cfg.train.lr == 0.002
    assert build_config(None, None, {}).data.dataset == "demo"
    assert build_config(None, None, {}, in_memory=True).train.train_dir == "runs/fit"

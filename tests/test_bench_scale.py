"""The scale benchmark end to end at a tiny size: file, pipeline stages in subprocesses, epoch rows."""
import json

import numpy as np
import pytest

from seqrec.tools import bench_scale
from seqrec.data import build_sequences, read_interactions


def test_ml20m_like_file_has_the_asked_shape(tmp_path):
    info = bench_scale.write_ratings(tmp_path / "ratings.csv", 500)
    data = read_interactions(str(tmp_path / "ratings.csv"))
    assert len(data.users) == info["interactions"] == round(20_000_263 * 500 / 138_493)
    assert len(np.unique(data.users)) == 500 and len(np.unique(data.items)) == info["items"]
    seqs = build_sequences(data)
    assert seqs.lengths.min() >= 20
    assert all(np.all(np.diff(seqs.times[a:b]) >= 0) for a, b in zip(seqs.offsets[:-1], seqs.offsets[1:]))


def test_scale_bench_reports_every_stage_and_fraction(tmp_path):
    out = tmp_path / "out"
    assert bench_scale.main(["--users", "300", "--workdir", str(tmp_path), "--fractions", "0.5,1",
                             "--size", "L50", "--steps", "1", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["stage"] for r in result["pipeline"]] == ["read", "sequences", "tensors"]
    tensors = result["pipeline"][-1]
    assert tensors["total_s"] >= tensors["read_s"] + tensors["sequences_s"] + tensors["tensors_s"] - 1e-6
    assert tensors["peak_rss_gb"] > 0 and tensors["users"] <= 300
    assert [r["users"] for r in result["epoch"]] == [150, 300]
    assert [r["steps_per_epoch"] for r in result["epoch"]] == [2, 3]  # B=128 over every user (all have >= 20)
    assert all(r["epoch_est_s"] == pytest.approx(r["s_per_step"] * r["steps_per_epoch"]) for r in result["epoch"])
    assert "| tensors |" in (out / "results.md").read_text()
    assert list(tmp_path.iterdir()) == [out]  # the synthetic file went with its temporary directory

"""The command line as a user meets it: one-line errors and exit codes, the ML-1M path end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA

ML1M_HALF = SHARED_DATA / "ml-1m-half" / "ratings.dat"


def main_py(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "main.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


TINY = ["--device", "cpu", "--maxlen", "10", "--hidden_units", "8", "--num_heads", "1", "--num_epochs", "1",
        "--no_time", "--no_mhc"]


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"1 2 100\n1 3 abc\n", ":2: timestamp"),
    (b"1 2 100\n1 3 200 4 5\n", ":2: expected 3 fields"),
    (b"\x00\x01\x02garbage\xff\xfe", "not a text file"),
    (b"1 2 100\n2 3 100\n3 4 100\n", "no user has the 2 interactions"),
])
def test_bad_data_is_one_line_error(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    result = main_py("--data_path", path, "--train_dir", tmp_path / "run", *TINY)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_is_one_line_error(tmp_path):
    result = main_py("--dataset", "demo", "--hidden_units", "10", "--num_heads", "3")
    assert result.returncode == 2 and result.stderr.strip() == \
        "error: hidden_units (10) must be divisible by num_heads (3)"


def test_missing_dataset_names_the_fix(tmp_path):
    result = main_py("--dataset", "ml-1m", cwd=tmp_path)
    assert result.returncode == 2 and "convert_ml1m.py" in result.stderr


def test_corrupt_checkpoint_is_one_line_error(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    result = main_py("--dataset", "demo", "--inference_only", "--state_dict_path", bad)
    assert result.returncode == 1 and "not a readable seqrec checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.skipif(not ML1M_HALF.exists(), reason="../shared/data/ml-1m-half is not on this machine")
def test_ml1m_end_to_end(tmp_path):
    """ratings.dat -> data/convert_ml1m.py -> main.py --dataset=ml-1m, one epoch, in a scratch working dir."""
    (tmp_path / "data").mkdir()
    convert = subprocess.run([sys.executable, str(REPO / "data" / "convert_ml1m.py"), "--ratings", str(ML1M_HALF),
                              "--out", str(tmp_path / "data" / "ml-1m.txt")], capture_output=True, text=True)
    assert convert.returncode == 0, convert.stderr
    result = main_py("--dataset=ml-1m", "--train_dir=run", "--no_time", "--no_mhc", "--num_epochs=1",
                     "--device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2,999 users, 3,266 items" in result.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 < results["test"]["sampled/NDCG@10"] < 1 and results["best_epoch"] == 1

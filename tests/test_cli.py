"""The command line as a user meets it: one-line errors and exit codes, the ML-1M path end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seqrec
from conftest import REPO, SHARED_DATA
from seqrec import checkpoint as ckpt
from seqrec.cli import console

ML1M_HALF = SHARED_DATA / "ml-1m-half" / "ratings.dat"


def main_py(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "main.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


TINY = ["--device", "cpu", "--maxlen", "10", "--hidden_units", "8", "--num_heads", "1", "--num_epochs", "1",
        "--no_time", "--no_mhc", "--eval_negatives", "20"]  # the toy data has 40 items


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"1 2 100\n1 3 abc\n", ":2: timestamp"),
    (b"1 2 100\n1 3 200 4 5\n", ":2: expected 3 fields"),
    (b"\x00\x01\x02garbage\xff\xfe", "not a text file"),
    (b"1 2 100\n2 3 100\n3 4 100\n", "no user has the 2 interactions"),
    ("1 2 100\n1 3 200\n".encode("utf-16"), "the file is UTF-16LE (byte-order mark); convert it: iconv"),
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


class _Payload:
    """Pickled, it calls open(marker, "w") when unpickled: code a checkpoint must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_malicious_checkpoint_runs_no_code_in_any_command(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "config": {}, "payload": _Payload(marker)}, evil)
    torch.load(evil, weights_only=False)["payload"].close()  # the payload runs where a loader unpickles code
    assert marker.exists()
    marker.unlink()
    commands = [["evaluate", "--dataset", "demo", "--state_dict_path", str(evil)],
                ["recommend", "--checkpoint", str(evil), "--user", "1"],
                ["export", "--checkpoint", str(evil), "--out", str(tmp_path / "m.pt2")]]
    for argv in commands:
        capsys.readouterr()
        assert console(argv) != 0, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "evil.pt" in err, (argv, err)
    with pytest.raises(ckpt.CheckpointError):
        seqrec.load(evil)
    assert not marker.exists()


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


@pytest.mark.parametrize("flags, message", [
    (["--select_metric", "sampled/FOO@10"], "select_metric must be a metric the evaluation reports"),
    (["--topk", "5,10", "--select_metric", "full/NDCG@20"], "with K in topk [5, 10]; got 'full/NDCG@20'"),
    (["--lr", "nan"], "--lr: 'lr' expects float (finite), got 'nan'"),
    (["--l2_emb", "nan"], "--l2_emb: 'l2_emb' expects float (finite), got 'nan'"),
    (["--device", "mps"], "device must be cpu, cuda or cuda:N, got 'mps'"),
    (["--seed", "12345678901234567890123"], "--seed: 'seed' expects int (64-bit), got '12345678901234567890123'"),
])
def test_bad_flags_are_refused_before_training(data_file, tmp_path, capsys, flags, message):
    """Refused at start-up by validation: a bad select_metric was a KeyError after the first
    validation, NaN trained with lr 0 / no penalty, mps failed in torch, a long seed in manual_seed."""
    from seqrec.cli import main
    assert main(["--data_path", str(data_file), "--train_dir", str(tmp_path / "run"), *TINY, *flags]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: ") and message in out.err and out.err.count("\n") == 1
    assert out.out == "" and not (tmp_path / "run").exists()  # nothing loaded, nothing written


def test_binary_config_file_is_one_line_error(tmp_path, capsys):
    from seqrec.cli import main
    binary = tmp_path / "best.pt"
    binary.write_bytes(bytes(range(256)))
    assert main(["--config", str(binary)]) == 2
    assert capsys.readouterr().err == f"error: {binary}: not a YAML config (binary data or not UTF-8 text)\n"


def train_into(run_dir, data_file, capsys) -> str:
    """Train TINY into run_dir; the one line main() printed on stderr."""
    from seqrec.cli import main
    assert main(["--data_path", str(data_file), "--train_dir", str(run_dir), *TINY]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write into (skipped as root, whom chmod does not stop)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: chmod does not stop this process from writing")
        yield locked
    finally:
        locked.chmod(0o755)


def test_read_only_run_dir(data_file, read_only_dir, capsys):
    assert train_into(read_only_dir / "run", data_file, capsys) == \
        f"error: cannot write {read_only_dir / 'run'}: Permission denied\n"


def test_run_dir_below_a_file(data_file, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file, not a directory")
    assert train_into(tmp_path / "taken" / "run", data_file, capsys) == \
        f"error: cannot write {tmp_path / 'taken' / 'run'}: Not a directory\n"


def test_disk_full_is_one_line_error(data_file, tmp_path):
    """RLIMIT_FSIZE makes write() fail with EFBIG, as a full disk does with ENOSPC (SIGXFSZ, which
    would kill the process first, is ignored, and stays ignored across exec). 1000 bytes: the
    run's config.yaml (about 1.4 kB) is the first file that does not fit."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "main.py"), "--data_path", str(data_file), "--train_dir",
                             str(tmp_path / "run"), *TINY], env=env, capture_output=True, text=True, timeout=600,
                            preexec_fn=limit)
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"error: cannot write {tmp_path / 'run' / 'config.yaml'}: File too large\n"
    assert result.stderr.count("\n") == 1


@pytest.fixture
def checkpoint(data_file, tmp_path):
    from conftest import small_config
    from seqrec.cli import run
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    return tmp_path / "r" / "best.pt"


def export_error(checkpoint, out, capsys) -> str:
    from seqrec.cli import console
    assert console(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_export_to_a_directory(checkpoint, tmp_path, capsys):
    """torch's writer raised '[enforce fail at inline_container.cc] ... Is a directory'."""
    assert export_error(checkpoint, tmp_path, capsys) == f"error: cannot write {tmp_path}: Is a directory\n"


def test_export_into_a_read_only_directory(checkpoint, read_only_dir, capsys):
    out = read_only_dir / "m.pt"
    assert export_error(checkpoint, out, capsys) == f"error: cannot write {out}: Permission denied\n"


def test_eval_negatives_beyond_the_catalogue(data_file, tmp_path, capsys):
    """Refused once the data is read, before any training (it used to spin in the sampler for minutes)."""
    from seqrec.cli import main
    assert main(["--data_path", str(data_file), "--train_dir", str(tmp_path / "run"), *TINY,
                 "--eval_negatives", "1000000"]) == 2
    assert capsys.readouterr().err == (f"error: --eval_negatives 1000000 is more than the 39 items a user of "
                                       f"{data_file} (40 items) can have left unseen; pass at most 39\n")
    assert not (tmp_path / "run").exists()

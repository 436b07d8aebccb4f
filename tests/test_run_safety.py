"""No run is lost or silently corrupted: refused starts leave the old run as it was, one run at
a time per directory, resumes that would change the data order are refused, and a signal
stops training with a checkpoint from which the run continues exactly."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, metric_rows, small_config
from seqrec import checkpoint as ckpt
from seqrec.cli import run
from seqrec.config import ConfigError
from seqrec.data import DataError
from seqrec.preemption import Preempted
from seqrec.runlock import RunLock
from seqrec.trainer import Trainer, TrainingError

def snapshot(run_dir):
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}


def test_refused_overwrite_and_resume_leave_the_old_run_untouched(data_file, tmp_path):
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    before = snapshot(tmp_path / "r")
    with pytest.raises(DataError):
        run(small_config(tmp_path / "missing.txt", tmp_path / "r", run__overwrite=True))
    with pytest.raises(TrainingError, match="--hidden_units 32 differs"):
        run(small_config(data_file, tmp_path / "r", run__resume=True, model__hidden_units=32))
    assert snapshot(tmp_path / "r") == before


def test_a_run_killed_between_its_two_saves_still_counts_as_a_run(data_file, tmp_path):
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    (tmp_path / "r" / "latest.pt").unlink()  # best.pt and metrics remain
    with pytest.raises(ConfigError, match="already holds a run"):
        run(small_config(data_file, tmp_path / "r"))
    with pytest.raises(ConfigError, match="no latest.pt to resume from"):
        run(small_config(data_file, tmp_path / "r", run__resume=True))


def test_a_second_run_on_a_locked_directory_is_refused(data_file, tmp_path):
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    holder = RunLock(tmp_path / "r").acquire()  # as another live run would hold it
    try:
        for kw in ({"run__resume": True}, {"run__overwrite": True}):
            with pytest.raises(ConfigError, match=rf"in use by another run \(host .*, pid {os.getpid()}\)"):
                run(small_config(data_file, tmp_path / "r", train__num_epochs=2, **kw))
    finally:
        holder.release()
    run(small_config(data_file, tmp_path / "r", train__num_epochs=2, run__resume=True))  # free again


def test_a_killed_holder_releases_its_lock(tmp_path):
    code = ("import sys, time; from seqrec.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "r")], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        RunLock(tmp_path / "r").acquire()
    holder.kill()
    holder.wait()
    RunLock(tmp_path / "r").acquire().release()


def test_a_refused_start_in_a_new_directory_leaves_nothing_behind(tmp_path):
    with pytest.raises(DataError):
        run(small_config(tmp_path / "missing.txt", tmp_path / "new"))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("change, shown", [
    ({"train__batch_size": 8}, "--batch_size 16 -> 8"),
    ({"train__seed": 7}, "--seed 42 -> 7"),
    ({"data__min_user_count": 10}, "--min_user_count 0 -> 10"),
])
def test_resume_refuses_what_changes_the_data_order(data_file, tmp_path, change, shown):
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1, train__save_every_steps=2))
    with pytest.raises(TrainingError, match=shown):
        run(small_config(data_file, tmp_path / "r", train__num_epochs=2, run__resume=True, **change))


def test_resume_accepts_regrouping_and_resets_a_best_score_measured_otherwise(data_file, tmp_path, capsys):
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    capsys.readouterr()
    run(small_config(data_file, tmp_path / "r", train__num_epochs=2, run__resume=True, train__grad_accum_steps=2,
                     train__length_buckets=3, eval__select_metric="full/NDCG@10"))
    out = capsys.readouterr().out
    assert "select_metric changed since the checkpoint" in out and "is reset" in out
    assert ckpt.load(tmp_path / "r" / "best.pt")["epoch"] == 2  # chosen anew on the new metric


@pytest.mark.parametrize("name", ["config.yaml", "results.json"])
def test_small_run_files_are_replaced_whole_or_not_at_all(data_file, tmp_path, monkeypatch, name):
    """A write that fails at the rename (a crash, a full disk) leaves the previous file as it was
    and no temporary file behind."""
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    before = (tmp_path / "r" / name).read_bytes()
    real_replace = os.replace

    def failing(src, dst):
        if os.path.basename(dst) == name:
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        run(small_config(data_file, tmp_path / "r", train__num_epochs=2, run__resume=True))
    assert (tmp_path / "r" / name).read_bytes() == before
    assert not [p.name for p in (tmp_path / "r").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("method, at, step", [("train_step", 5, 6), ("save", 4, 4)])
def test_a_signal_in_training_saves_and_the_resumed_run_is_the_uninterrupted_one(data_file, tmp_path, monkeypatch,
                                                                                 capsys, method, at, step):
    """SIGTERM inside step 6 (epoch 2 of 4-step epochs), or inside the checkpoint write that
    ends epoch 1: what it interrupts ends first, latest.pt is written at that step (with the
    epoch's partial loss), and the resumed run logs the same rows and ends with the same
    weights; a torn last metrics row (a write cut short) is skipped."""
    kw = dict(train__num_epochs=3, train__length_buckets=1)
    run(small_config(data_file, tmp_path / "straight", **kw))
    original = getattr(Trainer, method)

    def signalled(self, *args):
        if self.step == at and self.stops.signum is None and args[-1] != ckpt.BEST:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)

    monkeypatch.setattr(Trainer, method, signalled)
    with pytest.raises(Preempted, match=f"SIGTERM: stopped at step {step}"):
        run(small_config(data_file, tmp_path / "split", **kw))
    monkeypatch.setattr(Trainer, method, original)
    assert ckpt.load(tmp_path / "split" / "latest.pt")["step"] == step
    assert not list((tmp_path / "split").glob(".*.tmp"))
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "epo')
    capsys.readouterr()
    run(small_config(data_file, tmp_path / "split", run__resume=True, **kw))
    assert len(re.findall(r"metrics.jsonl:[0-9]+: skipping a torn metrics row", capsys.readouterr().out)) == 1
    assert metric_rows(tmp_path / "split") == metric_rows(tmp_path / "straight")
    a, b = ckpt.load(tmp_path / "straight" / "latest.pt"), ckpt.load(tmp_path / "split" / "latest.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_signal_during_evaluation_stops_at_once(data_file, tmp_path, monkeypatch):
    """A validation pass is not waited for (it can outlast a preemption's grace period): the run
    stops inside it, and latest.pt is the one written when the epoch before ended."""
    from seqrec import trainer as trainer_module
    evaluated = []

    def signalled(model, split, *args, **kw):
        if len(evaluated) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        evaluated.append(True)  # not reached by the signalled call: the handler raises first
        return original(model, split, *args, **kw)

    original = trainer_module.evaluate
    monkeypatch.setattr(trainer_module, "evaluate", signalled)
    with pytest.raises(Preempted, match="SIGTERM received"):
        run(small_config(data_file, tmp_path / "r", train__num_epochs=3, train__length_buckets=1))
    assert len(evaluated) == 1
    assert ckpt.load(tmp_path / "r" / "latest.pt")["epoch"] == 1
    assert [r["epoch"] for r in metric_rows(tmp_path / "r") if r["type"] == "valid"] == [1]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_command_exits_128_plus_it_with_a_checkpoint(data_file, tmp_path, signum, code):
    flags = ["--data_path", str(data_file), "--device", "cpu", "--no_time", "--no_mhc", "--maxlen", "20",
             "--hidden_units", "16", "--batch_size", "16", "--eval_every", "1000", "--eval_negatives", "20",
             "--num_epochs", "400", "--save_every_steps", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), "--train_dir", str(tmp_path / "r"), *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "r" / "latest.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"stopped: {signal.Signals(signum).name}: stopped at step")
    assert not list((tmp_path / "r").glob(".*.tmp"))
    step = ckpt.load(tmp_path / "r" / "latest.pt")["step"]
    assert step > 0 and f"at step {step} " in err

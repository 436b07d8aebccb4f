"""Two gloo ranks on CPU train and evaluate exactly like one process."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import SCALE_SENSITIVE, assert_close_parameters, metric_rows, small_config, train_losses, write_interactions
from seqrec import checkpoint as ckpt
from seqrec.cli import run
from seqrec.distributed import become_local_rank, free_port


def _rank_main(rank, world, port, cfg):
    become_local_rank(rank, world, port)
    torch.set_num_threads(1)
    run(cfg)


def _rank_signalled_at(rank, world, port, cfg, at):
    """A rank of which only rank 1 gets SIGTERM, inside step `at` (as one node of a job might)."""
    import signal

    from seqrec.trainer import Trainer
    original = Trainer.train_step

    def train_step(self, *args):
        if rank == 1 and self.step == at - 1 and self.stops.signum is None:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)

    Trainer.train_step = train_step
    _rank_main(rank, world, port, cfg)


def test_ranks_stop_together_at_the_log_boundary_after_one_got_a_signal(data_file, tmp_path):
    """Rank 1 alone is signalled in step 3; with --log_every 2 both ranks learn it at step 4's
    boundary, save one checkpoint there and stop; resumed, the run equals an uninterrupted one."""
    from torch.multiprocessing import ProcessRaisedException
    kw = dict(dist__multi_gpu=True, train__num_epochs=2, train__log_every=2, train__length_buckets=1)
    mp.start_processes(_rank_main, args=(2, free_port(), small_config(data_file, tmp_path / "straight", **kw)),
                       nprocs=2, start_method="spawn")
    with pytest.raises(ProcessRaisedException, match="SIGTERM: stopped at step 4"):
        split = small_config(data_file, tmp_path / "split", **kw)
        mp.start_processes(_rank_signalled_at, args=(2, free_port(), split, 3), nprocs=2, start_method="spawn")
    assert ckpt.load(tmp_path / "split" / "latest.pt")["step"] == 4
    resumed = small_config(data_file, tmp_path / "split", run__resume=True, **kw)
    mp.start_processes(_rank_main, args=(2, free_port(), resumed), nprocs=2, start_method="spawn")
    a, b = ckpt.load(tmp_path / "straight" / "latest.pt"), ckpt.load(tmp_path / "split" / "latest.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert metric_rows(tmp_path / "split") == metric_rows(tmp_path / "straight")


@pytest.mark.parametrize("num_users, batch_size, accum", [
    (60, 16, 1),  # last global batch of 12 users: 6 per rank
    (59, 58, 1),  # last global batch of 1 user: rank 1 has nothing to do but must take part
    (60, 16, 2),  # gradient accumulation: 2 micro-batches of 4 users per rank and step
])
def test_two_ranks_equal_one_process(tmp_path, num_users, batch_size, accum):
    data_file = write_interactions(tmp_path / "toy.txt", num_users=num_users)
    kw = dict(train__num_epochs=2, train__batch_size=batch_size, train__grad_accum_steps=accum,
              model__dropout_rate=0.0, train__eval_every=1, **SCALE_SENSITIVE)
    single = run(small_config(data_file, tmp_path / "one", **{**kw, "train__grad_accum_steps": 1}))
    cfg = small_config(data_file, tmp_path / "two", dist__multi_gpu=True, **kw)
    mp.start_processes(_rank_main, args=(2, free_port(), cfg), nprocs=2, start_method="spawn")
    a, b = ckpt.load(tmp_path / "one" / "latest.pt"), ckpt.load(tmp_path / "two" / "latest.pt")
    assert a["step"] == b["step"]
    assert_close_parameters(a["model"], b["model"], 1e-5)  # float32: only summation order differs
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(tmp_path / "one"), rel=1e-5)
    assert_metrics_close(single, json.loads((tmp_path / "two" / "results.json").read_text()))


def assert_metrics_close(expected: dict, actual: dict) -> None:
    for split in ("valid", "test"):
        for metric, value in expected[split].items():
            assert actual[split][metric] == pytest.approx(value, abs=1e-4), (split, metric)


def test_checkpoints_resume_across_world_sizes(data_file, tmp_path, capfd):
    """A 2-rank run's checkpoint continues in 1 process, and a 1-process one in 2 ranks: each
    resumes at the saved step, trains the remaining epochs and, with dropout off (the RNG
    streams are the only state that does not carry over between world sizes), ends where the
    uninterrupted 1-process run ends, up to float summation order."""
    kw = dict(model__dropout_rate=0.0, train__eval_every=1)
    reference = run(small_config(data_file, tmp_path / "ref", train__num_epochs=4, **kw))

    def two_ranks(run_dir, **overrides):
        cfg = small_config(data_file, tmp_path / run_dir, dist__multi_gpu=True, **kw, **overrides)
        mp.start_processes(_rank_main, args=(2, free_port(), cfg), nprocs=2, start_method="spawn")

    two_ranks("2to1", train__num_epochs=2)
    run(small_config(data_file, tmp_path / "2to1", train__num_epochs=4, run__resume=True, **kw))
    run(small_config(data_file, tmp_path / "1to2", train__num_epochs=2, **kw))
    two_ranks("1to2", train__num_epochs=4, run__resume=True)
    assert capfd.readouterr().out.count("at epoch 2 + 0 steps (step 8)") == 2  # 4 steps per epoch

    def train_rows(run_dir):
        rows = [json.loads(line) for line in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["type"] == "train"]

    ref_rows, ref_state = train_rows("ref"), ckpt.load(tmp_path / "ref" / "latest.pt")
    for run_dir, ranks in (("2to1", [2, 2, 1, 1]), ("1to2", [1, 1, 2, 2])):
        rows = train_rows(run_dir)
        assert [(r["epoch"], r["step"]) for r in rows] == [(r["epoch"], r["step"]) for r in ref_rows]
        assert [len(r["seq_per_s_rank"]) for r in rows] == ranks  # the world size of each epoch
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-5)
        state = ckpt.load(tmp_path / run_dir / "latest.pt")
        assert (state["epoch"], state["step"]) == (ref_state["epoch"], ref_state["step"])
        assert_close_parameters(ref_state["model"], state["model"], 1e-5)
        assert_metrics_close(reference, json.loads((tmp_path / run_dir / "results.json").read_text()))


def _torchrun(tmp_path, run_dir, data_file, extra_env=None, *extra):
    import subprocess
    import sys

    from conftest import REPO
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(REPO / "main.py"),
           "--data_path", str(data_file), "--train_dir", str(run_dir), "--device", "cpu", "--multi_gpu",
           "--no_time", "--no_mhc", "--maxlen", "20", "--hidden_units", "16", "--batch_size", "16",
           "--num_epochs", "2", "--eval_every", "2", "--dropout_rate", "0", "--eval_negatives", "20", *extra]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_rank_death_restarts_and_matches_uninterrupted(data_file, tmp_path):
    """torchrun --max-restarts=1: rank 1 dies after step 7 (mid-epoch 2); the restarted group resumes
    by itself from the step-6 checkpoint and ends with the uninterrupted run's parameters."""
    clean = _torchrun(tmp_path, tmp_path / "clean", data_file, None, "--master_port", str(free_port()))
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert "is ignored: the launcher set MASTER_PORT" in clean.stdout  # the user's own torchrun owns the port
    faulty = _torchrun(tmp_path, tmp_path / "faulty", data_file, {"SEQREC_FAULT_AT_STEP": "7"},
                       "--save_every_steps", "2")
    assert faulty.returncode == 0, faulty.stderr[-2000:]
    assert "resuming from the latest checkpoint" in faulty.stdout
    assert "at epoch 1 + 2 steps (step 6)" in faulty.stdout  # the mid-epoch checkpoint (4 steps per epoch)
    a, b = ckpt.load(tmp_path / "clean" / "latest.pt"), ckpt.load(tmp_path / "faulty" / "latest.pt")
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # every rank's loss shares of the unfinished epoch came back: the logged rows are the same
    assert metric_rows(tmp_path / "faulty") == metric_rows(tmp_path / "clean")


def test_a_locked_run_directory_stops_every_rank_with_one_line(data_file, tmp_path):
    """Under torchrun the main rank takes the lock and broadcasts a refusal: rank 1 must exit
    with it too, not wait in a collective for a rank 0 that has gone."""
    from seqrec.runlock import RunLock
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    holder = RunLock(run_dir).acquire()  # as another live run would hold it
    try:
        result = _torchrun(tmp_path, run_dir, data_file, None, "--overwrite")
    finally:
        holder.release()
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if "in use by another run" in line]
    assert len(refusals) >= 2 and all(line.startswith("error: ") for line in refusals), result.stderr[-2000:]
    assert "rank      : 1 (local_rank: 1)\n  exitcode  : 2" in result.stderr  # rank 1 refused too (ours: 2)
    assert [p.name for p in run_dir.iterdir()] == [".lock"]  # nothing written


def test_launcher_and_environment_check_run_end_to_end(tmp_path):
    """train_distributed.sh (2 gloo CPU processes, on the --master_port it is given) on the demo
    data, and test_distributed.py alone (spawning its own 2 processes) and under torchrun."""
    import subprocess
    import sys

    from conftest import REPO
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NUM_GPUS": "2"}
    launch = subprocess.run([str(REPO / "train_distributed.sh"), "demo", str(tmp_path / "run"), "--num_epochs", "1",
                             "--maxlen", "20", "--hidden_units", "16", "--no_time", "--no_mhc",
                             "--master_port", str(free_port())], env=env, capture_output=True, text=True, timeout=300)
    assert launch.returncode == 0, launch.stderr[-2000:]
    assert "world size 2" in launch.stdout and (tmp_path / "run" / "results.json").exists()
    assert "is ignored" not in launch.stdout  # the workers' MASTER_PORT is the one given
    envcheck = [str(REPO / "test_distributed.py"), "--cpu", "--sizes", "1K,1M"]
    alone = subprocess.run([sys.executable, *envcheck], env=env, capture_output=True, text=True, timeout=300)
    under = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            *envcheck], env=env, capture_output=True, text=True, timeout=300)
    for result in (alone, under):
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        for line in ("PASS  process group init      gloo, 2 processes on cpu", "PASS  all_reduce bfloat16",
                     "PASS  all_reduce bandwidth", "PASS  broadcast", "PASS  barrier", "PASS  DDP smoke SASRec",
                     "PASS  DDP smoke TiSASRec+mHC", "environment OK: ", ", 0 FAIL"):
            assert line in result.stdout, (line, result.stdout)
        assert result.stdout.count("environment OK") == 1  # printed by rank 0 only

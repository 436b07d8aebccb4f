"""Two gloo ranks on CPU train and evaluate exactly like one process."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import small_config, write_interactions
from seqrec import checkpoint as ckpt
from seqrec.cli import run
from seqrec.distributed import become_local_rank, free_port


def _rank_main(rank, world, port, cfg):
    become_local_rank(rank, world, port)
    torch.set_num_threads(1)
    run(cfg)


@pytest.mark.parametrize("num_users, batch_size, accum", [
    (60, 16, 1),  # last global batch of 12 users: 6 per rank
    (59, 58, 1),  # last global batch of 1 user: rank 1 has nothing to do but must take part
    (60, 16, 2),  # gradient accumulation: 2 micro-batches of 4 users per rank and step
])
def test_two_ranks_equal_one_process(tmp_path, num_users, batch_size, accum):
    data_file = write_interactions(tmp_path / "toy.txt", num_users=num_users)
    kw = dict(train__num_epochs=2, train__batch_size=batch_size, train__grad_accum_steps=accum,
              model__dropout_rate=0.0, train__eval_every=1)
    single = run(small_config(data_file, tmp_path / "one", **{**kw, "train__grad_accum_steps": 1}))
    cfg = small_config(data_file, tmp_path / "two", dist__multi_gpu=True, **kw)
    mp.start_processes(_rank_main, args=(2, free_port(), cfg), nprocs=2, start_method="spawn")
    a, b = ckpt.load(tmp_path / "one" / "latest.pt"), ckpt.load(tmp_path / "two" / "latest.pt")
    assert a["step"] == b["step"]
    for name, value in a["model"].items():
        other = b["model"][name]
        if name.endswith("qkv.bias"):
            # The key bias shifts every score of a query equally, so its true gradient is 0
            # and Adam turns float-rounding noise (order of the rank sum) into full-size steps.
            d = value.numel() // 3
            value, other = torch.cat([value[:d], value[2 * d:]]), torch.cat([other[:d], other[2 * d:]])
        assert (value - other).norm() <= 1e-5 * value.norm(), name  # float32: only summation order differs
    multi = json.loads((tmp_path / "two" / "results.json").read_text())
    for split in ("valid", "test"):
        for metric, value in single[split].items():
            assert multi[split][metric] == pytest.approx(value, abs=1e-4), (split, metric)


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
    clean = _torchrun(tmp_path, tmp_path / "clean", data_file)
    assert clean.returncode == 0, clean.stderr[-2000:]
    faulty = _torchrun(tmp_path, tmp_path / "faulty", data_file, {"SEQREC_FAULT_AT_STEP": "7"},
                       "--save_every_steps", "2")
    assert faulty.returncode == 0, faulty.stderr[-2000:]
    assert "resuming from the latest checkpoint" in faulty.stdout
    assert "at epoch 1 + 2 steps (step 6)" in faulty.stdout  # the mid-epoch checkpoint (4 steps per epoch)
    a, b = ckpt.load(tmp_path / "clean" / "latest.pt"), ckpt.load(tmp_path / "faulty" / "latest.pt")
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_launcher_and_environment_check_run_end_to_end(tmp_path):
    """train_distributed.sh (2 gloo CPU processes) on the demo data, and test_distributed.py alone
    and under torchrun."""
    import subprocess
    import sys

    from conftest import REPO
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NUM_GPUS": "2"}
    launch = subprocess.run([str(REPO / "train_distributed.sh"), "demo", str(tmp_path / "run"), "--num_epochs", "1",
                             "--maxlen", "20", "--hidden_units", "16", "--no_time", "--no_mhc"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert launch.returncode == 0, launch.stderr[-2000:]
    assert "world size 2" in launch.stdout and (tmp_path / "run" / "results.json").exists()
    alone = subprocess.run([sys.executable, str(REPO / "test_distributed.py"), "--cpu"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0 and "environment OK" in alone.stdout, alone.stderr[-2000:]
    under = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(REPO / "test_distributed.py"), "--cpu"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert under.returncode == 0 and "all-reduce over 2 processes" in under.stdout, under.stderr[-2000:]

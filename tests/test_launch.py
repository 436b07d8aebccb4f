"""The SLURM launcher: GPU counts in every form SLURM writes SLURM_GPUS_PER_NODE, and the
torchrun command the batch script builds (scontrol and srun faked)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm.sbatch"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")


def gpus_per_node(value: str) -> subprocess.CompletedProcess:
    """gpus_per_node VALUE, from the batch script sourced into a fresh bash."""
    return subprocess.run([BASH, "-c", 'source "$1" && gpus_per_node "$2"', "bash", str(SBATCH), value],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("value", ["4", "a100:4", "4(x2)", "a100:4(x2)", "gpu:a100:4", " 4 ", "gpu:4(IDX:0-3)",
                                   "a100:2,v100:2", "04"])
def test_gpu_count_in_every_slurm_form(value):
    proc = gpus_per_node(value)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "4\n"


@pytest.mark.parametrize("value", ["", "a100", "a100:", "x4", "0", "4x", "a100:four"])
def test_unreadable_gpu_counts_fail(value):
    proc = gpus_per_node(value)
    assert proc.returncode != 0 and proc.stdout == ""


def fake_slurm(tmp_path: Path) -> Path:
    """A bin directory whose scontrol lists two hosts and whose srun prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'node7\\nnode8\\n'\n")
    (bin_dir / "srun").write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\"\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def run_sbatch(tmp_path: Path, **slurm_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fake_slurm(tmp_path)}{os.pathsep}{env.get('PATH', '')}", SLURM_JOB_NODELIST="node[7-8]",
               SLURM_NNODES="2", SLURM_JOB_ID="123", **slurm_env)
    return subprocess.run([BASH, str(SBATCH), "ml-1m", "runs/x", "--lr", "0.002"], capture_output=True, text=True,
                          env=env, timeout=30)


def test_batch_script_starts_torchrun_with_the_parsed_count(tmp_path):
    proc = run_sbatch(tmp_path, SLURM_GPUS_PER_NODE="a100:4(x2)")
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.splitlines()
    assert args[:4] == ["torchrun", "--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d"]
    assert "--rdzv_endpoint=node7:29500" in args and "--rdzv_id=123" in args
    assert args[-8:] == ["main.py", "--dataset=ml-1m", "--train_dir=runs/x", "--multi_gpu", "--save_every_steps=500",
                         "--resume", "--lr", "0.002"]


def test_batch_script_falls_back_to_gpus_on_node_and_refuses_no_count(tmp_path):
    proc = run_sbatch(tmp_path, SLURM_GPUS_ON_NODE="2")
    assert proc.returncode == 0, proc.stderr
    assert "--nproc_per_node=2" in proc.stdout.splitlines()
    proc = run_sbatch(tmp_path / "again", SLURM_GPUS_PER_NODE="a100")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "cannot read a GPU count from SLURM_GPUS_PER_NODE='a100'" in proc.stderr

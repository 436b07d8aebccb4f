"""The CUDA paths on a real GPU (skipped without one, see conftest.py): exact resume on CUDA,
bf16/fp16 mixed precision, a CUDA-trained model exported and scored on CPU, and training steps
that never wait for the device (set_sync_debug_mode("error")).

The same checks, on the project's sizes and with timings, are in
``python -m seqrec.tools.gpucheck`` (docs/DISTRIBUTED_TRAINING.md § GPU check).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seqrec import export as ex
from seqrec.cli import main
from seqrec.config import TrainConfig
from seqrec.data import SequenceTensors
from seqrec.serve import Recommender
from seqrec.tools import bench

REPO = Path(__file__).resolve().parents[2]
VARIANTS = {"sasrec": ["--no_time", "--no_mhc"], "tisasrec": ["--time", "--no_mhc"],
            "sasrec+mhc": ["--no_time", "--mhc"], "tisasrec+mhc": ["--time", "--mhc"]}
DETERMINISTIC = ["--deterministic"] if hasattr(TrainConfig, "deterministic") else []


def write_data(path: Path, users: int = 80, items: int = 50, seed: int = 0) -> Path:
    """`user item timestamp` lines, the next item mostly item + 1 (as tests/conftest.py's)."""
    rng = np.random.default_rng(seed)
    lines = []
    for u in range(1, users + 1):
        item, ts = int(rng.integers(1, items + 1)), 1_600_000_000 + int(rng.integers(0, 10**6))
        for _ in range(int(rng.integers(5, 31))):
            lines.append(f"{u} {item} {ts}")
            item = item % items + 1 if rng.random() < 0.8 else int(rng.integers(1, items + 1))
            ts += int(rng.integers(60, 86400))
    path.write_text("\n".join(lines) + "\n")
    return path


def argv(data: Path, run_dir: Path, variant: str = "tisasrec+mhc", *extra: str) -> list[str]:
    return ["--data_path", str(data), "--train_dir", str(run_dir), "--device", "cuda", "--maxlen", "20",
            "--hidden_units", "16", "--num_blocks", "2", "--num_heads", "2", "--batch_size", "16",
            "--eval_every", "1", "--warmup_steps", "2", "--eval_negatives", "20", "--eval_batch_size", "32",
            *VARIANTS[variant], *extra]


def train(*args: str) -> None:
    assert main(list(args)) == 0


def parameters(run_dir: Path) -> dict:
    return torch.load(run_dir / "latest.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture
def data(tmp_path) -> Path:
    return write_data(tmp_path / "toy.txt")


@pytest.mark.parametrize("variant", ["sasrec", "tisasrec+mhc"])
def test_resume_on_cuda_equals_uninterrupted(data, tmp_path, variant):
    """Stopped at an epoch end, resumed on CUDA (dropout on: the CUDA RNG state must carry over)."""
    train(*argv(data, tmp_path / "full", variant, "--num_epochs", "3", *DETERMINISTIC))
    train(*argv(data, tmp_path / "cut", variant, "--num_epochs", "1", *DETERMINISTIC))
    train(*argv(data, tmp_path / "cut", variant, "--num_epochs", "3", "--resume", *DETERMINISTIC))
    full, cut = parameters(tmp_path / "full"), parameters(tmp_path / "cut")
    assert full.keys() == cut.keys()
    for name in full:
        torch.testing.assert_close(cut[name], full[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_after_a_kill_mid_epoch_on_cuda(data, tmp_path):
    """Killed after step 6 (a mid-epoch checkpoint at step 4), resumed: the uninterrupted run's parameters."""
    common = ["--num_epochs", "2", "--save_every_steps", "4", *DETERMINISTIC]
    train(*argv(data, tmp_path / "full", "tisasrec+mhc", *common))
    env = {**os.environ, "SEQREC_FAULT_AT_STEP": "6:0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    killed = subprocess.run([sys.executable, "-c", "import sys; from seqrec.cli import main; sys.exit(main(sys.argv[1:]))",
                             *argv(data, tmp_path / "cut", "tisasrec+mhc", *common)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 17, killed.stderr[-2000:]
    assert torch.load(tmp_path / "cut" / "latest.pt", map_location="cpu", weights_only=True)["step"] == 4
    train(*argv(data, tmp_path / "cut", "tisasrec+mhc", *common, "--resume"))
    full, cut = parameters(tmp_path / "full"), parameters(tmp_path / "cut")
    for name in full:
        torch.testing.assert_close(cut[name], full[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_one_epoch(data, tmp_path, amp, variant):
    if amp == "bf16" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 needs compute capability 8.0+")
    train(*argv(data, tmp_path / "run", variant, "--num_epochs", "1", "--amp", amp))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["type"] == "train"]
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert all(np.isfinite(p).all() for p in (t.float().numpy() for t in parameters(tmp_path / "run").values()))


@pytest.mark.parametrize("variant", ["sasrec", "tisasrec+mhc"])
def test_export_on_cuda_loads_and_scores_on_cpu(data, tmp_path, variant):
    """A CUDA-trained checkpoint through seqrec.export, and the scoring model traced on CUDA:
    both load with map_location="cpu" and give the CUDA model's scores."""
    train(*argv(data, tmp_path / "run", variant, "--num_epochs", "1"))
    checkpoint = tmp_path / "run" / "best.pt"
    rec = Recommender.from_checkpoint(str(checkpoint), device="cuda")
    scorer = ex.ScoringModel(rec.model).eval()
    inputs = ex.example_inputs(6, rec.maxlen, len(rec.item_ids), rec.uses_time, seed=4)
    torch.backends.cuda.matmul.allow_tf32 = False  # a training run in this process may have turned it on
    with torch.no_grad():
        expected = scorer(*(t.cuda() for t in inputs)).cpu()
        ex.export(checkpoint, tmp_path / "exported.pt", "torchscript", k=0)
        traced = torch.jit.trace(scorer, tuple(t.cuda() for t in ex.example_inputs(2, rec.maxlen, len(rec.item_ids),
                                                                                  rec.uses_time)),
                                 check_trace=False)
        traced.save(str(tmp_path / "traced_on_cuda.pt"))
        for name in ("exported.pt", "traced_on_cuda.pt"):
            model = torch.jit.load(str(tmp_path / name), map_location="cpu")
            got = model(*inputs)
            assert got.device.type == "cpu"
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_steady_state_steps_never_wait_for_the_device(amp, variant):
    """set_sync_debug_mode("error") raises on any device-to-host sync of a training step, after
    two warm-up steps (a seqrec.tools.bench trainer, as the benchmark times it)."""
    if amp == "bf16" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 needs compute capability 8.0+")
    torch.use_deterministic_algorithms(False)  # the suite's default; some deterministic kernels sync
    device = torch.device("cuda")
    spec = {"size": "L50", "expansion_rate": 4, "batch_size": 64, "amp": amp, "length_buckets": 0}
    data = SequenceTensors(bench.synthetic_sequences(num_users=400, num_items=300), 50, device)
    trainer = bench.make_trainer(spec, variant, data, device)
    users = data.train_users.cpu().numpy()
    batches = [users[i:i + 64] for i in range(0, 5 * 64, 64)]
    for batch in batches[:2]:
        trainer.train_step(batch, 1)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for batch in batches[2:]:
            trainer.train_step(batch, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

"""Shared fixtures: small generated datasets and a fast config."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seqrec.config import Config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_interactions(path: Path, num_users: int = 60, num_items: int = 40, seed: int = 0,
                       min_len: int = 5, max_len: int = 30) -> Path:
    """`user item timestamp` lines with a learnable rule: the next item is mostly item + 1."""
    rng = np.random.default_rng(seed)
    lines = []
    for u in range(1, num_users + 1):
        item, ts = int(rng.integers(1, num_items + 1)), 1_600_000_000 + int(rng.integers(0, 10**6))
        for _ in range(int(rng.integers(min_len, max_len + 1))):
            lines.append(f"{u} {item} {ts}")
            item = item % num_items + 1 if rng.random() < 0.8 else int(rng.integers(1, num_items + 1))
            ts += int(rng.integers(60, 86400))
    rng.shuffle(lines)  # files need not be sorted: the loader sorts by time
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return write_interactions(tmp_path / "toy.txt")


def small_config(data_path: Path, run_dir: Path, **overrides) -> Config:
    """A tiny SASRec configuration that trains in well under a second per epoch."""
    cfg = Config()
    cfg.data.data_path = str(data_path)
    m, t, e = cfg.model, cfg.train, cfg.eval
    m.maxlen, m.hidden_units, m.num_blocks, m.num_heads, m.time, m.mhc = 20, 16, 2, 2, False, False
    t.train_dir, t.batch_size, t.num_epochs, t.eval_every, t.warmup_steps, t.device = str(run_dir), 16, 3, 1, 2, "cpu"
    e.eval_negatives, e.eval_batch_size = 20, 32
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if not hasattr(getattr(cfg, section), name):  # a renamed field would be set and silently ignored
            raise AttributeError(f"small_config: {section} has no field {name!r}")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.fixture(autouse=True)
def _deterministic_single_thread():
    """Deterministic kernels; one intra-op thread, because the tests' tensors are small and on a
    loaded 2-core machine every threaded op waits for a busy core (measured 3-10x slower)."""
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(1)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


# An L2 term on the item embedding for equivalence tests: Adam's update ignores a constant
# scale of the gradient, but not of the data gradient beside this term, so a scaling bug
# (an extra 1/accum, a wrong world-size factor, summed instead of averaged ranks) changes
# the trained embedding.
SCALE_SENSITIVE = {"train__l2_emb": 1e-3}


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows without their timings: what an exact resume must reproduce."""
    timing = ("seconds", "seq_per_s", "seq_per_s_rank")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    """The epoch losses a run logged (metrics.jsonl train rows)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def assert_close_parameters(a: dict, b: dict, rtol: float) -> None:
    """Two state dicts agree per tensor to ‖Δ‖ ≤ rtol·‖a‖, key biases of attention excepted.

    The key bias shifts every score of a query equally, so its true gradient is 0 and Adam
    turns float-rounding noise (summation order, fused kernels) into full-size steps.
    """
    assert a.keys() == b.keys()
    for name, value in a.items():
        other = b[name]
        if name.endswith("qkv.bias"):
            d = value.numel() // 3
            value, other = torch.cat([value[:d], value[2 * d:]]), torch.cat([other[:d], other[2 * d:]])
        assert (value - other).norm() <= rtol * value.norm(), name

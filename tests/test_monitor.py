"""Per-epoch throughput and GPU fields of the training log."""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from conftest import small_config
from seqrec import monitor
from seqrec.cli import run


def test_total_is_all_samples_over_the_slowest_rank():
    row = monitor.summarize([{"samples": 100, "seconds": 2.0}, {"samples": 60, "seconds": 4.0}])
    assert row == {"seq_per_s": 40.0, "seq_per_s_rank": [50.0, 15.0]}
    assert monitor.describe(row) == "40 seq/s (ranks 50/15)"
    assert monitor.summarize([{"samples": 0, "seconds": 0.0}])["seq_per_s"] == 0.0  # a resumed, already finished epoch


def test_gpu_fields_only_when_every_rank_has_them():
    ranks = [{"samples": 8, "seconds": 1.0, "gpu_mem_gib": 1.234, "gpu_util_pct": 91},
             {"samples": 8, "seconds": 1.0, "gpu_mem_gib": 1.5}]  # rank 1: NVML could not say
    row = monitor.summarize(ranks)
    assert row["gpu_mem_gib"] == [1.23, 1.5] and "gpu_util_pct" not in row
    assert monitor.describe(row) == "16 seq/s (ranks 8/8)  GPU mem 1.23/1.50 GiB"


def test_no_gpu_fields_on_cpu():
    assert monitor.EpochMonitor(torch.device("cpu")).report(samples=30, seconds=1.5) == \
        {"seq_per_s": 20.0, "seq_per_s_rank": [20.0]}


def test_cuda_fields_from_torch_and_nvml(monkeypatch):
    """The CUDA branch, with torch.cuda's counters faked (no GPU on the test machine)."""
    calls, clock = [], [100.0]

    def synchronize(device):  # the queued steps take 2.5 s to finish
        calls.append(("sync", device))
        clock[0] += 2.5

    monkeypatch.setattr(monitor, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "utilization", lambda device: 57)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    device = torch.device("cuda", 0)
    meter = monitor.EpochMonitor(device)
    assert calls == [device]  # the peak-memory window opens with the epoch
    assert meter.elapsed() == 2.5 and calls[-1] == ("sync", device)  # the clock is read after the queued GPU work
    assert meter.report(10, 1.0) == {"seq_per_s": 10.0, "seq_per_s_rank": [10.0], "gpu_mem_gib": [3.0],
                                     "gpu_util_pct": [57]}

    def no_nvml(device):
        raise ModuleNotFoundError("nvidia-ml-py does not seem to be installed")

    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    assert "gpu_util_pct" not in meter.report(10, 1.0)


def test_training_rows_carry_the_fields(data_file, tmp_path, capsys):
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train = next(r for r in rows if r["type"] == "train")
    assert train["seq_per_s_rank"] == [train["seq_per_s"]] and train["seq_per_s"] > 0
    assert not any(key.startswith("gpu_") for key in train)
    assert f"{train['seq_per_s']:.0f} seq/s  valid" in capsys.readouterr().out


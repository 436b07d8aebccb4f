"""Per-epoch throughput and GPU usage for the training log.

Each rank times its own epoch and counts the users it trained; the numbers meet once at
the epoch's end (one all_gather_object, no host syncs inside the step loop), so a log row
shows the total and whether one rank lags (a slower GPU, a shard of longer sequences).
On CUDA it adds each rank's peak allocated memory in the epoch -- torch's caching-allocator
view, smaller than what nvidia-smi shows -- and NVML's utilisation at the epoch's end
(percent of the last 1/6-1 s in which a kernel ran; needs pynvml). On CPU there are no GPU
fields at all, rather than zeros that would read as measurements.
"""
from __future__ import annotations

import time

import torch

from . import distributed as dist


class EpochMonitor:
    """Created when an epoch starts (starting its clock and peak-memory window); report() at its end."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the epoch started, after waiting for the device once: the step loop
        does not wait for the GPU, so without it the last queued steps would not be counted."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.start

    def report(self, samples: int, seconds: float) -> dict:
        """Fields for the epoch's `train` row; a collective: every rank must call it."""
        return summarize(dist.all_gather_object(self._local(samples, seconds)))

    def _local(self, samples: int, seconds: float) -> dict:
        stats = {"samples": samples, "seconds": seconds}
        if self.device.type == "cuda":
            stats["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            util = gpu_utilisation(self.device)
            if util is not None:
                stats["gpu_util_pct"] = util
        return stats


def summarize(ranks: list[dict]) -> dict:
    """Total and per-rank samples/s, plus per-rank GPU fields present on every rank.

    The total is all ranks' samples over the slowest rank's time: the epoch is over only
    when the last rank is done, so that is the wall time the run actually paid.
    """
    slowest = max(r["seconds"] for r in ranks)
    row = {"seq_per_s": _rate(sum(r["samples"] for r in ranks), slowest),
           "seq_per_s_rank": [_rate(r["samples"], r["seconds"]) for r in ranks]}
    for key in ("gpu_mem_gib", "gpu_util_pct"):
        if all(key in r for r in ranks):
            row[key] = [round(r[key], 2) for r in ranks]
    return row


def describe(row: dict) -> str:
    """The monitoring fields of a `train` row as one short log fragment."""
    text = f"{row['seq_per_s']:.0f} seq/s"
    if len(row["seq_per_s_rank"]) > 1:
        text += " (ranks " + "/".join(f"{r:.0f}" for r in row["seq_per_s_rank"]) + ")"
    if "gpu_mem_gib" in row:
        text += "  GPU mem " + "/".join(f"{m:.2f}" for m in row["gpu_mem_gib"]) + " GiB"
    if "gpu_util_pct" in row:
        text += "  util " + "/".join(f"{u:.0f}" for u in row["gpu_util_pct"]) + "%"
    return text


def gpu_utilisation(device: torch.device) -> int | None:
    """NVML's current utilisation of `device` in percent; None when NVML cannot say."""
    try:
        return torch.cuda.utilization(device)  # maps torch's index through CUDA_VISIBLE_DEVICES
    except Exception:  # pynvml missing (ModuleNotFoundError), no driver access or unsupported (NVMLError)
        return None


def _rate(samples: int, seconds: float) -> float:
    return round(samples / seconds, 1) if seconds > 0 else 0.0

"""The device a command runs on: one check for `seqrec train`, `evaluate` and `recommend`."""
from __future__ import annotations

import torch

from . import distributed as dist
from .config import DEVICE, ConfigError


def resolve_device(requested: str | None) -> torch.device:
    """The device `requested` names (None: CUDA where available, else the CPU), checked to exist
    on this machine, or one ConfigError line: torch would otherwise fail in the model's .to(),
    which reads as a broken checkpoint. Under torchrun each rank takes the GPU of its LOCAL_RANK."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if not DEVICE.fullmatch(requested):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {requested!r}")
    device = torch.device(requested)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: CUDA is not available on this machine")
    if dist.launched():
        if device.index is not None and dist.local_world_size() > 1:
            raise ConfigError(f"--device {requested} under torchrun would put all {dist.local_world_size()} "
                              f"local ranks on one GPU; pass --device cuda (each rank takes its LOCAL_RANK's GPU)")
        if device.index is None:
            device = torch.device("cuda", dist.local_rank())
    if (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device

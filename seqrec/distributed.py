"""Every torch.distributed call in the project lives here.

A run is distributed exactly when torchrun (or another launcher) has set WORLD_SIZE
in the environment; plain ``python main.py`` is one process and all helpers below
degrade to no-ops, so the trainer is written once for any world size.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as part of a group."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device, backend: str | None, master_port: int) -> None:
    """Join the process group torchrun describes; nccl on CUDA, gloo on CPU unless told otherwise."""
    if not launched() or active():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(master_port))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend or ("nccl" if device.type == "cuda" else "gloo"),
                            device_id=device if device.type == "cuda" else None)


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (identity in one process)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj):
    """Rank 0's value of a picklable object on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_first():
    """Let rank 0 do something (e.g. create a directory) before the others look at it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()

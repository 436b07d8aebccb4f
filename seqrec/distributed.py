"""Every torch.distributed call in the project lives here.

A run is distributed exactly when torchrun (or another launcher) has set WORLD_SIZE
and RANK in the environment; plain ``python main.py`` is one process and all helpers below
degrade to no-ops, so the trainer is written once for any world size.
"""
from __future__ import annotations

import datetime
import gc
import os
import socket

import torch
import torch.distributed as dist

from .callbacks import Callback


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as part of a group."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def free_port() -> int:
    """A TCP port that is free on this host right now (for locally spawned process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def become_local_rank(rank: int, world: int, port: int) -> None:
    """Set the environment torchrun would give local worker `rank` of `world` (spawned groups)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    """Processes of this group on this node (torchrun's LOCAL_WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device, backend: str | None, master_port: int, timeout_s: float | None = None) -> None:
    """Join the process group torchrun describes; nccl on CUDA, gloo on CPU unless told otherwise.

    timeout_s bounds each collective (torch's default is 10 minutes); the environment check
    sets it short so a hung peer becomes a failed check instead of a hang.
    """
    if not launched() or active():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(master_port))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device if device.type == "cuda" else None}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        kwargs.update(store=_restart_round_store(), rank=int(os.environ["RANK"]),
                      world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend=backend or ("nccl" if device.type == "cuda" else "gloo"), **kwargs)


def _restart_round_store() -> dist.Store:
    """torchrun's agent-hosted store, under a prefix unique to this restart round.

    The agent keeps one store across --max-restarts rounds; without a fresh prefix a
    restarted group can read the dead round's peer addresses and fail to connect. The
    agent outlives its workers, so no worker hosts (or tears down) the store.
    """
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False)
    return dist.PrefixStore(f"seqrec/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown() -> None:
    """Leave the process group, first freeing unreachable DistributedDataParallel wrappers.

    DDP objects sit in reference cycles; one that the garbage collector frees only after
    the group is destroyed (at interpreter exit) can abort the process ("terminate called
    without an active exception"), seen in a third of the environment check's torchrun runs.
    """
    if active():
        gc.collect()
        dist.destroy_process_group()


def backend() -> str | None:
    """The process group's backend ('gloo', 'nccl'), or None without a group."""
    return dist.get_backend() if active() else None


def available_backends() -> dict[str, bool]:
    """Which backends this torch build can use (independent of any process group)."""
    return {"gloo": dist.is_available() and dist.is_gloo_available(),
            "nccl": dist.is_available() and dist.is_nccl_available()}


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite a tensor in place with rank `src`'s copy (identity in one process)."""
    if active():
        dist.broadcast(t, src)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (identity in one process)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of a tensor over ranks, in place (identity in one process)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s value of a picklable object (tensors included), on every rank.

    What lets rank 0 alone read the run directory (resume or not, which checkpoint) on
    nodes that do not share a filesystem.
    """
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's value of a picklable object, in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def elastic_restart() -> bool:
    """Whether torchrun restarted this worker group after a failure (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


FAULT_ENV = "SEQREC_FAULT_AT_STEP"


class FaultAtStep(Callback):
    """Kills rank `victim`'s process right after optimizer step `step`, as a crash would (exit
    17, no checkpoint, no cleanup): the rank death the torchrun restart tests recover from.

    A callback, so that the training step carries no test switch; it acts in on_step, the
    callbacks' one per-rank event, since the victim is usually not the main rank.
    """

    def __init__(self, step: int, victim: int):
        self.step, self.victim = step, victim

    def on_step(self, trainer) -> None:
        if trainer.step == self.step and rank() == self.victim:
            os._exit(17)


def fault_from_env() -> list[FaultAtStep]:
    """The fault that SEQREC_FAULT_AT_STEP="K" (rank 1) or "K:R" (rank R) asks for, as a list of
    callbacks to add to a run (cli.run does): empty when unset, and in a group torchrun has
    restarted (TORCHELASTIC_RESTART_COUNT > 0), so that the restarted group does not die again."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or elastic_restart():
        return []
    at, _, victim = spec.partition(":")
    return [FaultAtStep(int(at), int(victim or 1))]

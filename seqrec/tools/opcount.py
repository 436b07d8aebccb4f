"""Counting what a piece of code would cost a GPU, on a CPU: kernel launches and host syncs.

At this project's model size a GPU training step is bound by the number of kernels it
launches (a few microseconds each in eager mode) and by every point where the host waits
for the device, not by FLOPs. Both are properties of the op sequence, so they can be counted
on any machine:

* every non-view aten op that reaches a kernel (seen by a TorchDispatchMode, forward and
  backward alike) stands for one eager kernel launch;
* a sync-forcing op is one whose result the host must read before it can continue on
  CUDA: ``_local_scalar_dense`` (``.item()``, ``bool(t)``, ``int(t)``, ``if t:``),
  ``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing (``t[mask]``,
  ``t[mask] = v``), ``repeat_interleave`` without ``output_size``; plus the explicit host
  reads ``.cpu()``, ``.tolist()`` and ``.numpy()`` (seen by a TorchFunctionMode, since on a
  CPU tensor they reach no kernel). The counter cannot tell host tensors from device
  tensors, so code meant to be counted plans on the host with numpy or Python ints, and a
  copy to the host is spelled ``.cpu()`` rather than ``.to("cpu")``.

A custom op or a ctypes kernel hides its work from the count; the device-side path these
counts describe uses aten ops only.
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_SYNC_PACKETS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique, aten._unique2,
                 aten.unique_dim, aten.unique_consecutive, aten.is_nonzero}
_INDEX_PACKETS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_HOST_READS = {"cpu", "tolist"}  # .numpy() needs a CPU tensor: the read is the .cpu() before it


@dataclass
class OpCounts:
    """Non-view aten ops and sync-forcing ops seen while counting, with a per-op breakdown."""

    ops: int = 0
    syncs: int = 0
    by_op: collections.Counter = field(default_factory=collections.Counter)
    sync_by_op: collections.Counter = field(default_factory=collections.Counter)

    def add_sync(self, name: str) -> None:
        self.syncs += 1
        self.sync_by_op[name] += 1


def _forces_sync(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in _SYNC_PACKETS:
        return True
    if packet is aten.repeat_interleave:
        return func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None and \
            (len(args) < 2 or args[1] is None)
    if packet in _INDEX_PACKETS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    return False


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counts: OpCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.is_view and func.namespace != "profiler":  # record_function markers launch nothing
            self.counts.ops += 1
            self.counts.by_op[str(func.overloadpacket.__name__)] += 1
        if _forces_sync(func, args, kwargs):
            self.counts.add_sync(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


class _HostReadCounter(TorchFunctionMode):
    def __init__(self, counts: OpCounts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS and args and isinstance(args[0], torch.Tensor):
            self.counts.add_sync(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_ops() -> Iterator[OpCounts]:
    """Count the aten ops and host syncs of the enclosed code (this thread, forward and backward)."""
    counts = OpCounts()
    with _HostReadCounter(counts), _DispatchCounter(counts):
        yield counts

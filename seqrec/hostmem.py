"""Keep freed host memory in the process, so each step reuses its activations' pages.

PyTorch's CPU allocator is malloc. glibc serves blocks above a threshold (128 KB at first,
raised to the largest block freed so far, at most 32 MB) with mmap and gives them back to
the system when freed, and trims the top of its heap once more than twice that lies free
there. A training or evaluation step allocates and frees the same activations every
micro-batch, so without this they are page-faulted in again (and zeroed by the kernel)
each time: over 30 SASRec+mHC training steps at the seed size on one thread, 268,000–326,000
minor page faults and 1.0–1.35 s of system time, against 90,000–91,000 and 0.55 s with the
thresholds below, at the same peak RSS (docs/PERFORMANCE.md § Host memory). Blocks above
32 MB are mapped whatever the thresholds, which is why CPU evaluation batches are small
(`evaluate.eval_batch_size`).
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20   # glibc's largest accepted value on 64-bit: blocks up to it come from the heap
TRIM_THRESHOLD = 128 << 20  # free memory the heap keeps at its top (above one step's churn)
OWN_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def retain_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; True if they were set.

    Left alone (False) where malloc is not glibc's, or where the environment already
    tunes malloc (MALLOC_*_THRESHOLD_ or GLIBC_TUNABLES): the user's setting wins.
    """
    if sys.platform != "linux" or any(name in os.environ for name in OWN_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

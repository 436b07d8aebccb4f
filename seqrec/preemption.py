"""SIGTERM and SIGINT during training: finish the step, write latest.pt, exit with 128 + signal.

SLURM preemption and torchrun's shutdown send SIGTERM, then SIGKILL after a grace period
(SLURM's KillWait, 30 s by default; torchrun's a few seconds up to a minute). While the
model trains (its steps, the epoch's bookkeeping, a checkpoint being written) the signal only
raises a flag, so the step or the write ends and the checkpoint is whole; during evaluation
it raises at once, and the last checkpoint written is what the run resumes from: waiting for
a long full-ranking evaluation would outlast the grace period. A second signal always raises at once.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Preempted(Exception):
    """Training stopped by a signal; `signum` gives the exit code 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """The signals received while installed, and whether a step is running (deferring them)."""

    def __init__(self):
        self.signum: int | None = None
        self._deferring = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if not (self._deferring and first):
            raise Preempted(signum, f"{signal.Signals(signum).name} received")

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequests]:
        """Handle the signals for the enclosed code (only the main thread can install handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A region a first signal does not interrupt (one training step)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

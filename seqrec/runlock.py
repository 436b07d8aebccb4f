"""One run at a time in a run directory: an exclusive lock held for the run's whole life.

Two runs started on one --train_dir would interleave metrics.jsonl and leave a config.yaml
that does not match latest.pt. The lock is ``fcntl.flock`` on ``<run_dir>/.lock``: the
kernel releases it when the process ends, however it ends (kill -9 included), so a stale
lock never blocks a restart. The file holds the holder's host and pid for the message a
second run gets.

Network filesystems: on NFS, Linux implements flock with NFS byte-range locks, which hold
across clients on NFSv4 (and on v3 with a running lock manager); on filesystems without
lock support (some FUSE mounts) the lock only excludes runs on the same host.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from .config import ConfigError

LOCK_FILE = ".lock"


class RunLocked(ConfigError):
    """Another live process holds the run directory; the message names it."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None
        self._made_dir = False

    def acquire(self) -> RunLock:
        run_dir = self.path.parent
        self._made_dir = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"{run_dir} is in use by another run ({holder}); wait for it to end "
                            f"or choose another --train_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self, started: bool = True) -> None:
        """Unlock; a directory this lock created for a run that never started is removed again."""
        if self._fd is None:
            return
        if not started and self._made_dir:
            self.path.unlink(missing_ok=True)
            with_files = any(self.path.parent.iterdir())
            if not with_files:
                self.path.parent.rmdir()
        os.close(self._fd)
        self._fd = None

"""What a run was made with: one JSON line per start or resume in RUN_DIR/runs.jsonl.

Result tables gather runs made days and code changes apart, and a resumed run may span
two versions; the code, library versions and hardware behind each number must be
recoverable from the run directory alone.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from . import distributed as dist

FILE = "runs.jsonl"


def code_version() -> str | None:
    """The git commit of this checkout ('-dirty' with uncommitted changes to tracked files),
    or None outside a git checkout (an installed package)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {os.cpu_count()} cores ({platform.machine()})"


def record_start(run_dir: Path, step: int, device: torch.device) -> None:
    """Append this (re)start's provenance to RUN_DIR/runs.jsonl (rank 0)."""
    row = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "step": step,
           "code": code_version(), "torch": torch.__version__, "python": platform.python_version(),
           "device": device_name(device), "threads": torch.get_num_threads(), "world_size": dist.world_size(),
           "host": platform.node()}
    if dist.is_main():
        with open(run_dir / FILE, "a") as f:
            f.write(json.dumps(row) + "\n")


def code_versions(run_dir: Path) -> list[str]:
    """The distinct code versions a run was trained with, in order ('?' where unknown)."""
    path = run_dir / FILE
    if not path.exists():
        return []
    versions = [json.loads(line)["code"] or "?" for line in path.read_text().splitlines()]
    return list(dict.fromkeys(versions))

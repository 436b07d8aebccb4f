"""Training curves: ``python -m seqrec.plot RUN_DIR [RUN_DIR ...] [--out curves.png]``.

Reads each run's metrics.jsonl and draws the training loss and validation metrics per
epoch, one line per run, into one PNG. matplotlib is an optional extra
(``pip install -e .[plot]``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DEFAULT_METRICS = ("sampled/NDCG@10", "full/NDCG@10")


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir} a run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def label(run_dir: Path) -> str:
    """The run directory's name; ROW/seedS for launch/ablation.py's layout, where names repeat."""
    return f"{run_dir.parent.name}/{run_dir.name}" if re.fullmatch(r"seed\d+", run_dir.name) else run_dir.name


def plot(run_dirs: list[Path], out: Path, metrics: tuple[str, ...] = DEFAULT_METRICS) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(5 * (1 + len(metrics)), 4), squeeze=False)
    for run_dir in run_dirs:
        rows = read_rows(run_dir)
        train = [r for r in rows if r["type"] == "train"]
        valid = [r for r in rows if r["type"] == "valid"]
        axes[0, 0].plot([r["epoch"] for r in train], [r["loss"] for r in train], label=label(run_dir))
        for ax, metric in zip(axes[0, 1:], metrics):
            points = [(r["epoch"], r[metric]) for r in valid if metric in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=label(run_dir))
    axes[0, 0].set_title("training loss")
    for ax, metric in zip(axes[0, 1:], metrics):
        ax.set_title(f"validation {metric}")
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqrec.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("curves.png"))
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma list of validation metrics")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plotting needs matplotlib: pip install matplotlib (or pip install -e .[plot])", file=sys.stderr)
        return 2
    try:
        print(plot(args.run_dirs, args.out, tuple(args.metrics.split(","))))
    except (FileNotFoundError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What one training step and one epoch's end would cost a GPU, counted on this CPU.

``python -m seqrec.tools.stepcost`` (or ``seqrec bench --counts``) builds the trainer of each
variant at the seed's model size (d=50, 2 blocks, 2 heads, maxlen 50 as the demo preset,
BCE) with the GPU's defaults (one length bucket; mHC on its PyTorch ops, which is what a
GPU runs) and counts, with `seqrec.tools.opcount`:

* ops and syncs of a steady-state step (the mean over a few steps that hit no log boundary);
* syncs of one epoch beyond its steps: a whole epoch and its checkpoint are counted, and the
  steps' share is subtracted (the epoch's order read, the read of the loss and non-finite
  counters at its end, the finiteness check and the loss shares of the checkpoint). Each
  `log_every` boundary inside an epoch adds one read of the same counters.

Counts depend on the code, not the machine, so they can be asserted in tests.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ..config import Config
from ..data.tensors import SequenceTensors
from .opcount import count_ops

# variant -> model switches; mHC is counted on its PyTorch path (the CPU kernel is a ctypes
# call the counter cannot see into, and GPUs never run it)
VARIANTS = {"sasrec": {"time": False, "mhc": False}, "tisasrec": {"time": True, "mhc": False},
            "sasrec+mhc": {"time": False, "mhc": True, "mhc_native": False},
            "tisasrec+mhc": {"time": True, "mhc": True, "mhc_native": False}}


def synthetic_data(num_users: int = 400, maxlen: int = 50) -> SequenceTensors:
    """ML-1M-shaped sequences (the bench's), few users: the counts do not depend on how many."""
    from .bench import synthetic_sequences
    return SequenceTensors(synthetic_sequences(num_users), maxlen, "cpu")


def make_trainer(variant: str, data: SequenceTensors, **train):
    """The trainer of one variant with the GPU's defaults, on the CPU."""
    from ..trainer import Trainer
    cfg = Config()
    for key, value in {"maxlen": data.maxlen, **VARIANTS[variant]}.items():
        setattr(cfg.model, key, value)
    cfg.train.length_buckets = 1
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return Trainer(cfg, data, torch.device("cpu"), Path(tempfile.mkdtemp()), [])


def step_costs(trainer, steps: int = 3) -> dict:
    """Ops and syncs per steady-state step, and syncs per epoch beyond its steps."""
    b = trainer.cfg.train.batch_size
    order = trainer.data.epoch_order(trainer.cfg.train.seed, 1).cpu().numpy()
    trainer.train_step(order[:b], 1)  # first step: Adam's moments and lazy state are created
    with count_ops() as step:
        for i in range(1, steps + 1):
            trainer.train_step(order[i * b:(i + 1) * b], 1)
    trainer.cfg.train.log_every = trainer.steps_per_epoch + 1  # no log boundary inside the epoch
    with count_ops() as epoch:
        trainer.train_epoch(2)
        trainer.save("latest.pt")
    per_step = step.syncs / steps
    return {"ops_per_step": step.ops / steps, "syncs_per_step": per_step,
            "syncs_per_epoch": epoch.syncs - per_step * trainer.steps_per_epoch,
            "steps_per_epoch": trainer.steps_per_epoch, "sync_ops": dict(epoch.sync_by_op)}


def table(rows: dict[str, dict]) -> str:
    lines = ["| variant | non-view aten ops / step | sync-forcing ops / step | sync-forcing ops / epoch, beyond its steps |",
             "|---|---|---|---|"]
    for variant, r in rows.items():
        lines.append(f"| {variant} | {r['ops_per_step']:.0f} | {r['syncs_per_step']:.0f} | {r['syncs_per_epoch']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqrec.tools.stepcost", description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--loss", default="bce", help="training loss (bce, gbce, sampled_softmax, ce)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = synthetic_data()
    rows = {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        rows[variant] = step_costs(make_trainer(variant, data, loss=args.loss))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

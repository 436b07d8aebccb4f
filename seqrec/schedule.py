"""Learning-rate schedule: linear warmup, then step decay by epochs.

A pure function of the global step so it can be unit-tested and resumed without
any scheduler-internal state mattering.
"""
from __future__ import annotations


def lr_at(step: int, *, warmup_steps: int, steps_per_epoch: int, decay_step: int, decay_rate: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based).

    Warmup ramps (step + 1) / warmup_steps up to 1; afterwards the LR is multiplied by
    decay_rate once every decay_step epochs (epoch = step // steps_per_epoch).
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * decay_rate ** ((step // steps_per_epoch) // decay_step)

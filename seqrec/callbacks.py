"""The trainer's hook for things that watch a run: trackers, the tuner, diagnostics.

A callback receives each metrics row the trainer writes to metrics.jsonl (the source of
truth), at the moment it is written, on the main rank only:

* ``on_train_start(trainer, row)``: ``{"type": "start", "step", "epoch", "resumed"}``, after a
  resume has been applied, before the first step;
* ``on_step_logged(trainer, row)``: every ``type: step`` row (each ``log_every`` steps:
  running loss, LR) and every ``type: train`` row (an epoch's loss and throughput);
* ``on_validation(trainer, row)``: every ``type: valid`` row;
* ``on_train_end(trainer, row)``: the results (``best_epoch``, ``epochs`` and the ``valid`` and,
  unless skipped, ``test`` metrics of the best checkpoint).

A callback may raise to stop the run (the tuner's pruning does); the exception leaves
`Trainer.fit` as any other would, after the checkpoint of the last finished epoch.
"""
from __future__ import annotations


class Callback:
    """No-op base: override the events you need."""

    def on_train_start(self, trainer, row: dict) -> None:
        pass

    def on_step_logged(self, trainer, row: dict) -> None:
        pass

    def on_validation(self, trainer, row: dict) -> None:
        pass

    def on_train_end(self, trainer, row: dict) -> None:
        pass

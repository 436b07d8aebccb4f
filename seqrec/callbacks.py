"""The trainer's hook for things that watch a run: trackers, the tuner, diagnostics.

A callback receives each metrics row the trainer writes to metrics.jsonl (the source of
truth), at the moment it is written, on the main rank only:

* ``on_train_start(trainer, row)``: ``{"type": "start", "step", "epoch", "resumed"}``, after a
  resume has been applied, before the first step;
* ``on_step_logged(trainer, row)``: every ``type: step`` row (each ``log_every`` steps:
  running loss, LR) and every ``type: train`` row (an epoch's loss and throughput);
* ``validation_metrics(trainer) -> dict``: entries to add to the coming ``type: valid`` row,
  before it is written (a diagnostic measured on the model, such as `CompositeGain`);
* ``on_validation(trainer, row)``: every ``type: valid`` row;
* ``on_train_end(trainer, row)``: the results (``best_epoch``, ``epochs`` and the ``valid`` and,
  unless skipped, ``test`` metrics of the best checkpoint).

One event has no row and runs on every rank, for hooks that act on their own process (the
restart tests' fault switch, seqrec.distributed.FaultAtStep):

* ``on_step(trainer)``: after each optimizer step (``trainer.step`` counts it), before a
  mid-epoch checkpoint of that step. It runs inside the step loop: keep it cheap, do not
  read the device (each read waits for the step's kernels) and do not raise (an exception on
  one rank leaves the others waiting in their next collective).

A main-rank event's callback may raise to stop the run (the tuner's pruning does); the
exception leaves `Trainer.fit` as any other would, after the checkpoint of the last finished
epoch.
"""
from __future__ import annotations


class Callback:
    """No-op base: override the events you need."""

    def on_train_start(self, trainer, row: dict) -> None:
        pass

    def on_step_logged(self, trainer, row: dict) -> None:
        pass

    def on_step(self, trainer) -> None:
        pass

    def validation_metrics(self, trainer) -> dict:
        return {}

    def on_validation(self, trainer, row: dict) -> None:
        pass

    def on_train_end(self, trainer, row: dict) -> None:
        pass


class CompositeGain(Callback):
    """mHC's composite gain (seqrec.models.mhc.composite_gain) on the first validation batch,
    as ``mhc/gain_row`` and ``mhc/gain_col`` in every valid row; cli.run installs it for
    --mhc models, so the trainer needs no knowledge of mHC."""

    def validation_metrics(self, trainer) -> dict:
        # imported here: this module imports nothing (seqrec.distributed imports it)
        from .evaluate import eval_batch_size
        from .models.mhc import composite_gain
        split = trainer.data.splits["valid"]
        return composite_gain(trainer.model, split.batch(slice(0, eval_batch_size(trainer.cfg.eval, trainer.device))))

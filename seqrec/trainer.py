"""The training loop, readable top to bottom: fit() = epochs of steps, validation,
checkpoints, early stopping, then the test split once at the best validation.

One code path serves one process and torchrun/DDP alike; every collective goes
through ``seqrec.distributed`` and only rank 0 prints or writes files.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed as dist
from . import provenance
from .config import Config, to_dict
from .data.tensors import SequenceTensors
from .evaluate import eval_batch_size, evaluate, format_metrics
from .losses import build_loss
from .models import build_model
from .models.mhc import composite_gain
from .monitor import EpochMonitor, describe
from .schedule import lr_at

# Model fields a resumed run may change without changing the parameters' meaning.
RESUMABLE_MODEL_CHANGES = {"dropout_rate", "attention_dropout", "mhc_no_amp", "mhc_native"}


class TrainingError(RuntimeError):
    """A run that cannot continue; the message is one line meant for the user."""


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """auto = bf16 on CUDA with compute capability >= 8, fp16 on older CUDA, off on CPU.

    The capability is checked rather than torch.cuda.is_bf16_supported(), which can
    report True on V100s through slow emulation.
    """
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def log(msg: str) -> None:
    if dist.is_main():
        print(msg, flush=True)


class Trainer:
    def __init__(self, cfg: Config, data: SequenceTensors, device: torch.device, run_dir: Path,
                 item_ids: list[str]):
        self.cfg, self.data, self.device, self.run_dir = cfg, data, device, run_dir
        self.item_ids = item_ids
        t = cfg.train
        torch.manual_seed(t.seed)
        self.model = build_model(cfg.model, data.num_items).to(device)
        self.ddp = DistributedDataParallel(self.model) if dist.active() else None
        # What the training step calls; evaluation and checkpoints use the plain module.
        self.forward = self.ddp or self.model
        if t.compile:
            self.forward = torch.compile(self.forward)
        self.loss_fn = build_loss(t, data.num_items, data.item_counts)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t.lr, betas=(0.9, 0.98))
        self.steps_per_epoch = math.ceil(data.num_train_users / t.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            lr_at, warmup_steps=t.warmup_steps, steps_per_epoch=self.steps_per_epoch,
            decay_step=t.lr_decay_step, decay_rate=t.lr_decay_rate))
        self.amp_dtype = resolve_amp(t.amp, device)
        # On CPU, 8 groups measured fastest for SASRec and as fast as 4 for the other variants
        # (docs/PERFORMANCE.md). On CUDA a d=50 model is launch-bound, and each group costs its
        # own kernel launches, so bucketing stays off there until it is measured.
        self.length_buckets = t.length_buckets or (8 if device.type == "cpu" else 1)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.epoch = 0  # last completed epoch
        self.step = 0  # optimizer steps taken (skipped steps included, so the data order stays fixed)
        self.best = {"metric": -math.inf, "epoch": 0, "evals_since": 0}
        self.bad_steps = 0
        self.train_seconds = 0.0  # wall time spent in training epochs, across resumes
        # This rank's loss shares summed over the current epoch's steps, kept on the device
        # so that the step loop never waits for the device (read at log intervals only).
        self.epoch_loss = torch.zeros((), dtype=torch.float64, device=device)
        shares = dist.world_size() * t.grad_accum_steps
        if t.batch_size % shares:
            raise TrainingError(f"--batch_size {t.batch_size} must be divisible by world size x grad_accum_steps "
                                f"({dist.world_size()} x {t.grad_accum_steps})")

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"config": to_dict(self.cfg), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
                "best": dict(self.best), "train_seconds": self.train_seconds, "epoch_loss": self.epoch_loss.item(),
                "rng": dist.all_gather_object(ckpt.rng_state()), "item_ids": self.item_ids}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.best = state["epoch"], state["step"], dict(state["best"])
        self.train_seconds = state["train_seconds"]
        self.epoch_loss.fill_(state["epoch_loss"])
        # Each rank continues its own dropout stream; a run resumed at another world size
        # continues rank 0's (identity across world sizes is not promised).
        rng = state["rng"]
        ckpt.set_rng_state(rng[dist.rank()] if len(rng) == dist.world_size() else rng[0])

    def resume(self) -> None:
        """Continue from latest.pt, refusing a checkpoint whose model the current flags would reshape."""
        state = ckpt.load(self.run_dir / ckpt.LATEST, self.device)
        saved = state["config"]["model"]
        for name, value in to_dict(self.cfg)["model"].items():
            if name not in RESUMABLE_MODEL_CHANGES and saved.get(name) != value:
                raise TrainingError(f"cannot resume: --{name} {value} differs from the checkpoint's "
                                    f"{saved.get(name)}; the model cannot change shape on resume")
        self.load_state_dict(state)
        self._truncate_metrics()
        log(f"resumed from {self.run_dir / ckpt.LATEST} at epoch {self.epoch} + "
            f"{self.step - self.epoch * self.steps_per_epoch} steps (step {self.step})")

    def save(self, name: str) -> None:
        """Write a checkpoint from rank 0 (with every rank's RNG state); never from non-finite weights."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise TrainingError("refusing to checkpoint non-finite weights")
        state = self.state_dict()  # collective: every rank contributes its RNG state
        if dist.is_main():
            ckpt.save(state, self.run_dir / name)
        dist.barrier()

    # ---------------------------------------------------------------- logging
    def _write_metrics(self, row: dict) -> None:
        if dist.is_main():
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self) -> None:
        """Drop rows written after the checkpoint, which the resumed run will write again."""
        path = self.run_dir / "metrics.jsonl"
        if not dist.is_main() or not path.exists():
            return
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if json.loads(r).get("epoch", 0) <= self.epoch]
        path.write_text("".join(r + "\n" for r in kept))

    # ---------------------------------------------------------------- training
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, users: torch.Tensor, epoch: int) -> torch.Tensor:
        """One optimizer step on a global batch of users; returns this rank's (detached) loss share.

        This rank takes its contiguous share of the batch, in micro-batches (see
        `micro_batches`). The loss is normalised by the valid positions of the whole global
        batch, which every rank can count from the data without communicating; DDP averages
        gradients over ranks, so each share is scaled by the world size. The result is the
        gradient of the one-process loss, whatever the world size, accumulation or bucketing.
        """
        t = self.cfg.train
        users = users.cpu()  # a no-op for train_epoch's host-side order
        scale = dist.world_size() / max(int(self.data.train_positions[users].sum()), 1)
        parts = self.micro_batches(self.rank_rows(users))
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        for i, (part, width) in enumerate(parts):
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                batch = self.batch(part, epoch, width)
                with self.autocast():
                    hidden = self.forward(batch)
                    loss_sum, _ = self.loss_fn(self.model, hidden, batch)
                part_loss = loss_sum * scale
                if t.l2_emb > 0 and last:  # once per step and rank; DDP's average keeps it once
                    part_loss = part_loss + t.l2_emb * self.model.item_emb.weight.pow(2).sum()
                self.scaler.scale(part_loss).backward()
                loss += part_loss.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        self._guarded_step(loss, grad_norm)
        self.scheduler.step()
        self.step += 1
        dist.maybe_inject_fault(self.step)
        if t.save_every_steps and self.step % t.save_every_steps == 0:
            self.save(ckpt.LATEST)
        return loss

    def _guarded_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Skip a step with a non-finite loss or gradient; stop after max_bad_steps in a row.

        Gradients are identical on all ranks after DDP's all-reduce, so the decision is too.
        Under fp16 the GradScaler skips overflowing steps itself (not counted as bad); only
        a non-finite loss is counted, agreed across ranks by a reduction.
        """
        if self.scaler.is_enabled():
            finite = dist.all_reduce_sum((~torch.isfinite(loss)).float()) == 0
            if finite:
                self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            finite = bool(torch.isfinite(grad_norm))
            if finite:
                self.optimizer.step()
        if finite:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        log(f"warning: non-finite loss or gradient at step {self.step}; step skipped "
            f"({self.bad_steps}/{self.cfg.train.max_bad_steps} in a row)")
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise TrainingError(f"{self.bad_steps} consecutive non-finite steps (last at step {self.step}); "
                                f"stopping. Lower --lr or check the data; the last good checkpoint is kept")

    def batch(self, users: torch.Tensor, epoch: int, width: int) -> dict:
        """The training batch of host-side `users` at this step, cut to its last `width` columns."""
        return self.data.train_batch(users.to(self.device, non_blocking=True), self.cfg.train.seed, epoch,
                                     self.loss_fn.num_negatives, self.loss_fn.sampler,
                                     self.step if self.loss_fn.shared else None, width)

    def micro_batches(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """This rank's rows as (users, width) micro-batches: grad_accum_steps x length_buckets
        groups of similar history length, each to be cut to its longest history.

        Training windows are left-padded to maxlen, and a random batch of ML-1M users is about
        half padding (median history ≈ 100 of 200). Sorted by length and split, each group
        drops the columns that are padding for all its members, so token-wise work shrinks
        with the padding and attention with its square. The loss is a sum over positions,
        so the step's gradient is the same however the rows are grouped; only the order in
        which dropout masks are drawn changes. Planned on the host from lengths known at
        load time: no device read.
        """
        t = self.cfg.train
        lengths = self.data.train_positions[rows]
        if self.length_buckets > 1:
            order = torch.argsort(lengths, stable=True)
            rows, lengths = rows[order], lengths[order]
        count = t.grad_accum_steps * self.length_buckets
        parts = [(part, int(lens.max())) for part, lens in zip(rows.tensor_split(count), lengths.tensor_split(count))
                 if len(part)]
        # A rank without rows (the last, short global batch) still runs one empty micro-batch:
        # its backward is what joins DDP's gradient all-reduce.
        return parts or [(rows, 1)]

    def rank_rows(self, users: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (ranks' shares concatenate to the batch)."""
        per_rank = -(-len(users) // dist.world_size())
        return users[dist.rank() * per_rank:(dist.rank() + 1) * per_rank]

    def train_epoch(self, epoch: int) -> dict:
        """The epoch's steps, starting after any already taken (a mid-epoch checkpoint)."""
        t = self.cfg.train
        self.model.train()
        order = self.data.epoch_order(t.seed, epoch).cpu()  # one read per epoch; steps plan on the host
        first = self.step - (epoch - 1) * self.steps_per_epoch
        meter, samples = EpochMonitor(self.device), 0  # this rank's users, for per-rank samples/s
        start = meter.start
        bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch}", leave=False,
                   disable=None if dist.is_main() else True)
        for i in range(first, self.steps_per_epoch):
            users = order[i * t.batch_size:(i + 1) * t.batch_size]
            self.epoch_loss += self.train_step(users, epoch)
            samples += len(self.rank_rows(users))
            if (i + 1) % t.log_every == 0 or i + 1 == self.steps_per_epoch:
                bar.set_postfix(loss=f"{self.epoch_loss.item() / (i + 1):.4f}",
                                seq_s=f"{(i + 1 - first) * t.batch_size / (time.perf_counter() - start):.0f}")
            bar.update(1)
        bar.close()
        seconds = meter.elapsed()
        loss = dist.all_reduce_sum(self.epoch_loss.clone()).item() / dist.world_size()
        self.epoch_loss.zero_()
        return {"type": "train", "epoch": epoch, "step": self.step, "loss": loss / self.steps_per_epoch,
                "lr": self.scheduler.get_last_lr()[0], "seconds": round(seconds, 3), **meter.report(samples, seconds)}

    # ---------------------------------------------------------------- evaluation
    def validate(self) -> dict:
        """Validation metrics, plus mHC's composite gain on the first validation batch."""
        split = self.data.splits["valid"]
        metrics = evaluate(self.model, split, self.cfg.eval, self.data.num_items)
        if self.cfg.model.mhc:
            first = split.batch(slice(0, eval_batch_size(self.cfg.eval, self.device)))
            metrics.update(composite_gain(self.model, first))
        return metrics

    def _track_best(self, metrics: dict) -> bool:
        """Record a new best validation score; returns whether training should stop early."""
        value = metrics[self.cfg.eval.select_metric]
        if value > self.best["metric"]:
            self.best.update(metric=value, epoch=self.epoch, evals_since=0)
            self.save(ckpt.BEST)
        else:
            self.best["evals_since"] += 1
        patience = self.cfg.train.early_stop_patience
        return patience > 0 and self.best["evals_since"] >= patience

    def fit(self) -> dict:
        t = self.cfg.train
        provenance.record_start(self.run_dir, self.step, self.device)
        log(f"training {type(self.model).__name__} ({sum(p.numel() for p in self.model.parameters()):,} parameters) "
            f"on {self.data.num_train_users:,} users, {self.data.num_items:,} items, "
            f"{self.steps_per_epoch} steps/epoch, device {self.device}, world size {dist.world_size()}, "
            f"amp {self.amp_dtype or 'off'}")
        stop = False
        while self.epoch < t.num_epochs and not stop:
            row = self.train_epoch(self.epoch + 1)
            self.epoch += 1
            self.train_seconds += row["seconds"]
            self._write_metrics(row)
            if self.epoch % t.eval_every == 0 or self.epoch == t.num_epochs:
                metrics = self.validate()
                self._write_metrics({"type": "valid", "epoch": self.epoch, **metrics})
                log(f"epoch {self.epoch:4d}  loss {row['loss']:.4f}  {row['seconds']:.1f}s  {describe(row)}  "
                    f"valid {format_metrics(metrics)}")
                stop = self._track_best(metrics)
            self.save(ckpt.LATEST)
        if stop:
            log(f"early stop: no validation improvement in {t.early_stop_patience} evaluations")
        return self.test()

    def test(self) -> dict:
        """Evaluate the best-validation checkpoint on valid and test; write results.json."""
        best_path = self.run_dir / ckpt.BEST
        if best_path.exists():
            self.model.load_state_dict(ckpt.load(best_path, self.device)["model"])
        results = {"best_epoch": self.best["epoch"], "epochs": self.epoch,
                   "train_seconds": round(self.train_seconds, 1)}
        for split in ("valid", "test"):
            results[split] = evaluate(self.model, self.data.splits[split], self.cfg.eval, self.data.num_items)
            log(f"best epoch {self.best['epoch']}  {split:5s} {format_metrics(results[split])}")
        self._write_metrics({"type": "test", "epoch": self.epoch, **results["test"]})
        if dist.is_main():
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return results

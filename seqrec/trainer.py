"""The training loop, readable top to bottom: fit() = epochs of steps, validation,
checkpoints, early stopping, then the test split once at the best validation.

One code path serves one process and torchrun/DDP alike; every collective goes
through ``seqrec.distributed`` and only rank 0 prints or writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed as dist
from . import provenance
from .callbacks import Callback
from .config import Config, from_dict, to_dict
from .data.tensors import BatchPlan, SequenceTensors
from .evaluate import evaluate, format_metrics
from .losses import build_loss
from .models import build_model
from .monitor import EpochMonitor, describe
from .preemption import Preempted, StopRequests
from .schedule import lr_at

# Model fields a resumed run may change without changing the parameters' meaning.
RESUMABLE_MODEL_CHANGES = {"dropout_rate", "attention_dropout", "mhc_no_amp", "mhc_native"}
# Settings that fix the data order and the schedule's step count: a resume that changed them
# would train some users twice and shift the schedule. (grad_accum_steps, length_buckets and
# the world size only regroup the same gradient, so they may change.)
FIXED_ON_RESUME = {"train": ("batch_size", "seed"),
                   "data": ("dataset", "data_path", "min_user_count", "min_item_count")}
# Settings the best validation score was measured with: changing them resets it.
SELECTION = ("select_metric", "eval_negatives", "eval_seed", "topk")


class TrainingError(RuntimeError):
    """A run that cannot continue; the message is one line meant for the user."""


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """auto = bf16 on CUDA with compute capability >= 8, fp16 on older CUDA, off on CPU.

    The capability is checked rather than torch.cuda.is_bf16_supported(), which can
    report True on V100s through slow emulation; for the same reason an explicit bf16
    on a pre-Ampere GPU is refused instead of running emulated at a fraction of fp16's speed.
    """
    ampere = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if ampere else torch.float16
    if mode == "bf16" and device.type == "cuda" and not ampere:
        major, minor = torch.cuda.get_device_capability(device)
        raise TrainingError(f"--amp bf16 needs a GPU of compute capability 8.0 or newer (Ampere); "
                            f"{device} has {major}.{minor}: use --amp fp16")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


class Objective(nn.Module):
    """The model and its loss as one module: what a training micro-batch runs.

    One module is what DistributedDataParallel wraps and what ``--compile`` traces, so the
    compiled graph covers the forward and the loss whole (no graph break between them).
    Returns the loss summed over positions and the number of valid positions.
    """

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_fn(self.model, self.model(batch), batch)


class BadSteps:
    """Consecutive non-finite steps, counted on the device so that no step waits for the host.

    `state` holds [current run, longest run since the last read, steps skipped since the
    last read]; the trainer reads it at log boundaries, which is where the max_bad_steps
    stop is decided (so a run may take up to log_every - 1 steps more before it stops).
    """

    def __init__(self, device: torch.device):
        self.state = torch.zeros(3, dtype=torch.int64, device=device)

    def update(self, bad: torch.Tensor) -> None:
        bad = bad.long()
        run = (self.state[0] + 1) * bad
        self.state = torch.stack([run, torch.maximum(self.state[1], run), self.state[2] + bad])

    def reset_window(self) -> None:
        self.state = torch.stack([self.state[0], self.state[0], torch.zeros_like(self.state[2])])


def log(msg: str) -> None:
    if dist.is_main():
        print(msg, flush=True)


class Trainer:
    def __init__(self, cfg: Config, data: SequenceTensors, device: torch.device, run_dir: Path,
                 item_ids: list[str], callbacks: list[Callback] = ()):
        self.cfg, self.data, self.device, self.run_dir = cfg, data, device, run_dir
        self.item_ids = item_ids
        self.callbacks = list(callbacks)  # called on the main rank only (seqrec.callbacks)
        t = cfg.train
        shares = dist.world_size() * t.grad_accum_steps
        if t.batch_size % shares:
            raise TrainingError(f"--batch_size {t.batch_size} must be divisible by world size x grad_accum_steps "
                                f"({dist.world_size()} x {t.grad_accum_steps})")
        torch.manual_seed(t.seed)
        # The CPU kernel of mHC is a ctypes call that torch.compile cannot trace; compiled
        # runs take mHC's PyTorch ops (the same numbers) so the graph stays whole.
        model_cfg = dataclasses.replace(cfg.model, mhc_native=False) if t.compile else cfg.model
        self.model = build_model(model_cfg, data.num_items).to(device)
        self.loss_fn = build_loss(t, data.num_items, data.item_counts)
        objective = Objective(self.model, self.loss_fn)
        self.ddp = (DistributedDataParallel(objective, gradient_as_bucket_view=True)
                    if dist.active() else None)
        # What a micro-batch calls; evaluation and checkpoints use the plain model.
        self.objective = self.ddp or objective
        if t.compile:
            self.objective = torch.compile(self.objective, fullgraph=True, dynamic=False, mode=t.compile_mode)
        # Fused: one kernel for all parameters instead of ~12 per parameter, and step counters
        # that the update reads on the device (single-tensor Adam calls step.item() per parameter).
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t.lr, betas=(0.9, 0.98), fused=True)
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
        # Host-side copy of each user's valid training positions: steps are planned from it
        # (micro-batch widths, the loss normaliser) without reading the device.
        self.positions = data.train_positions.numpy()
        self.epoch = 0  # last completed epoch
        self.step = 0  # optimizer steps taken (skipped steps included, so the data order stays fixed)
        self.best = {"metric": -math.inf, "epoch": 0, "evals_since": 0}
        self.bad_steps = BadSteps(device)
        self.stops = StopRequests()  # SIGTERM / SIGINT while fit() runs
        self.stop_agreed = False  # all ranks know that one got a stop signal
        self.train_seconds = 0.0  # wall time spent in training epochs, across resumes
        # This rank's loss shares summed over the current epoch's steps, kept on the device
        # so that the step loop never waits for the device (read at log intervals only).
        self.epoch_loss = torch.zeros((), dtype=torch.float64, device=device)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The full training state; a collective: every rank contributes its RNG state and loss share."""
        ranks = dist.all_gather_object({"rng": ckpt.rng_state(self.device), "epoch_loss": self.epoch_loss.item()})
        return {"config": to_dict(self.cfg), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
                "best": dict(self.best), "train_seconds": self.train_seconds,
                "epoch_loss": [r["epoch_loss"] for r in ranks], "rng": [r["rng"] for r in ranks],
                "item_ids": self.item_ids, "data_digest": self.data.digest}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint loaded on the CPU; tensors move to the device as they are copied in."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._load_scaler(state["scaler"])
        self.epoch, self.step, self.best = state["epoch"], state["step"], dict(state["best"])
        self.train_seconds = state["train_seconds"]
        saved_world, world = len(state["rng"]), dist.world_size()
        self.epoch_loss.fill_(self._loss_share(state["epoch_loss"], world))
        if saved_world != world:
            log(f"note: this checkpoint was written by {saved_world} rank(s) and resumes on {world}: ranks "
                f"beyond the saved ones seed their dropout streams from (seed, step, rank), so the run is "
                f"not identical to one that kept {saved_world} rank(s)")
        if dist.rank() < saved_world:
            ckpt.set_rng_state(state["rng"][dist.rank()], self.device)
        else:
            torch.manual_seed(hash((self.cfg.train.seed, self.step, dist.rank())) % 2**63)

    def _loss_share(self, saved: list[float] | float, world: int) -> float:
        """This rank's part of the epoch's summed loss shares from a checkpoint.

        Shares are the global loss times the world size split over ranks, so at an equal
        world size each rank takes its own back, and at another one rank 0 takes the total
        rescaled to the new world size; the logged epoch loss (sum over ranks / world) is
        the same either way.
        """
        saved = [saved] if isinstance(saved, float) else list(saved)
        if len(saved) == world:
            return saved[dist.rank()]
        return sum(saved) * world / len(saved) if dist.is_main() else 0.0

    def _load_scaler(self, saved: dict) -> None:
        """GradScaler state across an --amp change: a scaler state is only meaningful to fp16.

        fp16 resuming a bf16/off run starts a fresh scaler (its state dict is empty and
        GradScaler.load_state_dict refuses it); a bf16/off run resuming an fp16 one drops it.
        """
        if self.scaler.is_enabled() and saved:
            self.scaler.load_state_dict(saved)
        elif self.scaler.is_enabled():
            log("note: the checkpoint was not trained with --amp fp16: starting a fresh loss scaler")
        elif saved:
            log("note: the checkpoint was trained with --amp fp16: its loss scale is dropped")

    def check_resumable(self, state: dict) -> None:
        """Refuse a checkpoint whose model the current flags would reshape, or that was trained
        on another item catalogue."""
        if state.get("item_ids") and state["item_ids"] != self.item_ids:
            raise TrainingError(f"cannot resume: the data's {len(self.item_ids):,} items are not the checkpoint's "
                                f"{len(state['item_ids']):,}; was it trained on other data?")
        current = to_dict(self.cfg)
        changed = [f"--{name} {state['config'][section].get(name)} -> {current[section][name]}"
                   for section, names in FIXED_ON_RESUME.items() for name in names
                   if state["config"][section].get(name) != current[section][name]]
        if changed:
            raise TrainingError(f"cannot resume: {', '.join(changed)} would change the data order or the "
                                f"schedule of the saved run; resume with the saved values or start a new run")
        if state.get("data_digest", self.data.digest) != self.data.digest:
            raise TrainingError("cannot resume: the interactions differ from the ones the checkpoint was trained on "
                                "(same items, other users, order or times); resume with the same data")
        # Read through the config schema: a checkpoint written before a field existed (or under
        # an alias, norm_first for block) resolves to the values it was trained with.
        saved = to_dict(from_dict({"model": state["config"]["model"]}))["model"]
        for name, value in current["model"].items():
            if name not in RESUMABLE_MODEL_CHANGES and saved.get(name) != value:
                raise TrainingError(f"cannot resume: --{name} {value} differs from the checkpoint's "
                                    f"{saved.get(name)}; the model cannot change shape on resume")

    def resume(self, state: dict) -> None:
        """Continue from a checkpoint's state (loaded on the CPU by the main rank and broadcast),
        refusing one this run cannot continue. Touches no file: once the run directory is
        prepared, `truncate_metrics` drops the rows the resumed run will write again."""
        self.check_resumable(state)
        self.load_state_dict(state)
        saved_eval, current_eval = state["config"]["eval"], to_dict(self.cfg)["eval"]
        changed = [name for name in SELECTION if saved_eval.get(name) != current_eval[name]]
        if changed and self.best["epoch"]:
            log(f"note: {', '.join(changed)} changed since the checkpoint: its best validation score "
                f"({self.best['metric']:.4f}, epoch {self.best['epoch']}) was measured otherwise and is reset; "
                f"best.pt is replaced at the next validation")
            self.best.update(metric=-math.inf, evals_since=0)
        log(f"resumed from {self.run_dir / ckpt.LATEST} at epoch {self.epoch} + "
            f"{self.step - self.epoch * self.steps_per_epoch} steps (step {self.step})")

    def save(self, name: str) -> None:
        """Write a checkpoint from rank 0 (with every rank's RNG state); never from non-finite weights."""
        # One device read for all parameters: the largest |value| is finite iff every value is.
        norms = torch._foreach_norm(list(self.model.parameters()), math.inf)
        if not bool(torch.isfinite(torch.stack(norms)).all()):
            raise TrainingError("refusing to checkpoint non-finite weights")
        state = self.state_dict()  # collective: every rank contributes its RNG state
        if dist.is_main():
            ckpt.save(state, self.run_dir / name)
        dist.barrier()

    # ---------------------------------------------------------------- logging
    def _write_metrics(self, row: dict, event: str | None = None) -> None:
        """Append a row to metrics.jsonl and hand it to the callbacks' `event` (main rank only)."""
        if dist.is_main():
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self._emit(event, row)

    def _emit(self, event: str | None, row: dict) -> None:
        if event and dist.is_main():
            for callback in self.callbacks:
                getattr(callback, event)(self, row)

    def truncate_metrics(self) -> None:
        """Drop rows written after the checkpoint, which the resumed run will write again."""
        path = self.run_dir / "metrics.jsonl"
        if not dist.is_main() or not path.exists():
            return
        kept = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                if line.strip() and self._before_checkpoint(json.loads(line)):
                    kept.append(line)
            except json.JSONDecodeError:  # a write cut short (disk full, kill): the row is rewritten
                log(f"warning: {path}:{number}: skipping a torn metrics row")
        ckpt.write_text_atomic(path, "".join(r + "\n" for r in kept))

    def _before_checkpoint(self, row: dict) -> bool:
        """Whether a metrics row describes training the checkpoint already holds: rows with a
        step (step and epoch rows) up to its step, the others (validation, test) up to its epoch."""
        return row["step"] <= self.step if "step" in row else row.get("epoch", 0) <= self.epoch

    # ---------------------------------------------------------------- training
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, users, epoch: int) -> torch.Tensor:
        """One optimizer step on a global batch of users (host-side indices); returns this
        rank's (detached) loss share, which is also added to the epoch's sum.

        This rank takes its contiguous share of the batch, in micro-batches (see
        `micro_batches`). The loss is normalised by the valid positions of the whole global
        batch, which every rank can count from the data without communicating; DDP averages
        gradients over ranks, so each share is scaled by the world size. The result is the
        gradient of the one-process loss, whatever the world size, accumulation or bucketing.
        Nothing here waits for the device: the batch is planned on the host, and a non-finite
        step is skipped on the device (see `_apply_gradients`).
        """
        t = self.cfg.train
        users = np.asarray(users)
        scale = dist.world_size() / max(int(self.positions[users].sum()), 1)
        parts = self.micro_batches(self.rank_rows(users))
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        for i, (part, width) in enumerate(parts):
            last = i == len(parts) - 1  # DDP's gradient all-reduce runs in the last backward
            with contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                batch = self.batch(part, epoch, width)
                with self.autocast():
                    loss_sum, _ = self.objective(batch)
                part_loss = loss_sum * scale
                self.scaler.scale(part_loss).backward()
                loss += part_loss.detach()
        if t.l2_emb > 0:
            loss += self._embedding_penalty(t.l2_emb)
        self._apply_gradients(loss)
        self.scheduler.step()
        self.step += 1
        self.epoch_loss += loss  # before a mid-epoch checkpoint, which must include this step
        for callback in self.callbacks:  # on every rank (seqrec.callbacks)
            callback.on_step(self)
        if t.save_every_steps and self.step % t.save_every_steps == 0:
            self.save(ckpt.LATEST)
        return loss

    def _embedding_penalty(self, l2: float) -> torch.Tensor:
        """Back-propagate l2 x the model's `embedding_penalty()` once per step and rank; returns
        its value, which the logged loss includes.

        After the micro-batches, not in each: it is a term of the step, not of a batch of users.
        Under DDP its gradient lands after the all-reduce, the same on every rank (so are the
        parameters), which is the average DDP would take of it. Not Adam's weight_decay: that
        would add the term after clipping (and after fp16's unscale), changing the clipped gradient.
        """
        penalty = l2 * self.model.embedding_penalty()
        self.scaler.scale(penalty).backward()
        return penalty.detach()

    def _apply_gradients(self, loss: torch.Tensor) -> None:
        """Clip and step, skipping a step with a non-finite gradient on the device.

        Gradients are identical on all ranks after DDP's all-reduce, so the skip is too. The
        fused Adam leaves parameters, moments and its step counter untouched where
        `found_inf` is 1 (the flag GradScaler uses); under fp16 the GradScaler sets it
        itself from its overflow check (overflows are its normal working and not counted),
        and a non-finite loss is what counts toward max_bad_steps.
        """
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.train.grad_clip
        if clip > 0:
            norm = nn.utils.clip_grad_norm_(params, clip, foreach=True)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.bad_steps.update(~torch.isfinite(loss))
            return
        bad = ~torch.isfinite(norm)
        self.optimizer.found_inf = bad.float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.bad_steps.update(bad)

    def read_counters(self, final: bool = False) -> float:
        """The one host read of a log boundary: the epoch's loss so far (this rank's shares,
        or, at the epoch's end (`final`), the global mean over ranks) and the non-finite step
        counters; stops the run after max_bad_steps consecutive skipped steps.

        Under DDP the counters, and whether a rank got a stop signal, are reduced first so that
        every rank takes the same decisions.
        """
        loss = self.epoch_loss.clone()
        flags = torch.cat([self.bad_steps.state, self.bad_steps.state.new_tensor([self.stops.requested])])
        if final:
            loss = dist.all_reduce_sum(loss) / dist.world_size()
        dist.all_reduce_max(flags)
        loss, run, longest, skipped, stop = torch.cat([loss.reshape(1), flags.double()]).tolist()
        # Under torchrun the ranks stop together, at the first boundary after any got a signal.
        self.stop_agreed = bool(stop) and dist.active()
        self.bad_steps.reset_window()
        limit = self.cfg.train.max_bad_steps
        if skipped:
            log(f"warning: {int(skipped)} step(s) up to step {self.step} had a non-finite loss or gradient "
                f"and were skipped (longest run {int(longest)}, limit {limit} in a row)")
        if longest >= limit:
            raise TrainingError(f"{int(longest)} consecutive non-finite steps (by step {self.step}); "
                                f"stopping. Lower --lr or check the data; the last good checkpoint is kept")
        return loss

    @property
    def stopping(self) -> bool:
        """Whether to stop now: alone, at the first step boundary after a signal; under torchrun,
        at the log boundary where the ranks agreed (see `read_counters`)."""
        return self.stops.requested and not dist.active() or self.stop_agreed

    def preempt(self) -> None:
        """Checkpoint the steps taken so far and stop (a signal asked for it)."""
        self.save(ckpt.LATEST)
        name = signal.Signals(self.stops.signum or signal.SIGTERM).name
        raise Preempted(self.stops.signum or signal.SIGTERM,
                        f"{name}: stopped at step {self.step} and saved {self.run_dir / ckpt.LATEST}; "
                        f"rerun with --resume to continue")

    def batch(self, users: np.ndarray, epoch: int, width: int) -> dict:
        """The training batch of host-side `users` at this step, cut to its last `width` columns.

        Compiled runs get the fixed shapes a compiled graph (and a CUDA graph) is specialised
        for: widths rounded up to a multiple of maxlen / 8, and rows padded to the full
        micro-batch (`BatchPlan.rows`). The negatives are those the loss declared.
        """
        t = self.cfg.train
        if t.compile:
            quantum = -(-self.cfg.model.maxlen // 8)
            width = min(self.cfg.model.maxlen, -(-width // quantum) * quantum)
        index = torch.from_numpy(np.ascontiguousarray(users, dtype=np.int64))
        if self.device.type == "cuda":  # from pinned memory the copy does not wait for the device
            index = index.pin_memory()
        plan = BatchPlan(users=index.to(self.device, non_blocking=True), seed=t.seed, epoch=epoch, step=self.step,
                         width=width, rows=self.micro_rows if t.compile else None, negatives=self.loss_fn.negatives)
        return self.data.train_batch(plan)

    @property
    def micro_rows(self) -> int:
        """Rows of the largest micro-batch of a step on one rank."""
        t = self.cfg.train
        return -(-t.batch_size // (dist.world_size() * t.grad_accum_steps * self.length_buckets))

    def micro_batches(self, rows: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """This rank's rows as (users, width) micro-batches: grad_accum_steps x length_buckets
        groups of similar history length, each to be cut to its longest history.

        Training windows are left-padded to maxlen, and a random batch of ML-1M users is about
        half padding (median history ≈ 100 of 200). Sorted by length and split, each group
        drops the columns that are padding for all its members, so token-wise work shrinks
        with the padding and attention with its square. The loss is a sum over positions,
        so the step's gradient is the same however the rows are grouped; only the order in
        which dropout masks are drawn changes. Planned on the host (numpy) from lengths known
        at load time: no device read.
        """
        t = self.cfg.train
        lengths = self.positions[rows]
        if self.length_buckets > 1:
            order = np.argsort(lengths, kind="stable")
            rows, lengths = rows[order], lengths[order]
        count = t.grad_accum_steps * self.length_buckets
        parts = [(part, int(lens.max())) for part, lens in zip(np.array_split(rows, count),
                                                              np.array_split(lengths, count)) if len(part)]
        # A rank without rows (the last, short global batch) still runs one empty micro-batch:
        # its backward is what joins DDP's gradient all-reduce.
        return parts or [(rows, 1)]

    def rank_rows(self, users: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of a global batch (ranks' shares concatenate to the batch)."""
        per_rank = -(-len(users) // dist.world_size())
        return users[dist.rank() * per_rank:(dist.rank() + 1) * per_rank]

    def train_epoch(self, epoch: int) -> dict:
        """The epoch's steps, starting after any already taken (a mid-epoch checkpoint)."""
        t = self.cfg.train
        self.model.train()
        order = self.data.epoch_order(t.seed, epoch).cpu().numpy()  # one read per epoch; steps plan on the host
        first = self.step - (epoch - 1) * self.steps_per_epoch
        meter, samples = EpochMonitor(self.device), 0  # this rank's users, for per-rank samples/s
        start = meter.start
        bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch}", leave=False,
                   disable=None if dist.is_main() else True)
        for i in range(first, self.steps_per_epoch):
            users = order[i * t.batch_size:(i + 1) * t.batch_size]
            self.train_step(users, epoch)
            samples += len(self.rank_rows(users))
            if (i + 1) % t.log_every == 0 and i + 1 < self.steps_per_epoch:
                loss = self.read_counters() / (i + 1)  # this rank's shares: rank 0's view of the loss
                self._write_metrics({"type": "step", "epoch": epoch, "step": self.step, "loss": loss,
                                     "lr": self.scheduler.get_last_lr()[0]}, "on_step_logged")
                bar.set_postfix(loss=f"{loss:.4f}",
                                seq_s=f"{(i + 1 - first) * t.batch_size / (time.perf_counter() - start):.0f}")
            bar.update(1)
            if self.stopping:
                bar.close()
                self.preempt()
        bar.close()
        loss = self.read_counters(final=True)
        if self.stopping:
            self.preempt()
        seconds = meter.elapsed()
        self.epoch_loss.zero_()
        return {"type": "train", "epoch": epoch, "step": self.step, "loss": loss / self.steps_per_epoch,
                "lr": self.scheduler.get_last_lr()[0], "seconds": round(seconds, 3), **meter.report(samples, seconds)}

    # ---------------------------------------------------------------- evaluation
    def validate(self) -> dict:
        """Validation metrics, plus what the callbacks measure beside them (main rank, which
        writes the row; seqrec.callbacks)."""
        metrics = evaluate(self.model, self.data.splits["valid"], self.cfg.eval, self.data.num_items)
        if dist.is_main():
            for callback in self.callbacks:
                metrics.update(callback.validation_metrics(self))
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

    def fit(self, test: bool = True) -> dict:
        """Train to num_epochs (or an early stop), then evaluate the best checkpoint: on the
        validation split and, unless `test` is False (the tuner never looks at it), the test split."""
        provenance.record_start(self.run_dir, self.step, self.device)
        log(f"training {type(self.model).__name__} ({sum(p.numel() for p in self.model.parameters()):,} parameters) "
            f"on {self.data.num_train_users:,} users, {self.data.num_items:,} items, "
            f"{self.steps_per_epoch} steps/epoch, device {self.device}, world size {dist.world_size()}, "
            f"amp {self.amp_dtype or 'off'}")
        self._emit("on_train_start", {"type": "start", "step": self.step, "epoch": self.epoch,
                                      "resumed": self.step > 0})
        with self.stops.installed():
            return self._fit(test)

    def _fit(self, test: bool) -> dict:
        t = self.cfg.train
        stop = False
        while self.epoch < t.num_epochs and not stop:
            with self.stops.deferred():  # a signal in training ends the step it arrives in (see `preempt`)
                row = self.train_epoch(self.epoch + 1)
                self.epoch += 1
                self.train_seconds += row["seconds"]
                self._write_metrics(row, "on_step_logged")
            if self.epoch % t.eval_every == 0 or self.epoch == t.num_epochs:
                metrics = self.validate()
                self._write_metrics({"type": "valid", "epoch": self.epoch, **metrics}, "on_validation")
                log(f"epoch {self.epoch:4d}  loss {row['loss']:.4f}  {row['seconds']:.1f}s  {describe(row)}  "
                    f"valid {format_metrics(metrics)}")
                stop = self._track_best(metrics)
            with self.stops.deferred():
                self.save(ckpt.LATEST)
            if self.stopping:
                self.preempt()
        if stop:
            log(f"early stop: no validation improvement in {t.early_stop_patience} evaluations")
        return self.test(splits=("valid", "test") if test else ("valid",))

    def load_best(self) -> None:
        """The best-validation weights, read by rank 0 and broadcast: run directories need not
        be shared between nodes, so other ranks never read one."""
        best_path = self.run_dir / ckpt.BEST
        found = dist.broadcast_object(dist.is_main() and best_path.exists())
        if not found:
            return
        if dist.is_main():
            self.model.load_state_dict(ckpt.load(best_path)["model"])
        for tensor in self.model.state_dict().values():
            dist.broadcast(tensor)

    def test(self, splits: tuple[str, ...] = ("valid", "test")) -> dict:
        """Evaluate the best-validation checkpoint on `splits`; write results.json."""
        self.load_best()
        results = {"best_epoch": self.best["epoch"], "epochs": self.epoch,
                   "train_seconds": round(self.train_seconds, 1)}
        for split in splits:
            results[split] = evaluate(self.model, self.data.splits[split], self.cfg.eval, self.data.num_items)
            log(f"best epoch {self.best['epoch']}  {split:5s} {format_metrics(results[split])}")
        if "test" in results:
            self._write_metrics({"type": "test", "epoch": self.epoch, **results["test"]})
        if dist.is_main():
            ckpt.write_text_atomic(self.run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        self._emit("on_train_end", results)
        return results

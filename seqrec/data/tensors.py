"""Padded tensors built once, on the training device, and sliced into batches.

Training input for user u is the left-padded window of its training items
(the last maxlen + 1), shifted by one: input = window[:-1], positives = window[1:]
where the input is an item (a padded input has no target, as in the SASRec port).
Validation input is the training part and its target the second-last item; test
input is the training part plus the validation item and its target the last item,
so no input ever contains its own target.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sampling import (STREAM_EVAL, STREAM_ORDER, STREAM_SHARED, STREAM_TRAIN, ItemSampler, UnseenSampler,
                       draw_negatives, hash_ints)
from .sequences import Sequences

Batch = dict[str, torch.Tensor]


@dataclass
class EvalSplit:
    """Inputs, targets and sampled-protocol candidates of one evaluation split."""

    users: torch.Tensor  # [E] user indices
    items: torch.Tensor  # [E, L]
    times: torch.Tensor | None  # [E, L]
    targets: torch.Tensor  # [E]
    negatives: torch.Tensor  # [E, eval_negatives], items the user never interacted with
    history: torch.Tensor  # sorted keys of the input items, for optional history masking

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, rows: slice | torch.Tensor) -> Batch:
        out = {"items": self.items[rows], "targets": self.targets[rows],
               "negatives": self.negatives[rows], "users": self.users[rows]}
        if self.times is not None:
            out["times"] = self.times[rows]
        return out


@dataclass(frozen=True)
class Negatives:
    """The sampled negatives a loss asks the data layer for (each loss in seqrec.losses declares its own)."""

    count: int = 0  # per position, or for the whole step when shared; 0 = none (the loss scores the catalogue)
    shared: bool = False  # one [count] set for the whole step, scored with one matmul, instead of a set per position
    sampler: ItemSampler | None = None  # their distribution (None: uniform); popularity for the logQ correction


@dataclass(frozen=True)
class BatchPlan:
    """One training micro-batch as the trainer plans it on the host; `train_batch` builds it.

    A plan rather than loose arguments because every field is a key of what the batch holds:
    users and width pick the windows, (seed, epoch) the per-position negatives, (seed, epoch,
    step) a shared set, `negatives` what the loss declared, `rows` the shape a compiled graph wants.
    """

    users: torch.Tensor  # [B] user indices, on the data's device
    seed: int
    epoch: int
    step: int = 0  # the optimizer step: keys shared negatives
    width: int | None = None  # keep the last `width` columns of the window (None: maxlen)
    rows: int | None = None  # pad to this many rows and make contiguous (None: as sliced)
    negatives: Negatives = Negatives()


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t with `rows` rows of zeros (padding) appended along the first dimension."""
    return torch.cat([t, t.new_zeros((rows, *t.shape[1:]))])


class SequenceTensors:
    """Everything the trainer and evaluator read, resident on one device."""

    def __init__(self, seqs: Sequences, maxlen: int, device: torch.device | str,
                 eval_negatives: int = 100, eval_seed: int = 0):
        self.num_items = seqs.num_items
        self.num_users = seqs.num_users
        self.digest = seqs.digest()  # checkpoints keep it: resuming on other data is refused
        self.maxlen = maxlen
        self.has_times = seqs.times is not None
        starts = seqs.offsets[:-1]
        train_len = seqs.train_lengths
        as_t = lambda a: None if a is None else torch.as_tensor(a, device=device)  # noqa: E731

        items, times = seqs.window(np.arange(self.num_users), starts + train_len, maxlen + 1)
        self.train_items, self.train_times = as_t(items), as_t(times)
        self.train_users = as_t(np.flatnonzero(train_len >= 2))
        # Valid training positions per user, kept on the host: the trainer plans its
        # micro-batches from them without reading the device.
        self.train_positions = torch.as_tensor(np.clip(train_len - 1, 0, maxlen))
        self.train_history = as_t(seqs.history_keys(train_len))
        # Training negatives are drawn outside train_history by construction (no redraw loop);
        # the popularity version is built on first use, from the loss's counts.
        self._unseen = UnseenSampler(self.train_history, self.num_items, self.num_users)
        self._unseen_popular: tuple[ItemSampler, UnseenSampler] | None = None
        self.item_counts = torch.bincount(as_t(seqs.items[seqs.prefix_mask(train_len)]),
                                          minlength=self.num_items + 1)
        full_history = as_t(seqs.history_keys(seqs.lengths))
        users = np.flatnonzero(seqs.lengths >= 3)
        inputs = {"valid": (train_len, self.train_history),  # validation input = the training part
                  "test": (train_len + 1, as_t(seqs.history_keys(train_len + 1)))}
        self.splits = {
            name: self._eval_split(seqs, users, input_len, history, full_history, eval_negatives, eval_seed, as_t)
            for name, (input_len, history) in inputs.items()
        }

    def _eval_split(self, seqs, users, input_len, history, full_history, num_neg, seed, as_t) -> EvalSplit:
        end = (seqs.offsets[:-1] + input_len)[users]
        items, times = seqs.window(users, end, self.maxlen)
        users_t = as_t(users)
        negatives = draw_negatives(full_history, self.num_items, users_t[:, None],
                                   torch.arange(num_neg, device=users_t.device)[None, :], seed, STREAM_EVAL)
        return EvalSplit(users=users_t, items=as_t(items), times=as_t(times),
                         targets=as_t(seqs.items[end]), negatives=negatives,
                         history=history)

    @property
    def num_train_users(self) -> int:
        return len(self.train_users)

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """A seeded permutation of training users, a pure function of (seed, epoch)."""
        keys = hash_ints(seed, STREAM_ORDER, epoch, self.train_users)
        return self.train_users[torch.argsort(keys)]

    def _unseen_sampler(self, sampler: ItemSampler | None) -> UnseenSampler:
        """The exclusion tables for `sampler`'s distribution (uniform ones are built in __init__)."""
        if sampler is None or sampler.counts is None:
            return self._unseen
        if self._unseen_popular is None or self._unseen_popular[0] is not sampler:
            self._unseen_popular = sampler, UnseenSampler(self.train_history, self.num_items, self.num_users, sampler)
        return self._unseen_popular[1]

    def train_batch(self, plan: BatchPlan) -> Batch:
        """Inputs, positives and (as `plan.negatives` asks) negatives for a batch of users.

        `plan.width` keeps only the last `width` positions (the right end of the left-padded
        window, where a batch of short histories has all its items); every kept entry,
        negatives included, is the one the full-width batch has in that column: a negative is
        a function of (seed, epoch, user, column, index) alone. With `plan.rows` the batch is
        padded with rows of padding (positive 0 everywhere, so they add nothing to a loss or its
        gradient) and made contiguous: the fixed shapes and strides a compiled graph is
        specialised for.
        """
        width = plan.width or self.maxlen
        window = self.train_items[plan.users, self.maxlen - width:]
        items = window[:, :-1]
        padding = items == 0  # left padding: the target of a real input is real, so pos == 0 here too
        pos = window[:, 1:].masked_fill(padding, 0)  # a padded input has no target (as in the SASRec port)
        batch = {"items": items, "pos": pos}
        if plan.negatives.count:  # a full-softmax loss needs none
            batch["neg"] = self._shared_negatives(plan) if plan.negatives.shared else self._negatives(plan, padding)
        if self.train_times is not None:
            batch["times"] = self.train_times[plan.users, self.maxlen - width:-1]
        return batch if plan.rows is None else self._fixed_shapes(batch, plan)

    def _negatives(self, plan: BatchPlan, padding: torch.Tensor) -> torch.Tensor:
        """Per position: [B, L] for k = 1, [B, L, k] for k > 1, each outside the user's training
        history, drawn from the sampler's distribution (default uniform) restricted to the items
        outside it, loop-free and without reading the device; 0 at padding positions."""
        k, width = plan.negatives.count, padding.shape[1]
        slots = torch.arange((self.maxlen - width) * k, self.maxlen * k, device=plan.users.device).view(width, k)
        neg = self._unseen_sampler(plan.negatives.sampler).draw(plan.users, slots, plan.seed, STREAM_TRAIN, plan.epoch)
        neg = neg.masked_fill_(padding[..., None], 0)
        return neg if k > 1 else neg[..., 0]

    def _shared_negatives(self, plan: BatchPlan) -> torch.Tensor:
        """One [k] set keyed by (seed, epoch, step) alone, so every rank and micro-batch of the step
        gets the same set; it may hit a position's positive (the loss masks those)."""
        slots = torch.arange(plan.negatives.count, device=plan.users.device)
        sampler = plan.negatives.sampler or ItemSampler(self.num_items)
        return sampler(hash_ints(plan.seed, STREAM_SHARED, plan.epoch, plan.step, slots))

    @staticmethod
    def _fixed_shapes(batch: Batch, plan: BatchPlan) -> Batch:
        """`batch` padded to `plan.rows` rows and contiguous; a shared [k] set has no rows to pad."""
        pad = plan.rows - len(plan.users)
        return {key: value.contiguous() if not pad or key == "neg" and plan.negatives.shared else pad_rows(value, pad)
                for key, value in batch.items()}

"""From raw interactions to per-user sequences and the leave-one-out split.

Sequences are stored once as a flat array with per-user offsets (CSR), so that every
view the trainer and the evaluator need -- the training window, the validation and
test inputs -- is a vectorised gather, never a per-user Python loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .readers import DataError, Interactions


@dataclass(frozen=True)
class Sequences:
    """Chronological item sequences of all users, ids remapped to 1..num_items (0 = padding)."""

    user_ids: np.ndarray  # original user id of user index u
    item_ids: np.ndarray  # original item id of item index i + 1
    offsets: np.ndarray  # int64 [num_users + 1]; user u owns items[offsets[u]:offsets[u + 1]]
    items: np.ndarray  # int64 [num_interactions]
    times: np.ndarray | None  # int64 seconds, aligned with items; None without timestamps

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def train_lengths(self) -> np.ndarray:
        """Leave-one-out: the last two items are validation and test; shorter users keep all for training."""
        n = self.lengths
        return np.where(n >= 3, n - 2, n)

    def window(self, users: np.ndarray, end: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Left-padded [len(users), length] items (and times) of each user's history before flat index end[k]."""
        idx = end[:, None] - length + np.arange(length)[None, :]
        valid = idx >= self.offsets[users, None]
        idx = np.where(valid, idx, 0)
        items = np.where(valid, self.items[idx], 0)
        times = None if self.times is None else np.where(valid, self.times[idx], 0)
        return items, times

    def prefix_mask(self, upto: np.ndarray) -> np.ndarray:
        """Mask over the flat items selecting each user's first upto[u] interactions."""
        rank = np.arange(len(self.items)) - np.repeat(self.offsets[:-1], self.lengths)
        return rank < np.repeat(upto, self.lengths)

    def history_keys(self, upto: np.ndarray) -> np.ndarray:
        """Sorted unique keys user * (num_items + 1) + item over each user's first upto[u] items.

        A sorted key array answers "has user u seen item i?" for a whole batch with one
        searchsorted, which is how negatives are excluded on the device.
        """
        keep = self.prefix_mask(upto)
        users = np.repeat(np.arange(self.num_users), self.lengths)[keep]
        return np.unique(users * (self.num_items + 1) + self.items[keep])


def _remap(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense 0-based codes; numeric ids sort numerically so user 10 follows user 9."""
    try:
        numeric = ids.astype(np.int64)
    except ValueError:
        return np.unique(ids, return_inverse=True)
    uniq, codes = np.unique(numeric, return_inverse=True)
    return uniq.astype(str), codes


def _count_filter(interactions: Interactions, min_user: int, min_item: int) -> Interactions:
    """One-pass count filter as in SASRec's preprocessing (counts taken before dropping)."""
    if min_user <= 1 and min_item <= 1:
        return interactions
    _, ucode, ucount = np.unique(interactions.users, return_inverse=True, return_counts=True)
    _, icode, icount = np.unique(interactions.items, return_inverse=True, return_counts=True)
    keep = (ucount[ucode] >= min_user) & (icount[icode] >= min_item)
    ts = None if interactions.timestamps is None else interactions.timestamps[keep]
    return Interactions(interactions.users[keep], interactions.items[keep], ts, interactions.path)


def build_sequences(interactions: Interactions, min_user_count: int = 0, min_item_count: int = 0) -> Sequences:
    """Filter, remap ids and sort each user's interactions by time (stable: ties keep file order)."""
    data = _count_filter(interactions, min_user_count, min_item_count)
    if len(data.users) == 0:
        raise DataError(f"{data.path}: no interactions left after the count filter "
                        f"(min_user_count={min_user_count}, min_item_count={min_item_count})")
    user_ids, users = _remap(data.users)
    item_ids, items = _remap(data.items)
    order = np.arange(len(users))
    if data.timestamps is not None:
        order = np.argsort(data.timestamps, kind="stable")
    order = order[np.argsort(users[order], kind="stable")]
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=len(user_ids)), out=offsets[1:])
    times = None if data.timestamps is None else data.timestamps[order].astype(np.int64)
    seqs = Sequences(user_ids, item_ids, offsets, (items[order] + 1).astype(np.int64), times)
    if not (seqs.train_lengths >= 2).any():
        raise DataError(f"{data.path}: no user has the 2 interactions needed for a training pair")
    if not (seqs.lengths >= 3).any():
        raise DataError(f"{data.path}: no user has the 3 interactions needed for a validation and a test item")
    return seqs

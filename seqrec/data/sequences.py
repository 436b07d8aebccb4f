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
        return _sorted_unique(users * (self.num_items + 1) + self.items[keep])


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique(values) by sort and compare: numpy 2's hash-based np.unique took 46 s for
    20M int64 keys (ML-20M's histories) on this machine, a sort 0.25 s."""
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))]


def _canonical_ints(ids: np.ndarray) -> np.ndarray | None:
    """String ids as int64 when every one is a plain decimal ("0", or 1-18 digits without a
    leading zero), else None. Such strings and their numbers correspond one to one, so they
    can be counted and sorted as numbers. Read column by column from the characters' code
    points: ~1 s for 20M ids, where ids.astype(np.int64) took 5 s."""
    width = ids.dtype.itemsize // 4
    if ids.dtype.kind != "U" or width == 0 or len(ids) == 0:
        return None
    chars = np.ascontiguousarray(ids).view(np.uint32).reshape(len(ids), width)
    numbers = np.zeros(len(ids), dtype=np.int64)
    length = np.zeros(len(ids), dtype=np.int64)
    ended = np.zeros(len(ids), dtype=bool)  # numpy pads shorter strings with trailing NULs
    for k in range(width):
        digit = chars[:, k] - ord("0")  # wraps around below "0"
        end = chars[:, k] == 0
        if ((digit > 9) & ~end).any() or (ended & ~end).any():  # not a digit, or a NUL inside
            return None
        ended = end
        numbers = np.where(end, numbers, numbers * 10 + digit)
        length += ~end
    if not 0 < length.min() <= length.max() <= 18 or ((chars[:, 0] == ord("0")) & (length > 1)).any():
        return None  # "", over 18 digits (int64 overflow), or a leading zero as in "007"
    return numbers


def _unique_ints(numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(numbers, return_inverse=True); for ids in a range up to a few times their
    count (ML-20M's: 0.1 s instead of 1-2 s for a sort of 20M) through a presence table."""
    low, high = int(numbers.min()), int(numbers.max())
    if high - low > 4 * len(numbers) + 1024:
        return np.unique(numbers, return_inverse=True)
    present = np.zeros(high - low + 1, dtype=bool)
    present[numbers - low] = True
    return np.flatnonzero(present) + low, (np.cumsum(present) - 1)[numbers - low]


def _string_codes(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ids (sorted) and each entry's index among them; ids compared as strings."""
    numeric = _canonical_ints(ids)
    if numeric is None:
        return np.unique(ids, return_inverse=True)
    uniq, codes = _unique_ints(numeric)
    return uniq.astype(str), codes  # canonical decimals: str(number) is the original string


def _remap(uniq: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids still present and dense 0-based codes over them; numeric ids sort numerically so
    user 10 follows user 9 (and "007" and "7" become one id "7"). Decided on the small
    array of distinct ids, so the per-entry work is one gather."""
    present = np.bincount(codes, minlength=len(uniq)) > 0
    ids = uniq[present]
    try:
        ids, rank = np.unique(ids.astype(np.int64), return_inverse=True)
        ids = ids.astype(str)
    except ValueError:
        rank = np.arange(len(ids))  # uniq came sorted as strings
    mapping = np.zeros(len(uniq), dtype=np.int64)
    mapping[present] = rank
    return ids, mapping[codes]


def build_sequences(interactions: Interactions, min_user_count: int = 0, min_item_count: int = 0) -> Sequences:
    """Filter, remap ids and sort each user's interactions by time (stable: ties keep file order).

    The count filter is one pass, as in SASRec's preprocessing: counts are taken before
    dropping. Ids are turned into codes once, and filtered as codes, not as strings."""
    user_uniq, users = _string_codes(interactions.users)
    item_uniq, items = _string_codes(interactions.items)
    timestamps = interactions.timestamps
    if min_user_count > 1 or min_item_count > 1:
        keep = (np.bincount(users)[users] >= min_user_count) & (np.bincount(items)[items] >= min_item_count)
        users, items = users[keep], items[keep]
        timestamps = None if timestamps is None else timestamps[keep]
    if len(users) == 0:
        raise DataError(f"{interactions.path}: no interactions left after the count filter "
                        f"(min_user_count={min_user_count}, min_item_count={min_item_count})")
    user_ids, users = _remap(user_uniq, users)
    item_ids, items = _remap(item_uniq, items)
    order = np.arange(len(users))
    if timestamps is not None:
        order = np.argsort(timestamps, kind="stable")
    order = order[np.argsort(users[order], kind="stable")]
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=len(user_ids)), out=offsets[1:])
    times = None if timestamps is None else timestamps[order].astype(np.int64)
    seqs = Sequences(user_ids, item_ids, offsets, (items[order] + 1).astype(np.int64), times)
    if not (seqs.train_lengths >= 2).any():
        raise DataError(f"{interactions.path}: no user has the 2 interactions needed for a training pair")
    if not (seqs.lengths >= 3).any():
        raise DataError(f"{interactions.path}: no user has the 3 interactions needed for a validation and a test item")
    return seqs

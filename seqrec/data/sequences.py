"""From raw interactions to per-user sequences and the leave-one-out split.

Sequences are stored once as a flat array with per-user offsets (CSR), so that every
view the trainer and the evaluator need -- the training window, the validation and
test inputs -- is a vectorised gather, never a per-user Python loop.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .readers import DataError, Interactions


FILE = "sequences.npz"  # in a run directory: the users' sequences the run was trained on


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

    def to_bytes(self) -> bytes:
        """The sequences as an .npz file's bytes: what a run directory keeps (`FILE`) so that
        recommending for known users and evaluating never re-read the training data.
        Indices are stored as int32 where they fit: ML-1M's million interactions take 4 MB."""
        index = np.int32 if self.num_items < 2**31 else np.int64
        arrays = {"offsets": self.offsets, "items": self.items.astype(index),
                  **_packed_ids("user_ids", self.user_ids), **_packed_ids("item_ids", self.item_ids)}
        if self.times is not None:
            arrays["times"] = self.times
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def load(cls, path: str | Path) -> Sequences:
        """The sequences `to_bytes` wrote to `path`, or DataError naming it."""
        try:
            with np.load(path, allow_pickle=False) as f:
                return cls(_unpacked_ids(f, "user_ids"), _unpacked_ids(f, "item_ids"), f["offsets"].astype(np.int64),
                           f["items"].astype(np.int64), f["times"].astype(np.int64) if "times" in f else None)
        except FileNotFoundError:
            raise DataError(f"{path}: no such file") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise DataError(f"{path}: not a sequences file ({type(err).__name__})") from None

    def digest(self) -> str:
        """A hash of what training reads (ids, order, times): a resumed run's data must match it."""
        h = hashlib.sha256()
        for a in (self.user_ids.astype(str), self.item_ids.astype(str), self.offsets, self.items,
                  self.times if self.times is not None else np.empty(0)):
            h.update(np.ascontiguousarray(a).tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]

    def history_keys(self, upto: np.ndarray) -> np.ndarray:
        """Sorted unique keys user * (num_items + 1) + item over each user's first upto[u] items.

        A sorted key array answers "has user u seen item i?" for a whole batch with one
        searchsorted, which is how negatives are excluded on the device.
        """
        keep = self.prefix_mask(upto)
        users = np.repeat(np.arange(self.num_users), self.lengths)[keep]
        return _sorted_unique(users * (self.num_items + 1) + self.items[keep])


def _packed_ids(name: str, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Decimal ids as int64 (8 bytes each instead of 4 per character), other ids as strings."""
    ids = np.asarray(ids).astype(str)
    numbers = _decimal_ints(ids)
    if numbers is not None and numbers[1]:  # canonical: str(number) gives each id back
        return {f"{name}_int": numbers[0]}
    return {name: ids}


def _unpacked_ids(f, name: str) -> np.ndarray:
    return f[f"{name}_int"].astype(str) if f"{name}_int" in f else f[name]


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique(values) by sort and compare: numpy 2's hash-based np.unique took 46 s for
    20M int64 keys (ML-20M's histories) on this machine, a sort 0.25 s."""
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))]


def _decimal_ints(ids: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """String ids as int64 when every one is a plain decimal integer -- an optional "-", then
    ASCII digits only, within int64 -- else None; and whether all are canonical (no leading
    zero, no "-0"), i.e. str(number) gives each string back.

    Anything else that numpy's own conversion also reads as a number ("+1", "1_000", " 7",
    Unicode digits) keeps the whole column as strings, so distinct spellings stay distinct
    users or items. Read column by column from the characters' code points: ~1.2 s for 10M
    six-digit ids here, where ids.astype(np.int64) took 1.8 s."""
    width = ids.dtype.itemsize // 4
    if ids.dtype.kind != "U" or width == 0 or len(ids) == 0:
        return None
    chars = np.ascontiguousarray(ids).view(np.uint32).reshape(len(ids), width)
    negative = chars[:, 0] == ord("-")
    # The value of the digits modulo 2**64, as int64: with at most 19 significant digits the
    # value is below 10**19 < 2**64, so this is negative exactly when the value is 2**63 or more.
    magnitude = np.zeros(len(ids), dtype=np.int64)
    # Only strings of 20+ characters can have more significant digits; only they count them.
    significant = np.zeros(len(ids), dtype=np.int64) if width > 19 else None
    ended = np.zeros(len(ids), dtype=bool)  # numpy pads shorter strings with trailing NULs
    for k in range(width):
        digit = chars[:, k] - ord("0")  # uint32: wraps around below "0"
        end = chars[:, k] == 0
        is_digit = digit <= 9
        allowed = is_digit | end
        if k == 0:
            allowed |= negative
        if not allowed.all() or (ended & ~end).any():  # not a digit, or a NUL inside
            return None
        ended = end
        if significant is not None:
            significant += is_digit & ((magnitude != 0) | (digit > 0))
        magnitude = np.where(is_digit, magnitude * 10 + digit, magnitude)
    nul = np.zeros(len(ids), dtype=np.uint32)
    column = lambda k: chars[:, k] if k < width else nul  # noqa: E731
    first, second = np.where(negative, column(1), column(0)), np.where(negative, column(2), column(1))
    in_range = (magnitude >= 0) | (negative & (magnitude == -(2**63)))  # -2**63 has magnitude 2**63
    if (first == 0).any() or not in_range.all() or (significant is not None and significant.max() > 19):
        return None  # "", "-", or outside int64
    numbers = np.where(negative, -magnitude, magnitude)  # -(-2**63) wraps to -2**63, as it should
    canonical = not (((first == ord("0")) & (second != 0)) | (negative & (magnitude == 0))).any()
    return numbers, canonical


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
    parsed = _decimal_ints(ids)
    if parsed is None or not parsed[1]:
        return np.unique(ids, return_inverse=True)
    uniq, codes = _unique_ints(parsed[0])
    return uniq.astype(str), codes  # canonical decimals: str(number) is the original string


def _remap(uniq: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids still present and dense 0-based codes over them. Decided on the small array of
    distinct ids, so the per-entry work is one gather.

    The rule: when every id of the column is a plain decimal integer (an optional "-", then
    ASCII digits, within int64), ids are numbers: they sort numerically, so user 10 follows
    user 9, and spellings of one number are one id -- "007" and "7" (and "-0" and "0")
    become the id "7" ("0"). Otherwise every id is a string, compared and sorted as text, so
    "+1" and "1", or "1_000" and "1000", are different ids."""
    present = np.bincount(codes, minlength=len(uniq)) > 0
    ids = uniq[present]
    parsed = _decimal_ints(ids)
    if parsed is None:
        rank = np.arange(len(ids))  # uniq came sorted as strings
    else:
        numbers, rank = np.unique(parsed[0], return_inverse=True)
        ids = numbers.astype(str)
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

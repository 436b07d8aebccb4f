"""Counter-based negative sampling on the device.

Each negative is a pure function of (seed, stream, epoch, user, slot, attempt) through a
splitmix64 hash, instead of a draw from a stateful generator. That makes the
negatives independent of batch size, batch order, the number of ranks and of any
RNG state a resume would have to restore, and lets a batch be sampled in a handful
of vectorised tensor ops on whatever device holds it.
"""
from __future__ import annotations

import math

import torch

_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 constants as signed int64
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MAX_ATTEMPTS = 1000

# Streams keep the draws of different purposes independent under one seed.
STREAM_TRAIN = 1
STREAM_EVAL = 2
STREAM_ORDER = 3
STREAM_SHARED = 4


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shift_right(x, 30)
    x = x * _MIX1
    x = x ^ _shift_right(x, 27)
    x = x * _MIX2
    return x ^ _shift_right(x, 31)


def hash_ints(*keys: torch.Tensor | int) -> torch.Tensor:
    """Hash broadcastable integer keys to well-mixed non-negative int64 values."""
    tensors = [k for k in keys if isinstance(k, torch.Tensor)]
    h = torch.zeros((), dtype=torch.int64, device=tensors[0].device if tensors else None)
    for key in keys:
        h = _mix(h * _GOLDEN + key + _GOLDEN)
    return h & ((1 << 63) - 1)


def seen(history: torch.Tensor, num_items: int, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Whether users[..] has items[..] in its history (sorted keys user * (num_items + 1) + item)."""
    keys = users * (num_items + 1) + items
    pos = torch.searchsorted(history, keys).clamp_(max=history.numel() - 1)
    return history[pos] == keys


def _saw_everything(history: torch.Tensor, num_items: int, users: torch.Tensor) -> torch.Tensor:
    """Users with no unseen item left: they get plain uniform draws rather than an endless loop."""
    width = num_items + 1
    count = torch.searchsorted(history, (users + 1) * width) - torch.searchsorted(history, users * width)
    return count >= num_items


class ItemSampler:
    """Turns hashes into item ids 1..num_items: uniformly, or in proportion to `counts`.

    Popularity draws invert the cumulative counts with one searchsorted, so they are
    as vectorised and as reproducible as uniform ones. `log_q` is the log-probability
    of drawing each item, which the logQ correction subtracts from sampled logits.
    """

    def __init__(self, num_items: int, counts: torch.Tensor | None = None):
        self.num_items = num_items
        self.cumulative = None if counts is None else counts.cumsum(0)  # counts[0] (padding) is 0
        # Clamped so that padding and never-seen items get a finite value; they are never drawn.
        self.log_q_table = None if counts is None else (counts.clamp_min(1).double() / counts.sum()).log().float()

    def __call__(self, hashes: torch.Tensor) -> torch.Tensor:
        if self.cumulative is None:
            return 1 + hashes % self.num_items
        return torch.searchsorted(self.cumulative, hashes % self.cumulative[-1], right=True)

    def log_q(self, items: torch.Tensor) -> torch.Tensor:
        if self.log_q_table is None:
            return torch.full(items.shape, -math.log(self.num_items), device=items.device)
        return self.log_q_table.to(items.device)[items]


def draw_negatives(history: torch.Tensor, num_items: int, users: torch.Tensor, slots: torch.Tensor,
                   seed: int, stream: int, epoch: int = 0, sampler: ItemSampler | None = None) -> torch.Tensor:
    """Items in 1..num_items outside each user's history, one per (user, slot).

    users and slots broadcast to the output shape. Rejected draws are redrawn with the
    next attempt counter until none collides (sampling with replacement across slots,
    as the papers do). A user who has seen every item gets unrestricted draws. `sampler`
    (default: uniform) sets the distribution the draws follow before the exclusion.
    """
    sampler = sampler or ItemSampler(num_items)
    users, slots = torch.broadcast_tensors(users, slots)
    out = sampler(hash_ints(seed, stream, epoch, users, slots, 0))
    bad = seen(history, num_items, users, out) & ~_saw_everything(history, num_items, users)
    attempt = 0
    while bool(bad.any()):
        attempt += 1
        if attempt > _MAX_ATTEMPTS:
            worst = users[bad][0].item()
            raise RuntimeError(f"user index {worst} has seen (almost) every item; cannot draw negatives")
        redraw = sampler(hash_ints(seed, stream, epoch, users[bad], slots[bad], attempt))
        out[bad] = redraw
        bad[bad.clone()] = seen(history, num_items, users[bad], redraw)
    return out

"""Counter-based negative sampling on the device.

Each negative is a pure function of (seed, stream, epoch, user, slot) through a
splitmix64 hash, instead of a draw from a stateful generator. That makes the
negatives independent of batch size, batch order, the number of ranks and of any
RNG state a resume would have to restore, and lets a batch be sampled in a handful
of vectorised tensor ops on whatever device holds it. The leading Python-int keys
(seed, stream, epoch, step) are folded into the hash state on the host with the same
64-bit arithmetic, so only tensor keys cost tensor ops.

Training negatives (`UnseenSampler`) are drawn outside the user's history by
construction, so there is nothing to redraw and no loop. With item weights w (1 for
uniform draws, the training counts for popularity draws), user u's sorted history
h_1 < ... < h_m and unseen weight W_u = W - w(H_u):

* draw r uniformly in [0, W_u) from the hash;
* the unseen item x it lands on is the one whose unseen-weight interval holds r. With
  e_k = the unseen weight below h_k (for unit weights h_k - k), exactly the t history
  items with e_k <= r lie below x: an h_k above x has at least x's interval below it,
  an h_k below x at most what lies below x;
* so x is where r + w(h_1..h_t) falls in the full cumulative weights: r + t + 1 for
  unit weights, a searchsorted over the cumulative counts for popularity.

t comes from one searchsorted over the sorted array of all users' keys
u * (W + 1) + e_k, built once on the device; the map r -> x is a bijection onto the
user's unseen items (uniform) or hits each unseen item i on exactly w_i values of r
(popularity), so the draws follow the wanted distribution restricted to the unseen
items exactly, in a fixed number of ops and without reading the device.

The sampled-evaluation candidates keep the published rejection construction
(`draw_negatives`): they are drawn once at setup, where its loop costs nothing.
"""
from __future__ import annotations

import math

import torch

_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 constants as signed int64
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
_MAX_ATTEMPTS = 1000
_SLOT_BITS = 32  # a training hash key is user << 32 | slot

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


def _mix_int(x: int) -> int:
    """`_mix` of the 64-bit pattern x (0 <= x < 2**64) on the host: the same bits, no tensor op."""
    x ^= x >> 30
    x = x * _MIX1 & _MASK64
    x ^= x >> 27
    x = x * _MIX2 & _MASK64
    return x ^ x >> 31


def _as_int64(x: int) -> int:
    """The 64-bit pattern x as the signed value an int64 tensor holds."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _hash_state(keys: tuple[torch.Tensor | int, ...]) -> torch.Tensor:
    """The signed int64 splitmix state after absorbing keys: state = mix(state * golden + key + golden).

    The leading Python ints are absorbed on the host, so the first tensor key costs one
    add and a mix, each later key a multiply-add and a mix.
    """
    state = 0
    for i, key in enumerate(keys):
        if isinstance(key, torch.Tensor):
            break
        state = _mix_int((state * _GOLDEN + key + _GOLDEN) & _MASK64)
    else:
        return torch.tensor(_as_int64(state))
    h = _mix(key.long() + _as_int64(state * _GOLDEN + _GOLDEN))
    for key in keys[i + 1:]:
        h = _mix(h * _GOLDEN + key + _GOLDEN)
    return h


def hash_ints(*keys: torch.Tensor | int) -> torch.Tensor:
    """Hash broadcastable integer keys to well-mixed non-negative int64 values."""
    return _hash_state(keys) & _MASK63


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
        self.counts = counts  # integer [num_items + 1], counts[0] (padding) is 0
        self.cumulative = None if counts is None else counts.cumsum(0)
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


class UnseenSampler:
    """`sampler`'s distribution restricted to the items outside each user's history, loop-free.

    The construction is the module docstring's. Built once, on the history's device, with
    tensor ops only (no host read): the sorted array of per-user keys u * (W + 1) + e_k,
    for popularity the prefix sums of the history weights, and one [num_users, 4] row per
    user (modulus W_u, key base u * (W + 1), output offset, hash key u << 32), so a batch
    gathers its users' constants in one op. A user with no unseen weight left (who saw
    every item, or every item with a count) gets unrestricted draws: modulus W, and keys
    placed above every draw, so t = 0 and the map is the plain inverse of the weights.
    Counts must be integers: the arithmetic is exact.
    """

    def __init__(self, history: torch.Tensor, num_items: int, num_users: int, sampler: ItemSampler | None = None):
        device = history.device
        width = num_items + 1
        user = torch.div(history, width, rounding_mode="floor")
        item = history - user * width
        bounds = torch.searchsorted(history, torch.arange(num_users + 1, device=device) * width)
        start = bounds[:-1]
        counts = None if sampler is None else sampler.counts
        self.cumulative = None if counts is None else sampler.cumulative
        if counts is None:  # unit weights: the prefix weight of index p is p itself
            self.prefix = None
            total = num_items
            below = item - torch.arange(history.numel(), device=device) + start[user] - 1  # h_k - k
            unseen = total - (bounds[1:] - start)
            prefix_start = start - 1  # the offset also carries the "+ 1" of x = r + t + 1
        else:
            self.prefix = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), counts[item].cumsum(0)])
            total = self.cumulative[-1]
            prefix_start = self.prefix[start]
            below = self.cumulative[item - 1] - (self.prefix[:-1] - prefix_start[user])
            unseen = total - (self.prefix[bounds[1:]] - prefix_start)
        nothing_left = unseen <= 0
        base = torch.arange(num_users, device=device) * (total + 1)
        self.keys = base[user] + torch.where(nothing_left[user], total, below)
        modulus = torch.where(nothing_left, total, unseen)
        user_key = torch.arange(num_users, device=device) << _SLOT_BITS
        self.table = torch.stack([modulus, base, -base - prefix_start, user_key], 1)

    def _rows(self, users: torch.Tensor, dims: int) -> tuple[torch.Tensor, ...]:
        """Each user's modulus, key base, output offset and hash key, [len(users)] + [1] * dims (one gather)."""
        return self.table[users].view(-1, 4, *(1,) * dims).unbind(1)

    def _land(self, query: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The item a draw lands on, from query = r + base: x = r + w(h_1..h_t) inverted."""
        pos = torch.searchsorted(self.keys, query, right=True)  # start_u + t
        target = query + (pos if self.prefix is None else self.prefix[pos]) + offset
        return target if self.cumulative is None else torch.searchsorted(self.cumulative, target, right=True)

    def item_at(self, users: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The item that draw r in [0, W_u) of user users[b] lands on; r is [len(users), ...]."""
        _, base, offset, _ = self._rows(users, r.dim() - 1)
        return self._land(r + base, offset)

    def draw(self, users: torch.Tensor, slots: torch.Tensor, seed: int, stream: int, epoch: int) -> torch.Tensor:
        """Items [len(users), *slots.shape], one per (user, slot), a pure function of (seed, stream, epoch, user, slot).

        slots are non-negative and below 2**32 (they share one hash key with the user).
        """
        modulus, base, offset, user_key = self._rows(users, slots.dim())
        # The floor remainder of the signed state is as uniform as that of the masked one, one op cheaper.
        r = _hash_state((seed, stream, epoch, user_key + slots)) % modulus
        return self._land(r + base, offset)


def draw_negatives(history: torch.Tensor, num_items: int, users: torch.Tensor, slots: torch.Tensor,
                   seed: int, stream: int, epoch: int = 0) -> torch.Tensor:
    """Items in 1..num_items outside each user's history, one per (user, slot): the sampled-evaluation candidates.

    users and slots broadcast to the output shape. Uniform draws; rejected ones are
    redrawn with the next attempt counter until none collides (sampling with
    replacement across slots, as the papers do). A user who has seen every item gets
    unrestricted draws. Each round reads the device, which is why training uses
    `UnseenSampler` instead; this runs once at setup and fixes the published candidates.
    """
    sampler = ItemSampler(num_items)
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

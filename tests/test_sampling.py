"""Negative sampling: the loop-free training draws, the folded hash, the frozen evaluation candidates."""
import numpy as np
import pytest
import torch

from seqrec.data import Sequences, SequenceTensors
from seqrec.data.sampling import ItemSampler, UnseenSampler, hash_ints
from seqrec.data.tensors import BatchPlan, Negatives
from seqrec.tools.opcount import count_ops


# ---------------------------------------------------------------- frozen copy of the evaluation sampler
# The hash and the rejection sampler as they were before the training draws became loop-free
# (commit 23d099e): the sampled-evaluation candidates must stay exactly these.
def _frozen_shift_right(x, bits):
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _frozen_mix(x):
    x = x ^ _frozen_shift_right(x, 30)
    x = x * (0xBF58476D1CE4E5B9 - (1 << 64))
    x = x ^ _frozen_shift_right(x, 27)
    x = x * (0x94D049BB133111EB - (1 << 64))
    return x ^ _frozen_shift_right(x, 31)


def frozen_hash_ints(*keys):
    golden = 0x9E3779B97F4A7C15 - (1 << 64)
    tensors = [k for k in keys if isinstance(k, torch.Tensor)]
    h = torch.zeros((), dtype=torch.int64, device=tensors[0].device if tensors else None)
    for key in keys:
        h = _frozen_mix(h * golden + key + golden)
    return h & ((1 << 63) - 1)


def _frozen_seen(history, num_items, users, items):
    keys = users * (num_items + 1) + items
    pos = torch.searchsorted(history, keys).clamp_(max=history.numel() - 1)
    return history[pos] == keys


def frozen_draw_negatives(history, num_items, users, slots, seed, stream, epoch=0):
    users, slots = torch.broadcast_tensors(users, slots)
    width = num_items + 1
    count = torch.searchsorted(history, (users + 1) * width) - torch.searchsorted(history, users * width)
    out = 1 + frozen_hash_ints(seed, stream, epoch, users, slots, 0) % num_items
    bad = _frozen_seen(history, num_items, users, out) & ~(count >= num_items)
    attempt = 0
    while bool(bad.any()):
        attempt += 1
        assert attempt <= 1000
        redraw = 1 + frozen_hash_ints(seed, stream, epoch, users[bad], slots[bad], attempt) % num_items
        out[bad] = redraw
        bad[bad.clone()] = _frozen_seen(history, num_items, users[bad], redraw)
    return out


# ---------------------------------------------------------------- generated data
def dense_sequences(num_users=120, num_items=40, seed=0) -> Sequences:
    """Histories covering up to the whole catalogue (user 0 sees every item in training, user 1
    every item but one), with repeats, skewed popularity and timestamps: many rejections."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_items + 1)
    seqs = [rng.permutation(num_items) + 1, np.r_[rng.permutation(num_items - 1) + 2, 2, 3]]
    seqs += [rng.choice(num_items, int(rng.integers(3, 3 * num_items)), p=weights / weights.sum()) + 1
             for _ in range(num_users - 2)]
    seqs[0] = np.r_[seqs[0], 5, 6]  # the validation and test items: all 40 stay in training
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    items = np.concatenate(seqs).astype(np.int64)
    times = np.arange(len(items), dtype=np.int64) * 60
    return Sequences(np.arange(num_users).astype(str), np.arange(num_items).astype(str), offsets, items, times)


@pytest.fixture(scope="module")
def dense():
    return SequenceTensors(dense_sequences(), maxlen=30, device="cpu", eval_negatives=100, eval_seed=7)


def history_sets(data: SequenceTensors) -> list[set[int]]:
    width = data.num_items + 1
    sets = [set() for _ in range(data.num_users)]
    for key in data.train_history.tolist():
        sets[key // width].add(key % width)
    return sets


# ---------------------------------------------------------------- the hash
@pytest.mark.parametrize("keys", [
    (0, 1, 3, "users"), (7, 2, 0, "users[:, None]", "slots[None, :]", 0), (5, "slots"), (1, 2, 3),
    (2**63 - 1, -(2**63), -1, "users", 9), ("users", 4), (3, "users", "slots0d", 2**40), ()])
def test_hash_ints_is_bit_identical_to_the_tensor_fold(keys):
    named = {"users": torch.arange(-5, 300) * 7919, "users[:, None]": torch.arange(50)[:, None],
             "slots[None, :]": torch.arange(100)[None, :], "slots": torch.arange(2**62, 2**62 + 64),
             "slots0d": torch.tensor(11)}
    keys = tuple(named[k] if isinstance(k, str) else k for k in keys)
    assert torch.equal(hash_ints(*keys), frozen_hash_ints(*keys))


def test_hash_ints_spends_tensor_ops_on_tensor_keys_only():
    users = torch.arange(1000)
    with count_ops() as c:
        hash_ints(1, 2, 3, 4, 5, users)
    assert c.ops == 13  # one add, the 11 ops of a mix, the final mask


# ---------------------------------------------------------------- evaluation candidates stay as they were
def test_eval_candidates_are_bit_identical_to_the_frozen_rejection_sampler():
    seqs = dense_sequences(seed=3)
    data = SequenceTensors(seqs, maxlen=30, device="cpu", eval_negatives=100, eval_seed=11)
    full_history = torch.as_tensor(seqs.history_keys(seqs.lengths))
    for split in data.splits.values():
        expected = frozen_draw_negatives(full_history, seqs.num_items, split.users[:, None],
                                         torch.arange(100)[None, :], seed=11, stream=2)
        assert torch.equal(split.negatives, expected)
    test = data.splits["test"]
    assert (test.negatives[test.users.tolist().index(1)] == 1).all()  # its one unseen item: ~40 rounds each


# ---------------------------------------------------------------- exactness of the loop-free construction
def test_uniform_map_is_a_bijection_onto_the_unseen_items(dense):
    sampler = UnseenSampler(dense.train_history, dense.num_items, dense.num_users)
    everything = set(range(1, dense.num_items + 1))
    for user, history in enumerate(history_sets(dense)):
        unseen = everything - history
        size = len(unseen) or dense.num_items  # saw everything: unrestricted
        items = sampler.item_at(torch.tensor([user]), torch.arange(size)[None, :])[0].tolist()
        assert sorted(items) == sorted(unseen or everything), user
    assert not (everything - history_sets(dense)[0])  # user 0 did see everything


def test_popularity_map_hits_each_unseen_item_count_times(dense):
    counts = dense.item_counts.clone()
    counts[7] = 0  # an item nobody trained on is never drawn
    sampler = UnseenSampler(dense.train_history, dense.num_items, dense.num_users, ItemSampler(dense.num_items, counts))
    cases = 0
    for user, history in enumerate(history_sets(dense)):
        left = int(counts.sum()) - sum(int(counts[i]) for i in history)
        unrestricted = left == 0
        size = int(counts.sum()) if unrestricted else left
        hits = torch.bincount(sampler.item_at(torch.tensor([user]), torch.arange(size)[None, :])[0],
                              minlength=dense.num_items + 1)
        expected = counts.clone()
        if not unrestricted:
            expected[list(history)] = 0
        assert torch.equal(hits, expected), user
        cases += unrestricted
    assert cases >= 1  # user 0 (and any user who saw every item with a count) draws unrestricted


def test_training_negatives_never_hit_the_history(dense):
    users = dense.train_users
    sets = history_sets(dense)
    pop = ItemSampler(dense.num_items, dense.item_counts)
    for sampler in (None, pop):
        neg = dense.train_batch(BatchPlan(users, seed=3, epoch=2, negatives=Negatives(16, sampler=sampler)))["neg"]
        real = dense.train_batch(BatchPlan(users, 3, 2))["pos"] != 0
        assert neg.min() >= 0 and neg.max() <= dense.num_items and torch.equal(neg != 0, real[..., None].expand_as(neg))
        for row, user in enumerate(users.tolist()):
            drawn = set(neg[row].flatten().tolist()) - {0}
            if user == 0:  # saw everything: unrestricted draws, no error
                assert len(drawn) > dense.num_items // 2
            else:
                assert not drawn & sets[user], user
                if sampler is pop:
                    assert all(dense.item_counts[i] > 0 for i in drawn)


@pytest.mark.parametrize("user", [5, 0])  # 0 saw everything: uniform over all items
def test_training_negatives_are_uniform_over_the_unseen_items(dense, user):
    sampler = UnseenSampler(dense.train_history, dense.num_items, dense.num_users)
    draws = sampler.draw(torch.tensor([user]), torch.arange(40000), seed=1, stream=1, epoch=0)[0]
    everything = set(range(1, dense.num_items + 1))
    unseen = sorted(everything - history_sets(dense)[user] or everything)
    counts = torch.bincount(draws, minlength=dense.num_items + 1)
    assert counts.sum() == counts[unseen].sum()
    assert counts[unseen].min() > 0.85 * 40000 / len(unseen) and counts[unseen].max() < 1.15 * 40000 / len(unseen)


# ---------------------------------------------------------------- a pure function of (seed, epoch, user, slot)
@pytest.mark.parametrize("popular", [False, True])
def test_negatives_do_not_depend_on_batch_composition_ranks_or_rng(dense, popular):
    sampler = ItemSampler(dense.num_items, dense.item_counts) if popular else None
    users = dense.epoch_order(0, 1)[:24]
    five = Negatives(5, sampler=sampler)
    full = dense.train_batch(BatchPlan(users, 1, 4, negatives=five))["neg"]
    torch.manual_seed(123)
    ranks = [dense.train_batch(BatchPlan(users[r::3], 1, 4, negatives=five))["neg"] for r in range(3)]
    for r, part in enumerate(ranks):  # three ranks, each its strided share
        assert torch.equal(part, full[r::3])
    reversed_ = dense.train_batch(BatchPlan(users.flip(0), 1, 4, negatives=five))["neg"]
    assert torch.equal(reversed_, full.flip(0))
    assert not torch.equal(dense.train_batch(BatchPlan(users, 2, 4, negatives=five))["neg"], full)


# ---------------------------------------------------------------- what a step costs a GPU
@pytest.mark.parametrize("name, kwargs, bound", [
    ("bce k=1", dict(count=1), 25), ("k=256", dict(count=256), 25),
    ("shared k=256", dict(count=256, shared=True), 20),
    ("popularity k=1", dict(count=1, popular=True), 27),
    ("popularity k=256", dict(count=256, popular=True), 27),
    ("popularity shared", dict(count=256, shared=True, popular=True), 20)])
def test_train_batch_has_no_sync_and_few_ops(dense, name, kwargs, bound):
    """Measured (torch 2.13): 25 ops for per-position uniform negatives at any k, 27 with
    popularity, 20 shared; the rejection loop took ~500-1800 and 25-100 syncs per batch."""
    kwargs = dict(kwargs)
    if kwargs.pop("popular", False):
        kwargs["sampler"] = ItemSampler(dense.num_items, dense.item_counts)
    plan = BatchPlan(dense.train_users[:32], 0, 1, step=3, negatives=Negatives(**kwargs))
    dense.train_batch(plan)  # a popularity sampler's tables are built on first use
    with count_ops() as c:
        dense.train_batch(plan)
    assert c.syncs == 0, c.sync_by_op
    assert c.ops <= bound, c.by_op


def test_building_the_tables_reads_nothing_back(dense):
    with count_ops() as c:
        UnseenSampler(dense.train_history, dense.num_items, dense.num_users)
        UnseenSampler(dense.train_history, dense.num_items, dense.num_users,
                      ItemSampler(dense.num_items, dense.item_counts))
    assert c.syncs == 0, c.sync_by_op


import numpy as np
import pytest
import torch

from seqrec.data import DataError, Interactions, SequenceTensors, build_sequences, read_interactions
from seqrec.data.sampling import ItemSampler, draw_negatives, seen
from seqrec.data.tensors import BatchPlan, Negatives


def interactions(rows, path="mem"):
    users, items, times = zip(*rows)
    return Interactions(np.array(users, dtype=str), np.array(items, dtype=str), np.array(times, dtype=np.int64), path)


def test_sorted_by_time_with_stable_ties_and_remapped_ids():
    # user "b" has a tie at t=5: file order (x before y) must be kept
    seqs = build_sequences(interactions([("b", "y0", 9), ("a", "x", 3), ("b", "x", 5), ("b", "y", 5),
                                         ("a", "y", 1), ("b", "z", 1)]))
    names = seqs.item_ids
    by_user = {seqs.user_ids[u]: [names[i - 1] for i in seqs.items[seqs.offsets[u]:seqs.offsets[u + 1]]]
               for u in range(seqs.num_users)}
    assert by_user == {"a": ["y", "x"], "b": ["z", "x", "y", "y0"]}
    assert seqs.items.min() == 1 and seqs.items.max() == seqs.num_items  # 0 stays padding


def test_numeric_ids_sort_numerically():
    seqs = build_sequences(interactions([(str(u), str(i), t) for u in (10, 9, 2) for t, i in enumerate((30, 4, 100, 4))]))
    assert list(seqs.user_ids) == ["2", "9", "10"] and list(seqs.item_ids) == ["4", "30", "100"]


def test_one_pass_count_filter():
    rows = [("u1", i, t) for t, i in enumerate(["i0", "i1", "i0", "i1", "i2"])]
    rows += [("u2", "i0", 0), ("u2", "i1", 1), ("u2", "i9", 2)]
    rows += [(f"v{k}", "i0", 0) for k in range(3)] + [(f"v{k}", "i1", 1) for k in range(3)]
    seqs = build_sequences(interactions(rows), min_user_count=3, min_item_count=2)
    # counts are taken once, before dropping: i2 and i9 (1 each) go, the v* users (2 each) go,
    # and u2 stays although only 2 of its interactions survive
    assert sorted(seqs.item_ids) == ["i0", "i1"] and sorted(seqs.user_ids) == ["u1", "u2"]
    assert seqs.lengths.tolist() == [4, 2]


@pytest.mark.parametrize("maxlen", [50, 10])  # 10: most toy users (5-30 items) are cut to their last items
def test_leave_one_out_never_leaks_target(data_file, maxlen):
    seqs = build_sequences(read_interactions(str(data_file)))
    data = SequenceTensors(seqs, maxlen=maxlen, device="cpu", eval_negatives=10)
    assert (seqs.lengths > maxlen + 3).any() == (maxlen == 10)
    for u in range(seqs.num_users):
        span = slice(seqs.offsets[u], seqs.offsets[u + 1])
        real = data.train_items[u] != 0
        assert data.train_items[u][real].tolist() == seqs.items[span][:-2].tolist()[-(maxlen + 1):]
        assert data.train_times[u][real].tolist() == seqs.times[span][:-2].tolist()[-(maxlen + 1):]
    valid, test = data.splits["valid"], data.splits["test"]
    for row, u in enumerate(valid.users.tolist()):
        full = seqs.items[seqs.offsets[u]:seqs.offsets[u + 1]].tolist()
        assert valid.targets[row].item() == full[-2] and test.targets[row].item() == full[-1]
        assert valid.items[row][valid.items[row] != 0].tolist() == full[:-2][-maxlen:]
        assert test.items[row][test.items[row] != 0].tolist() == full[:-1][-maxlen:]
        # sampled negatives exclude everything the user ever interacted with
        assert not set(valid.negatives[row].tolist()) & set(full)
        assert not set(test.negatives[row].tolist()) & set(full)
        assert valid.items[row, -1].item() != 0  # left padding: the most recent item is last


def test_short_users_stay_in_training_only():
    rows = [("long", f"i{k}", k) for k in range(6)] + [("short", "i0", 0), ("short", "x", 1), ("other", "y", 0)]
    seqs = build_sequences(interactions(rows))
    data = SequenceTensors(seqs, maxlen=10, device="cpu", eval_negatives=2)
    short = list(seqs.user_ids).index("short")
    assert short in data.train_users.tolist() and short not in data.splits["test"].users.tolist()


def test_unsplittable_file_is_a_data_error():
    with pytest.raises(DataError, match="no user has the 2 interactions"):
        build_sequences(interactions([("a", "x", 1), ("b", "y", 2)]))
    with pytest.raises(DataError, match="3 interactions"):
        build_sequences(interactions([("a", "x", 1), ("a", "y", 2)]))


def test_training_batch_shapes_and_negatives(data_file):
    seqs = build_sequences(read_interactions(str(data_file)))
    data = SequenceTensors(seqs, maxlen=20, device="cpu", eval_negatives=5)
    users = data.train_users[:8]
    batch = data.train_batch(BatchPlan(users, seed=1, epoch=3, negatives=Negatives(1)))
    assert batch["items"].shape == batch["pos"].shape == batch["neg"].shape == batch["times"].shape == (8, 20)
    valid = batch["pos"] != 0
    assert torch.equal(valid, batch["items"] != 0)  # a target for every input item, none for padding
    inner = valid[:, :-1]
    assert torch.equal(batch["items"][:, 1:][inner], batch["pos"][:, :-1][inner])  # next item
    assert torch.equal(batch["neg"] != 0, valid)
    assert not seen(data.train_history, data.num_items, users[:, None].expand(-1, 20)[valid], batch["neg"][valid]).any()
    # negatives are a function of (seed, epoch, user): independent of batch composition
    alone = data.train_batch(BatchPlan(users[3:4], seed=1, epoch=3, negatives=Negatives(1)))
    assert torch.equal(alone["neg"][0], batch["neg"][3])
    other_epoch = data.train_batch(BatchPlan(users, seed=1, epoch=4, negatives=Negatives(1)))
    assert not torch.equal(other_epoch["neg"], batch["neg"])
    k = data.train_batch(BatchPlan(users, seed=1, epoch=3, negatives=Negatives(4)))["neg"]
    assert k.shape == (8, 20, 4)


@pytest.mark.parametrize("popular", [False, True])
@pytest.mark.parametrize("num_negatives", [1, 3])
def test_cut_training_batch_is_the_right_end_of_the_full_one(data_file, num_negatives, popular):
    seqs = build_sequences(read_interactions(str(data_file)))
    data = SequenceTensors(seqs, maxlen=20, device="cpu", eval_negatives=5)
    sampler = ItemSampler(data.num_items, data.item_counts) if popular else None
    users = data.train_users[data.train_positions[data.train_users] <= 9][:6]
    assert len(users) == 6
    negatives = Negatives(num_negatives, sampler=sampler)
    full = data.train_batch(BatchPlan(users, seed=1, epoch=3, negatives=negatives))
    cut = data.train_batch(BatchPlan(users, seed=1, epoch=3, width=9, negatives=negatives))
    assert not (full["items"][:, :-9] != 0).any()  # only padding is dropped
    for key in full:
        assert torch.equal(cut[key], full[key][:, -9:]), key


def test_epoch_order_is_a_seeded_permutation(data_file):
    data = SequenceTensors(build_sequences(read_interactions(str(data_file))), maxlen=20, device="cpu")
    a, b = data.epoch_order(0, 1), data.epoch_order(0, 2)
    assert sorted(a.tolist()) == sorted(data.train_users.tolist())
    assert torch.equal(a, data.epoch_order(0, 1)) and not torch.equal(a, b)


def test_user_who_saw_every_item_still_gets_negatives():
    history = torch.tensor([1, 2, 3])  # user 0 saw all 3 items; user 1 saw none
    draws = draw_negatives(history, 3, torch.tensor([[0], [1]]), torch.arange(50)[None, :], seed=0, stream=1)
    assert draws.min() >= 1 and draws.max() <= 3


def test_draw_negatives_are_uniform_over_unseen_items():
    history = torch.tensor([0 * 11 + 1, 0 * 11 + 2, 0 * 11 + 3])  # user 0 saw items 1..3 of 10
    draws = draw_negatives(history, 10, torch.zeros(20000, dtype=torch.long), torch.arange(20000), seed=5, stream=1)
    counts = torch.bincount(draws, minlength=11)
    assert counts[:4].sum() == 0
    assert counts[4:].min() > 0.8 * 20000 / 7 and counts[4:].max() < 1.2 * 20000 / 7

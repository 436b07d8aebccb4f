"""Serving from a checkpoint: the Recommender API and `seqrec recommend`."""
from __future__ import annotations

import pytest
import torch

from conftest import small_config
from seqrec.cli import console, run
from seqrec.data import SequenceTensors, build_sequences, read_interactions
from seqrec.serve import Recommender


@pytest.fixture
def trained(data_file, tmp_path):
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1, model__time=True))
    return tmp_path / "r" / "best.pt"


def test_recommend_matches_model_scores_and_excludes_history(trained, data_file):
    rec = Recommender.from_checkpoint(str(trained))
    seqs = build_sequences(read_interactions(str(data_file)))
    span = slice(seqs.offsets[0], seqs.offsets[1])
    history = [seqs.item_ids[i - 1] for i in seqs.items[span]]
    times = seqs.times[span].tolist()
    top = rec.recommend([history], k=5, times=[times])[0]
    assert len(top) == 5 and not {item for item, _ in top} & set(history)
    # the same ranking straight from the model, over unseen items
    batch = rec._encode([history], [times], strict=True)
    scores = rec.model.score_all(rec.model(batch)[:, -1])[0]
    scores[0] = float("-inf")
    scores[torch.tensor([rec.index[i] for i in history])] = float("-inf")
    expected = [rec.item_ids[i - 1] for i in scores.topk(5).indices.tolist()]
    assert [item for item, _ in top] == expected
    with_seen = rec.recommend([history], k=40, exclude_seen=False, times=[times])[0]
    assert len(with_seen) == 40  # the whole catalogue (padding never appears)


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_chunked_top_k_equals_one_product(trained, data_file, exclude_seen):
    """Top-k merged over item chunks of 1, 7 and 16 ids is the top-k of the whole score row."""
    rec = Recommender.from_checkpoint(str(trained))
    seqs = build_sequences(read_interactions(str(data_file)))
    spans = [slice(seqs.offsets[u], seqs.offsets[u + 1]) for u in range(4)]
    histories = [[seqs.item_ids[i - 1] for i in seqs.items[s]] for s in spans]
    times = [seqs.times[s].tolist() for s in spans]
    whole = rec.recommend(histories, k=12, exclude_seen=exclude_seen, times=times)
    for chunk in (1, 7, 16):
        chunked = rec.recommend(histories, k=12, exclude_seen=exclude_seen, times=times, item_chunk=chunk)
        # the same items in the same order; scores to rounding (a product's slice may round differently)
        assert [[item for item, _ in row] for row in chunked] == [[item for item, _ in row] for row in whole]
        for row, expected in zip(chunked, whole):
            assert [s for _, s in row] == pytest.approx([s for _, s in expected], abs=1e-5)
    assert len(rec.item_ids) + 1 <= 65536  # so `whole` is one product


def test_encoded_histories_are_the_evaluation_inputs(trained, data_file):
    """Serving a user's history minus its last item builds exactly the test split's input
    (ids mapped, last maxlen kept, left-padded, timestamps aligned), for short and long users."""
    rec = Recommender.from_checkpoint(str(trained))
    seqs = build_sequences(read_interactions(str(data_file)))
    test = SequenceTensors(seqs, rec.maxlen, "cpu").splits["test"]
    users = test.users.tolist()
    assert (seqs.lengths[users] > rec.maxlen + 1).any() and (seqs.lengths[users] < rec.maxlen).any()
    for row, u in enumerate(users):
        span = slice(seqs.offsets[u], seqs.offsets[u + 1] - 1)
        history, times = [seqs.item_ids[i - 1] for i in seqs.items[span]], seqs.times[span].tolist()
        batch = rec._encode([history], [times], strict=True)
        assert torch.equal(batch["items"][0], test.items[row]) and torch.equal(batch["times"][0], test.times[row])


def test_unknown_ids_warn_or_fail(trained):
    rec = Recommender.from_checkpoint(str(trained))
    known = rec.item_ids[:3]
    with pytest.warns(UserWarning, match="1 unknown item id"):
        rec.recommend([known + ["no-such-item"]], k=3, times=[[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="unknown"):
        rec.recommend([known + ["no-such-item"]], k=3, times=[[1, 2, 3, 4]], strict=True)
    with pytest.raises(ValueError, match="timestamps"):
        rec.recommend([known], k=3)


def test_recommend_cli(trained, data_file, capsys):
    assert console(["recommend", "--checkpoint", str(trained), "--user", "1", "--user", "2", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["1", "2"] and all(len(line.split()) == 4 for line in lines)
    assert console(["recommend", "--checkpoint", str(trained), "--user", "nobody"]) == 2

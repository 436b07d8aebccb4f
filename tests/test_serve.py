"""Serving from a checkpoint: the Recommender API and `seqrec recommend`."""
from __future__ import annotations

import pytest
import torch

from conftest import small_config
from seqrec import checkpoint as ckpt
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


# ------------------------------------------------------------------ bad requests and hand-made checkpoints


def test_times_rows_must_pair_every_item(trained):
    """A short times row silently dropped the newest items (warning of "unknown item ids");
    a long one was ignored, a missing one an IndexError."""
    rec = Recommender.from_checkpoint(str(trained))
    history = rec.item_ids[:4]
    with pytest.raises(ValueError, match="times row 0 has 3 timestamps for the 4 items of history 0"):
        rec.recommend([history], k=3, times=[[1, 2, 3]])
    with pytest.raises(ValueError, match="times row 1 has 5 timestamps for the 4 items of history 1"):
        rec.recommend([history, history], k=3, times=[[1, 2, 3, 4], [1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match="times has 1 rows for 2 histories"):
        rec.recommend([history, history], k=3, times=[[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        rec.recommend([history], k=0, times=[[1, 2, 3, 4]])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags, message", [
    (["-k", "-3"], "-k must be at least 1, got -3"),
    (["--item_chunk", "0"], "--item_chunk must be at least 1, got 0"),
    (["--device", "foo"], "--device must be cpu, cuda or cuda:N, got 'foo'"),
    pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_recommend_cli_refuses_bad_flags(trained, capsys, flags, message):
    assert console(["recommend", "--checkpoint", str(trained), "--user", "1", *flags]) == 2
    assert message in one_line_error(capsys)


def test_recommend_cli_needs_timestamps_for_tisasrec(trained, tmp_path, capsys):
    untimed = tmp_path / "untimed.txt"
    untimed.write_text("".join(f"1 {i}\n" for i in range(1, 6)))
    assert console(["recommend", "--checkpoint", str(trained), "--data_path", str(untimed), "--user", "1"]) == 2
    assert f"{untimed}: this TiSASRec model needs timestamps" in one_line_error(capsys)


def drop_model_config(state):
    del state["config"]["model"]


def drop_config(state):
    del state["config"]


def widen(state):
    state["config"]["model"]["hidden_units"] = 32


def bad_heads(state):
    state["config"]["model"]["num_heads"] = 3


def short_item_ids(state):
    state["item_ids"] = state["item_ids"][:30]


def drop_weights(state):
    del state["model"]


@pytest.mark.parametrize("damage, message", [
    (drop_model_config, "checkpoint has no model config (config.model)"),
    (drop_config, "checkpoint has no model config (config.model)"),
    (widen, "weights do not fit its model config and its 40 item ids (size mismatch for item_emb.weight"),
    (bad_heads, "config: hidden_units (16) must be divisible by num_heads (3)"),
    (short_item_ids, "weights do not fit its model config and its 30 item ids (size mismatch for item_emb.weight"),
    (drop_weights, "checkpoint has no model weights"),
])
def test_hand_made_checkpoints_are_one_line_errors(trained, data_file, tmp_path, capsys, damage, message):
    """from_checkpoint, `seqrec recommend` and `seqrec evaluate` (cli.run_inference) refuse a checkpoint
    with a missing config key, weights that do not match its config or a short item-id list, naming
    it; they were KeyError and RuntimeError tracebacks."""
    state = ckpt.load(trained)
    damage(state)
    bad = tmp_path / "hand-made.pt"
    ckpt.save(state, bad)
    with pytest.raises(ckpt.CheckpointError) as err:
        Recommender.from_checkpoint(str(bad))
    assert str(err.value).startswith(f"{bad}: ") and message in str(err.value) and "\n" not in str(err.value)
    assert console(["recommend", "--checkpoint", str(bad), "--user", "1"]) == 2
    assert message in one_line_error(capsys)
    if damage is not short_item_ids:  # evaluation builds the model for the data's items, not the id list's
        assert console(["evaluate", "--state_dict_path", str(bad), "--data_path", str(data_file),
                        "--device", "cpu", "--eval_negatives", "20"]) == 1
        on_data = f"the 40 items of {data_file}; was it trained on other data?"
        assert message.replace("its 40 item ids", on_data) in one_line_error(capsys)


def test_evaluate_on_other_data_names_the_data(trained, tmp_path, capsys):
    from conftest import write_interactions
    other = write_interactions(tmp_path / "other.txt", num_items=30)
    assert console(["evaluate", "--state_dict_path", str(trained), "--data_path", str(other), "--device", "cpu",
                    "--eval_negatives", "20"]) == 1
    assert f"the 30 items of {other}; was it trained on other data? (size mismatch" in one_line_error(capsys)

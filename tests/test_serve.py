"""Serving from a run: the Recommender API and `seqrec recommend`."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from conftest import small_config
from seqrec import checkpoint as ckpt
from seqrec.cli import console, run
from seqrec.data import SequenceTensors, build_sequences, read_interactions
from seqrec.serve import Recommender


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TiSASRec run (maxlen 20, users with up to 30 interactions) trained for one epoch."""
    from conftest import write_interactions
    tmp = tmp_path_factory.mktemp("serve")
    data = write_interactions(tmp / "toy.txt")
    run(small_config(data, tmp / "r", train__num_epochs=1, model__time=True))
    return tmp / "r" / "best.pt"


@pytest.fixture
def data_file(trained):
    return trained.parent.parent / "toy.txt"


@pytest.fixture(scope="module")
def rec(trained):
    return Recommender.from_checkpoint(trained.parent)


def user_history(seqs, u: int, drop_last: int = 0):
    span = slice(seqs.offsets[u], seqs.offsets[u + 1] - drop_last)
    return [str(seqs.item_ids[i - 1]) for i in seqs.items[span]], seqs.times[span].tolist()


def model_top_k(rec, batch, excluded, k):
    scores = rec.model.score_all(rec.model(batch)[:, -1])[0]
    scores[0] = float("-inf")
    scores[torch.tensor([rec.index[i] for i in excluded], dtype=torch.long)] = float("-inf")
    return [rec.item_ids[i - 1] for i in scores.topk(k).indices.tolist()]


def test_recommend_histories_matches_model_scores_and_excludes_history(rec, data_file):
    seqs = build_sequences(read_interactions(str(data_file)))
    history, times = user_history(seqs, 0)
    with torch.no_grad():
        ids, scores = rec.recommend_histories([history], k=5, times=[times])
        assert ids.shape == scores.shape == (1, 5) and scores.dtype == np.float32
        assert not set(ids[0]) & set(history) and (np.diff(scores[0]) <= 0).all()
        batch = rec._window(rec._map_histories([history], [times], strict=True))
        assert list(ids[0]) == model_top_k(rec, batch, history, 5)
    ids, _ = rec.recommend_histories([history], k=40, exclude_seen=False, times=[times])
    assert sorted(ids[0]) == sorted(rec.item_ids)  # the whole catalogue, never padding


def test_known_users_need_no_data_and_match_their_whole_history(rec, data_file):
    """recommend(users) reads the run's sequences: ids match as str, the model input is the last
    maxlen items, and every item of the whole history (longer than maxlen) is excluded."""
    seqs = build_sequences(read_interactions(str(data_file)))
    u = int(np.argmax(seqs.lengths))
    assert seqs.lengths[u] > rec.maxlen
    history, times = user_history(seqs, u)
    user = str(seqs.user_ids[u])
    ids, scores = rec.recommend([user], k=len(rec.item_ids))
    as_int, _ = rec.recommend([int(user)], k=len(rec.item_ids))
    assert (ids == as_int).all()
    unseen = set(rec.item_ids) - set(history)
    assert set(ids[0][ids[0] != None]) == unseen  # noqa: E711
    assert (ids[0][len(unseen):] == None).all() and np.isneginf(scores[0][len(unseen):]).all()  # noqa: E711
    expected, _ = rec.recommend_histories([history], k=5, times=[times])
    assert (rec.recommend([user], k=5)[0] == expected).all()
    early = set(history[:-rec.maxlen]) - set(history[-rec.maxlen:])  # seen only before the window
    window_only, _ = rec.recommend_histories([history[-rec.maxlen:]], k=len(rec.item_ids), times=[times[-rec.maxlen:]])
    assert early and early & set(window_only[0]) and not early & set(ids[0])


def test_unknown_users_raise_key_error_naming_them(rec):
    with pytest.raises(KeyError, match="user\\(s\\) not in the training data: nobody, 999999"):
        rec.recommend(["1", "nobody", 999999])


def test_exclude_and_allow_items_apply_inside_the_top_k(rec):
    ids, _ = rec.recommend(["1", "2"], k=len(rec.item_ids), exclude_seen=False)
    allowed = list(ids[0][[3, 7, 11, 20, 30]])
    top, _ = rec.recommend(["1"], k=3, exclude_seen=False, allow_items=allowed + ["no-such-item"])
    assert list(top[0]) == allowed[:3]  # the best three of the allowed items, in order
    excluded = list(ids[1][:4])
    rest, _ = rec.recommend(["2"], k=5, exclude_seen=False, exclude_items=excluded)
    assert list(rest[0]) == list(ids[1][4:9])  # still 5 items: filtered before the cut
    only_two, scores = rec.recommend(["1"], k=4, exclude_seen=False, allow_items=allowed[:2])
    assert list(only_two[0][:2]) == allowed[:2] and (only_two[0][2:] == None).all()  # noqa: E711
    assert np.isneginf(scores[0][2:]).all()
    both = rec.eligible(exclude_items=allowed[1:2], allow_items=allowed)  # what bulk output builds once
    built, _ = rec.recommend(["1"], k=3, exclude_seen=False, eligible=both)
    assert list(built[0]) == [allowed[0], *allowed[2:4]]
    with pytest.raises(ValueError, match="not both"):
        rec.recommend(["1"], eligible=both, allow_items=allowed)


def test_similar_items_are_cosine_neighbours(rec):
    weight = rec.model.item_emb.weight.detach()
    unit = weight[1:] / weight[1:].norm(dim=1, keepdim=True)
    query = rec.item_ids[4]
    cos = unit @ unit[4]
    cos[4] = float("-inf")
    ids, scores = rec.similar_items([query], k=6)
    assert list(ids[0]) == [rec.item_ids[i] for i in cos.topk(6).indices.tolist()]
    assert scores[0] == pytest.approx(cos.topk(6).values.numpy(), abs=1e-5)
    with pytest.raises(KeyError, match="no-such-item"):
        rec.similar_items(["no-such-item"])


def test_evaluate_reproduces_the_runs_results(rec, trained):
    import json
    results = json.loads((trained.parent / "results.json").read_text())
    again = rec.evaluate()
    for split in ("valid", "test"):
        assert again[split] == pytest.approx(results[split], abs=1e-6)


def test_old_recommend_of_histories_warns_and_keeps_its_format(rec, data_file):
    seqs = build_sequences(read_interactions(str(data_file)))
    history, times = user_history(seqs, 0)
    with pytest.warns(DeprecationWarning, match="recommend_histories"):
        old = rec.recommend([history], 5, times=[times])
    ids, scores = rec.recommend_histories([history], k=5, times=[times])
    assert [i for i, _ in old[0]] == list(ids[0]) and [s for _, s in old[0]] == pytest.approx(scores[0].tolist())


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_chunked_top_k_equals_one_product(rec, data_file, exclude_seen):
    """Top-k merged over item chunks of 1, 7 and 16 ids is the top-k of the whole score row."""
    seqs = build_sequences(read_interactions(str(data_file)))
    histories, times = zip(*(user_history(seqs, u) for u in range(4)))
    whole, whole_scores = rec.recommend_histories(histories, k=12, exclude_seen=exclude_seen, times=times)
    for chunk in (1, 7, 16):
        ids, scores = rec.recommend_histories(histories, k=12, exclude_seen=exclude_seen, times=times, item_chunk=chunk)
        # the same items in the same order; scores to rounding (a product's slice may round differently)
        assert (ids == whole).all() and scores == pytest.approx(whole_scores, abs=1e-5)
    assert len(rec.item_ids) + 1 <= 65536  # so `whole` is one product


def test_encoded_histories_are_the_evaluation_inputs(rec, data_file):
    """Serving a user's history minus its last item builds exactly the test split's input
    (ids mapped, last maxlen kept, left-padded, timestamps aligned), for short and long users."""
    seqs = build_sequences(read_interactions(str(data_file)))
    test = SequenceTensors(seqs, rec.maxlen, "cpu").splits["test"]
    users = test.users.tolist()
    assert (seqs.lengths[users] > rec.maxlen + 1).any() and (seqs.lengths[users] < rec.maxlen).any()
    for row, u in enumerate(users):
        history, times = user_history(seqs, u, drop_last=1)
        batch = rec._window(rec._map_histories([history], [times], strict=True))
        assert torch.equal(batch["items"][0], test.items[row]) and torch.equal(batch["times"][0], test.times[row])


def test_unknown_ids_warn_or_fail(rec):
    known = rec.item_ids[:3]
    with pytest.warns(UserWarning, match="1 unknown item id"):
        rec.recommend_histories([known + ["no-such-item"]], k=3, times=[[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="unknown"):
        rec.recommend_histories([known + ["no-such-item"]], k=3, times=[[1, 2, 3, 4]], strict=True)
    with pytest.raises(ValueError, match="timestamps"):
        rec.recommend_histories([known], k=3)


def test_recommend_cli(trained, capsys):
    for checkpoint in (trained, trained.parent):
        assert console(["recommend", "--checkpoint", str(checkpoint), "--user", "1", "--user", "2", "-k", "3"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert [line.split("\t")[0] for line in lines] == ["1", "2"] and all(len(line.split()) == 4 for line in lines)
    assert console(["recommend", "--checkpoint", str(trained), "--user", "nobody"]) == 2
    assert "user(s) not in the training data: nobody" in one_line_error(capsys)


def read_csv_rows(path):
    with open(path, newline="") as f:
        return [(r["user"], int(r["rank"]), r["item"], float(r["score"])) for r in csv.DictReader(f)]


def test_bulk_recommendations_for_all_users(rec, trained, tmp_path, capsys):
    exclude, allow = tmp_path / "exclude.txt", tmp_path / "allow.txt"
    exclude.write_text("\n".join(rec.item_ids[:5]) + "\n")
    allow.write_text("\n".join(rec.item_ids[:25]) + "\n")
    out = tmp_path / "recs.csv"
    assert console(["recommend", "--checkpoint", str(trained.parent), "--all_users", "--out", str(out), "-k", "4",
                    "--batch_size", "7", "--exclude_items", str(exclude), "--allow_items", str(allow)]) == 0
    rows = read_csv_rows(out)
    users = rec.users.user_ids.astype(str)
    ids, scores = rec.recommend(list(users), k=4, exclude_items=rec.item_ids[:5], allow_items=rec.item_ids[:25])
    expected = [(u, r + 1, i, s) for u, row, srow in zip(users, ids, scores)
                for r, (i, s) in enumerate(zip(row, srow)) if i is not None]
    assert [r[:3] for r in rows] == [e[:3] for e in expected]
    assert [r[3] for r in rows] == pytest.approx([e[3] for e in expected], rel=1e-5)
    assert not {r[2] for r in rows} & set(rec.item_ids[:5]) and {r[2] for r in rows} <= set(rec.item_ids[:25])
    pq = pytest.importorskip("pyarrow.parquet")
    parquet = tmp_path / "recs.parquet"
    assert console(["recommend", "--checkpoint", str(trained.parent), "--all_users", "--out", str(parquet), "-k", "4",
                    "--exclude_items", str(exclude), "--allow_items", str(allow)]) == 0
    table = pq.read_table(parquet).to_pydict()
    assert list(zip(table["user"], table["rank"], table["item"])) == [e[:3] for e in expected]
    assert not list(tmp_path.glob(".*.tmp"))


def test_recommend_cli_serves_another_files_histories(rec, trained, data_file, tmp_path, capsys):
    """--data_path: histories of another file, its unknown items dropped; the same file gives
    the run's own answers."""
    assert console(["recommend", "--checkpoint", str(trained), "--data_path", str(data_file), "--user", "3"]) == 0
    same = capsys.readouterr().out
    assert console(["recommend", "--checkpoint", str(trained), "--user", "3"]) == 0
    assert capsys.readouterr().out == same
    fresher = tmp_path / "fresher.txt"
    fresher.write_text(data_file.read_text() + "3 new-item 1700000000\n3 another 1700000100\n")
    assert console(["recommend", "--checkpoint", str(trained), "--data_path", str(fresher), "--user", "3"]) == 0
    assert capsys.readouterr().out == same  # the unknown items add nothing the model knows


@pytest.mark.parametrize("flags, message", [
    (["--all_users"], "--all_users writes a file: give --out recs.parquet or recs.csv"),
    (["--all_users", "--user", "1", "--out", "x.csv"], "give --all_users or --user / --users_file, not both"),
    ([], "give --user ID, --users_file FILE or --all_users"),
    (["--user", "1", "--out", "x.json"], "--out x.json: the name must end in .csv or .parquet"),
    (["--user", "1", "--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--user", "1", "--exclude_items", "/no/such/file"], "/no/such/file: cannot read item ids"),
])
def test_recommend_cli_refuses_bad_requests(trained, capsys, flags, message):
    assert console(["recommend", "--checkpoint", str(trained), *flags]) == 2
    assert message in one_line_error(capsys)


# ------------------------------------------------------------------ bad requests and hand-made checkpoints


def test_times_rows_must_pair_every_item(rec):
    """A short times row silently dropped the newest items (warning of "unknown item ids");
    a long one was ignored, a missing one an IndexError."""
    history = rec.item_ids[:4]
    with pytest.raises(ValueError, match="times row 0 has 3 timestamps for the 4 items of history 0"):
        rec.recommend_histories([history], k=3, times=[[1, 2, 3]])
    with pytest.raises(ValueError, match="times row 1 has 5 timestamps for the 4 items of history 1"):
        rec.recommend_histories([history, history], k=3, times=[[1, 2, 3, 4], [1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match="times has 1 rows for 2 histories"):
        rec.recommend_histories([history, history], k=3, times=[[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        rec.recommend_histories([history], k=0, times=[[1, 2, 3, 4]])


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


def test_evaluate_takes_a_run_directory(trained, data_file, capsys):
    assert console(["evaluate", "--state_dict_path", str(trained.parent), "--data_path", str(data_file),
                    "--device", "cpu", "--eval_negatives", "20"]) == 0
    assert "test  sampled/HR@10" in capsys.readouterr().out

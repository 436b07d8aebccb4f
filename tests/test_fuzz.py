"""Property tests (Hypothesis) of the two places where user input enters: the data readers and
the config/flag parser. Whatever the input, the outcome is either a valid result or the
project's own one-line error (DataError, ConfigError), never another exception.

Bounded to run in well under 30 s on one core: 100-200 examples per property, no deadline
(a slow example on a loaded machine is not a failure) and no example database, so a run leaves
no failing examples behind to replay (Hypothesis still caches constants in .hypothesis/, which
ignores itself in git).
"""
from __future__ import annotations

import codecs
import contextlib
import io
import math
import re
import tempfile
from pathlib import Path

import pytest
import yaml

pytest.importorskip("hypothesis")  # in the test extra; skip rather than fail without it
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from seqrec.config import (FORMER_SECTIONS, LEAVES, SECTIONS, Config, ConfigError, from_dict,  # noqa: E402
                           parse_config, to_dict, validate)
from seqrec.data import DataError, SequenceTensors, build_sequences, read_interactions  # noqa: E402
from seqrec.data import readers  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------ interaction files

# Ids that look alike but differ, ids that are spellings of one number, and plain ones.
TRICKY_IDS = ["1", "01", "007", "7", "+7", " 7", "7 ", "1_000", "1000", "-0", "0", "-3", "٣", "1e3",
              str(2**63 - 1), str(2**63), str(-(2**63)), "a", "A", "é", "u 1", '"q"', "x,y", "::", ""]
TIMESTAMPS = ["0", "5", "5", "-1", "978300760", "978300760.0", "1.9", "1e3", "nan", "inf", "-inf", "1e400",
              "abc", "", "99999999999999999999", str(2**63 - 1), str(2**63)]
ids = st.one_of(st.sampled_from(TRICKY_IDS), st.integers(-(2**64), 2**64).map(str),
                st.text(alphabet="0123456789-+_ ab,:\"'\t\u00a0\u0663", max_size=4))
stamps = st.one_of(st.sampled_from(TIMESTAMPS), st.integers(-(2**64), 2**64).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))
LAYOUTS = {  # separator, header line, number of fields
    "text2": (" ", None, 2), "text3": ("\t", None, 3), "text4": (" ", None, 4),
    "dat": ("::", None, 4), "csv": (",", "user,item,timestamp", 3), "csv4": (",", "userId,movieId,rating,timestamp", 4),
    "csv2": (",", "user_id,item_id", 2),
}
CLEAN_IDS = [v for v in TRICKY_IDS if v and not any(c in v for c in ' ,:"')]  # valid in every layout


@st.composite
def interaction_files(draw) -> bytes:
    """Files of a random layout over few users. Half are well-formed, so that the invariants
    get exercised, but for the ids (spellings of one number, int64 edges, strings); the others
    have damaged lines -- a field missing or extra, blank lines, odd ids and timestamps --
    and may be CRLF, carry a byte-order mark or be in UTF-16 or Latin-1."""
    clean = draw(st.booleans())
    sep, header, width = LAYOUTS[draw(st.sampled_from(sorted(LAYOUTS)))]
    pool = st.one_of(st.sampled_from(CLEAN_IDS), st.integers(-(2**64), 2**64).map(str)) if clean else ids
    users = draw(st.lists(pool, min_size=1, max_size=4))
    items = draw(st.lists(pool, min_size=1, max_size=8))
    clean_times = clean or draw(st.booleans())
    lines = [header] if header else []
    for _ in range(draw(st.integers(8 if clean else 0, 40))):
        fields = [draw(st.sampled_from(users)), draw(st.sampled_from(items))]
        time = str(draw(st.integers(0, 20))) if clean_times else draw(stamps)
        if width == 3:
            fields.append(time)
        elif width == 4:
            fields += [draw(st.sampled_from(["1", "4.5"] if clean else ["1", "4.5", ""])), time]
        damage = "none" if clean else draw(st.sampled_from(["none"] * 6 + ["drop", "extra", "blank", "spaces"]))
        if damage == "drop":
            fields.pop(draw(st.integers(0, len(fields) - 1)))
        elif damage == "extra":
            fields.append(draw(ids))
        line = sep.join(fields)
        if damage == "blank":
            line = draw(st.sampled_from(["", " ", "\t"]))
        elif damage == "spaces":
            line = f"  {line} "
        lines.append(line)
    text = draw(st.sampled_from(["\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n"]))
    encodings = ["utf-8", "utf-8-sig"] if clean else ["utf-8"] * 4 + ["utf-8-sig", "utf-16", "utf-16-le", "latin-1"]
    return text.encode(draw(st.sampled_from(encodings)), errors="replace")


raw_bytes = st.one_of(st.binary(max_size=300),
                      st.tuples(st.sampled_from([b"", codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE]),
                                st.binary(max_size=200)).map(b"".join))


def canonical(column: list[str]) -> tuple[list[str], object]:
    """The ids build_sequences should produce, from the documented rule (an independent oracle
    of its vectorised parser): numbers when every id is a plain decimal within int64, sorted
    numerically, "007" and "7" one id; else the strings as they are, sorted as text."""
    if all(re.fullmatch(r"-?[0-9]+", v) and -(2**63) <= int(v) < 2**63 for v in column):
        return [str(int(v)) for v in column], int
    return list(column), str


def check_loaded(path: str) -> None:
    """Load path; on success check every invariant of the sequences and the splits."""
    try:
        inter = read_interactions(path)
        seqs = build_sequences(inter)
    except DataError as err:
        message = str(err)
        assert message.startswith(path) and "\n" not in message and "\r" not in message, message
        return
    users, user_key = canonical(inter.users.tolist())
    items, item_key = canonical(inter.items.tolist())
    # ids remapped to 1..N: every index used, in the rule's order, each id once
    assert seqs.user_ids.tolist() == sorted(set(users), key=user_key)
    assert seqs.item_ids.tolist() == sorted(set(items), key=item_key)
    assert sorted(set(seqs.items.tolist())) == list(range(1, seqs.num_items + 1))
    # each user's items in file order, stably sorted by time (ties keep file order)
    for u, user in enumerate(seqs.user_ids.tolist()):
        rows = [k for k, v in enumerate(users) if v == user]
        if inter.timestamps is not None:
            rows.sort(key=lambda k: inter.timestamps[k])  # list.sort is stable
        span = slice(seqs.offsets[u], seqs.offsets[u + 1])
        assert [seqs.item_ids[i - 1] for i in seqs.items[span]] == [items[k] for k in rows]
        if inter.timestamps is not None:
            assert seqs.times[span].tolist() == [int(inter.timestamps[k]) for k in rows]
    check_splits(seqs)


def check_splits(seqs, maxlen: int = 4) -> None:
    """Leave-one-out: train = all but the last two, validation input = train, test input = train +
    the validation item; no input holds its own target, training never sees either."""
    data = SequenceTensors(seqs, maxlen, "cpu", eval_negatives=max(1, min(3, seqs.num_items - 1)))

    def padded(values, width):
        values = list(values)[-width:]
        return [0] * (width - len(values)) + values

    for u in range(seqs.num_users):
        seq = seqs.items[seqs.offsets[u]:seqs.offsets[u + 1]].tolist()
        train = seq[:-2] if len(seq) >= 3 else seq
        assert data.train_items[u].tolist() == padded(train, maxlen + 1)
    for name, cut in (("valid", 2), ("test", 1)):
        split = data.splits[name]
        for row, u in enumerate(split.users.tolist()):
            seq = seqs.items[seqs.offsets[u]:seqs.offsets[u + 1]].tolist()
            assert len(seq) >= 3
            assert split.items[row].tolist() == padded(seq[:-cut], maxlen)
            assert split.targets[row].item() == seq[-cut]


@FUZZ
@given(content=interaction_files())
def test_generated_interaction_files(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        path.write_bytes(content)
        check_loaded(str(path))


@FUZZ
@given(content=raw_bytes, name=st.sampled_from(["ratings.dat", "data.txt", "log.csv"]))
def test_random_bytes(content, name):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(content)
        check_loaded(str(path))


@FUZZ
@given(content=interaction_files())
def test_fast_parser_agrees_with_the_reference(content):
    """Where the vectorised parser accepts a file, the line-by-line reference reads the same."""
    data = content[len(codecs.BOM_UTF8):] if content.startswith(codecs.BOM_UTF8) else content  # as _read_bytes
    try:
        layout = readers._detect_layout(readers._decode(data, "f"), "f", None, None, None)
    except DataError:
        return
    text = data.decode()
    fast = readers._parse_fast(data, layout)
    if fast is None:
        return
    try:
        slow = readers._parse_lines(text, layout, "f")
    except DataError as err:
        pytest.fail(f"fast parser accepted what the reference rejects: {err}")
    for a, b in zip(fast, slow):
        assert (a is None and b is None) or a.tolist() == b.tolist()


# ------------------------------------------------------------------ flags and YAML configs

values = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "nan", "inf", "-1", "0", "1", "1.5", "1e400", "1,5,10", "5,x", "cpu", "cuda", "cuda:1",
                     "mps", "sampled/NDCG@10", "full/MRR@5", "full/NDCG@7", "bce", "ce", "hour", "personal", "bf16",
                     "true", "no", "--lr", "-", "a\nb", "\x00", str(2**63)]),
    st.text(max_size=8),
)
VALUED = sorted(name for name, (_, _, typ) in LEAVES.items() if typ is not bool)
BOOLS = sorted(name for name, (_, _, typ) in LEAVES.items() if typ is bool)
flag = st.one_of(
    st.tuples(st.sampled_from(VALUED), values).map(lambda nv: f"--{nv[0]}={nv[1]}"),  # '=': any value is one
    st.sampled_from(BOOLS).flatmap(lambda name: st.sampled_from([f"--{name}", f"--no_{name}"])),
    st.sampled_from(["--use_amp", "--no_use_amp", "--local_rank=2", "--dataset=x"]),
)


def check_config(argv: list[str]) -> None:
    """parse_config either gives a Config that validates and survives the YAML round trip the run
    directory's config.yaml makes, or raises a one-line ConfigError."""
    try:
        cfg = parse_config(argv)
    except ConfigError as err:
        assert "\n" not in str(err) and "\r" not in str(err), str(err)
        return
    assert isinstance(cfg, Config)
    validate(cfg)
    for section in to_dict(cfg).values():  # the rules that hold for every option
        for name, value in section.items():
            assert not isinstance(value, float) or math.isfinite(value), name
            assert not isinstance(value, int) or -(2**63) <= value < 2**63, name
    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


@FUZZ
@given(argv=st.lists(flag, max_size=6))
def test_generated_flags(argv):
    check_config(argv)


yaml_values = st.recursive(st.one_of(st.none(), st.booleans(), values),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=3), max_leaves=6)
known_keys = st.sampled_from(sorted(LEAVES) + sorted(SECTIONS))
yaml_keys = st.one_of(known_keys, known_keys, known_keys, st.text(max_size=6))  # mostly known: more get past the keys


@st.composite
def yaml_files(draw) -> bytes:
    """A mapping of known and unknown keys (flat or by section, also where older configs held them)
    dumped as YAML, or arbitrary text and bytes."""
    kind = draw(st.sampled_from(["mapping"] * 4 + ["text", "bytes"]))
    if kind == "text":
        return draw(st.text(max_size=80)).encode("utf-8", errors="replace")
    if kind == "bytes":
        return draw(st.binary(max_size=80))
    mapping = draw(st.dictionaries(yaml_keys, yaml_values, max_size=5))
    for section in sorted(SECTIONS):
        if draw(st.booleans()):
            names = sorted(name for name, (sec, _, _) in LEAVES.items() if section in (sec, FORMER_SECTIONS.get(name)))
            mapping[section] = draw(st.dictionaries(st.sampled_from(names), yaml_values, max_size=3))
    return yaml.safe_dump(mapping, allow_unicode=draw(st.booleans())).encode()


@FUZZ
@given(content=yaml_files(), argv=st.lists(flag, max_size=2))
def test_random_yaml_configs(content, argv):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(content)
        check_config(["--config", str(path), *argv])


@settings(max_examples=30, deadline=None, database=None)
@given(name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_flags_are_argparse_usage_errors(name):
    """The one SystemExit parse_config may raise: argparse's own usage error (exit 2, a usage line
    and "error: unrecognized arguments"), for a flag that is not in the tree. (Known flags are
    generated as --name=value above, so a value never reads as a flag.)"""
    flag_name = f"--zz_{name}"  # no leaf starts with zz_, so argparse cannot take it as an abbreviation
    err = io.StringIO()
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(err):
        parse_config([flag_name, "1"])
    assert exit_info.value.code == 2
    assert err.getvalue().startswith("usage: ") and "error: unrecognized arguments" in err.getvalue()


@pytest.mark.parametrize("users, expected", [
    (["007", "7", "-0", "10"], ["0", "7", "10"]),  # all plain decimals: numbers, 007 = 7, numeric order
    (["+1", "1", "10", "9"], ["+1", "1", "10", "9"]),  # one is not plain: every id a string, text order
    ([str(2**63), "10", "9"], ["10", "9", str(2**63)]),  # beyond int64: strings
])
def test_the_documented_id_rule_by_example(tmp_path, users, expected):
    """The rule the fuzz oracle (canonical) states, on examples through the real reader."""
    path = tmp_path / "ids.txt"
    path.write_text("".join(f"{user} {item}\n" for user in users for item in (5, 6, 7, 8)))
    seqs = build_sequences(read_interactions(str(path)))
    assert [str(u) for u in seqs.user_ids] == expected
    assert set(canonical(users)[0]) == set(expected)  # the oracle the fuzz tests check against agrees

"""Reading raw interaction files, the ML-1M converter and the bundled demo dataset."""

from __future__ import annotations

import importlib.util
import random
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from seqrec.data import build_sequences, readers
from seqrec.data.readers import DataError, Interactions, read_interactions

REPO = Path(__file__).resolve().parents[1]
ML1M_HALF = Path(__file__).resolve().parents[2] / "shared/data/ml-1m-half/ratings.dat"


def load_script(name: str):
    """The data/ scripts are standalone files, not a package."""
    spec = importlib.util.spec_from_file_location(name, REPO / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write(tmp_path: Path, content: str | bytes, name: str = "data.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def assert_read(path: Path, users: list[str], items: list[str], times: list[int] | None, **cols) -> Interactions:
    data = read_interactions(str(path), **cols)
    assert data.users.tolist() == users
    assert data.items.tolist() == items
    if times is None:
        assert data.timestamps is None
    else:
        assert data.timestamps.dtype == np.int64
        assert data.timestamps.tolist() == times
    assert data.path == str(path)
    return data


# ------------------------------------------------------------------ formats


def test_movielens_dat(tmp_path):
    path = write(tmp_path, "1::1193::5::978300760\n1::661::3::978302109\n\n10::914::3::978301968\n", "ratings.dat")
    assert_read(path, ["1", "1", "10"], ["1193", "661", "914"], [978300760, 978302109, 978301968])


def test_whitespace_string_ids_tabs_blank_lines_and_crlf(tmp_path):
    path = write(tmp_path, "u17 B00ABC 100\r\n\r\nu18\tB00XYZ   200\r\n  u17 B00XYZ 300  \r\n")
    assert_read(path, ["u17", "u18", "u17"], ["B00ABC", "B00XYZ", "B00XYZ"], [100, 200, 300])


def test_two_fields_have_no_timestamps(tmp_path):
    path = write(tmp_path, "1 5\n1 6\n2 5")  # no final newline
    assert_read(path, ["1", "1", "2"], ["5", "6", "5"], None)


def test_four_fields_are_user_item_rating_timestamp(tmp_path):
    path = write(tmp_path, "196\t242\t3\t881250949\n186\t302\t3\t891717742\n", "u.data")
    assert_read(path, ["196", "186"], ["242", "302"], [881250949, 891717742])


def test_float_timestamps_are_truncated(tmp_path):
    path = write(tmp_path, "1 5 978300760.0\n1 6 978300761.9\n")
    assert_read(path, ["1", "1"], ["5", "6"], [978300760, 978300761])


def test_non_ascii_ids_take_the_reference_parser(tmp_path):
    path = write(tmp_path, "josé café 1\nzoë thé 2\n")
    assert_read(path, ["josé", "zoë"], ["café", "thé"], [1, 2])


@pytest.mark.parametrize(
    "header, row, times",
    [
        ("userId,movieId,rating,timestamp", "7,42,4.0,1000", [1000]),
        ("user_id,item_id,time", "7,42,1000", [1000]),
        ("USER,Item,TS", "7,42,1000", [1000]),
        ("ts,movie_id,userid", "1000,42,7", [1000]),
        ("user,item", "7,42", None),
    ],
)
def test_csv_column_names(tmp_path, header, row, times):
    path = write(tmp_path, f"{header}\n{row}\n", "ratings.csv")
    assert_read(path, ["7"], ["42"], times)


def test_csv_overrides_quotes_and_bom(tmp_path):
    content = '\ufeffcustomer,product,when,note\r\n"u 1","item, a",5,"x"\r\nu2,b,6,y\r\n'
    path = write(tmp_path, content, "log.csv")
    columns = {"user_col": "customer", "item_col": "product", "time_col": "when"}
    assert_read(path, ["u 1", "u2"], ["item, a", "b"], [5, 6], **columns)


def test_csv_without_time_column_keeps_going(tmp_path):
    path = write(tmp_path, "user,item,rating\n1,2,5\n", "r.csv")
    assert_read(path, ["1"], ["2"], None)


@pytest.mark.parametrize(
    "content",
    [
        "1::1193::5::978300760\n2::661::3::978302109\n",
        "a b 1\n\n c  d 2 \n",
        "1 2\n3 4\n",
        "userId,movieId,rating,timestamp\n1,2,3.5,4\n5,6,1,7.0\n",
    ],
)
def test_fast_parser_agrees_with_reference(tmp_path, content):
    path = write(tmp_path, content)
    layout = readers._detect_layout(content, str(path), None, None, None)
    fast = readers._parse_fast(content.encode(), layout)
    assert fast is not None, "clean ASCII input should take the vectorised path"
    slow = readers._parse_lines(content, layout, str(path))
    for a, b in zip(fast, slow):
        assert (a is None and b is None) or a.tolist() == b.tolist()


# ------------------------------------------------------------------ errors


def read_error(path: Path, **cols) -> str:
    with pytest.raises(DataError) as info:
        read_interactions(str(path), **cols)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(str(path))
    return message


def test_missing_file(tmp_path):
    assert "no such file" in read_error(tmp_path / "nope.txt")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    assert "empty" in read_error(write(tmp_path, content))


def test_header_only_csv(tmp_path):
    message = read_error(write(tmp_path, "user,item,timestamp\n\n", "r.csv"))
    assert "no interactions" in message


def test_non_numeric_timestamp_names_line_and_value(tmp_path):
    path = write(tmp_path, "1 2 100\n1 3 101\n1 4 yesterday\n1 5 abc\n")
    message = read_error(path)
    assert message.startswith(f"{path}:3:") and "'yesterday'" in message


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "99999999999999999999"])
def test_unrepresentable_timestamps(tmp_path, value):
    path = write(tmp_path, f"1 2 100\n1 3 {value}\n")
    assert read_error(path).startswith(f"{path}:2:")


def test_wrong_column_count_on_line_2(tmp_path):
    path = write(tmp_path, "1 2 100\n1 3\n1 4 102\n")
    message = read_error(path)
    assert message.startswith(f"{path}:2:")
    assert "expected 3 fields (user item timestamp), got 2" in message


def test_inconsistent_field_count_that_adds_up(tmp_path):
    # 2 + 4 fields = 2 lines x 3 fields: a token count alone would not notice.
    path = write(tmp_path, "1 2 100\n1 3\n1 4 101 7\n")
    assert read_error(path).startswith(f"{path}:2:")


def test_dat_line_with_missing_field(tmp_path):
    path = write(tmp_path, "1::2::5::100\n\n1::3::101\n", "ratings.dat")
    message = read_error(path)
    assert message.startswith(f"{path}:3:") and "UserID::MovieID::Rating::Timestamp" in message


def test_csv_extra_empty_field(tmp_path):
    path = write(tmp_path, "user,item,timestamp\n1,2,100\n1,3,101,\n", "r.csv")
    message = read_error(path)
    assert message.startswith(f"{path}:3:") and "got 4" in message


def test_csv_empty_id(tmp_path):
    path = write(tmp_path, "user,item,timestamp\n1,2,100\n,3,101\n", "r.csv")
    assert read_error(path).startswith(f"{path}:3: empty user id")


def test_first_line_with_unknown_layout(tmp_path):
    path = write(tmp_path, "1 2 3 4 5\n")
    assert read_error(path).startswith(f"{path}:1: expected 2, 3 or 4")


def test_missing_csv_columns_lists_header(tmp_path):
    path = write(tmp_path, "a,b,c\n1,2,3\n", "r.csv")
    message = read_error(path)
    assert "no user column" in message and "['a', 'b', 'c']" in message
    message = read_error(path, user_col="a", item_col="b", time_col="when")
    assert "no time column (looked for when)" in message


def test_column_overrides_need_a_csv(tmp_path):
    assert "CSV" in read_error(write(tmp_path, "1 2 3\n"), user_col="user")


def test_binary_garbage(tmp_path):
    noise = random.Random(0).randbytes(2000)
    message = read_error(write(tmp_path, b"1 2 3\n" + noise + b"\x00\x00", "model.bin"))
    assert "not a text file (binary data" in message


def test_not_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "1 2 3\n1 caf\xe9 4\n".encode("latin-1"))
    message = read_error(path)
    assert message.startswith(f"{path}:2: not a text file (binary data")


@pytest.mark.parametrize("encoding, named, source", [
    ("utf-16", "UTF-16LE (byte-order mark)", "UTF-16"),  # Python writes the BOM and little-endian
    ("utf-16-le", "UTF-16LE (NUL at every second byte)", "UTF-16LE"),
    ("utf-16-be", "UTF-16BE (NUL at every second byte)", "UTF-16BE"),
    ("utf-32", "UTF-32LE (byte-order mark)", "UTF-32"),
])
def test_utf16_and_utf32_files_are_named(tmp_path, encoding, named, source):
    """Windows tools write UTF-16 by default: say so and how to convert, not 'NUL byte'."""
    path = write(tmp_path, "user,item,timestamp\n1,2,3\n1,3,4\n".encode(encoding), "export.csv")
    message = read_error(path)
    assert message == f"{path}: not UTF-8 text: the file is {named}; convert it: iconv -f {source} -t UTF-8"


# ------------------------------------------------------------------ ids: what counts as the same user or item


def sequences_of(tmp_path: Path, users: list[str], items: list[str] | None = None):
    """build_sequences over a file giving each user four interactions (a training pair, a
    validation and a test item)."""
    items = items or [f"i{k}" for k in range(4)]
    lines = [f"{u} {i} {t}" for u in users for t, i in enumerate(items)]
    return build_sequences(read_interactions(str(write(tmp_path, "\n".join(lines) + "\n"))))


@pytest.mark.parametrize("spelling, plain", [("+1", "1"), ("1_00", "100"), ("٣", "3")])
def test_other_spellings_of_a_number_are_distinct_ids(tmp_path, spelling, plain):
    """numpy's int conversion reads "+1", "1_000" and Unicode digits as numbers: it merged
    users 201 -> 200. A column holding one is a column of strings, sorted as text."""
    users = [str(u) for u in range(1, 201)] + [spelling]
    seqs = sequences_of(tmp_path, users)
    assert seqs.num_users == 201
    assert {spelling, plain} <= set(seqs.user_ids.tolist())
    assert seqs.user_ids.tolist() == sorted(seqs.user_ids.tolist())  # as strings: "10" before "2"


def test_blank_padded_id_is_not_the_number(tmp_path):
    """Readers strip blanks; an Interactions made in code may keep them, and " 7" is not 7."""
    rows = [(user, item, t) for user in (" 7", "7") for t, item in enumerate("abcd")]
    data = Interactions(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
                        np.array([r[2] for r in rows], dtype=np.int64), "mem")
    assert build_sequences(data).user_ids.tolist() == [" 7", "7"]


def test_ids_beyond_int64_are_strings_not_an_overflow(tmp_path):
    big = str(2**63)
    seqs = sequences_of(tmp_path, ["5", "10", big], items=["1", "2", "3", "-9223372036854775809"])
    assert seqs.user_ids.tolist() == ["10", "5", big]  # string order: the column is not numeric
    assert seqs.item_ids.tolist() == ["-9223372036854775809", "1", "2", "3"]


def test_int64_extremes_and_negative_ids_sort_as_numbers(tmp_path):
    users = [str(2**63 - 1), "-9223372036854775808", "-3", "0", "10", "9"]
    seqs = sequences_of(tmp_path, users)
    assert seqs.user_ids.tolist() == ["-9223372036854775808", "-3", "0", "9", "10", str(2**63 - 1)]


def test_leading_zeros_name_the_same_number(tmp_path):
    """The documented rule: in an all-decimal column "007", "7" (and "-0", "0") are one id."""
    seqs = sequences_of(tmp_path, ["007", "7", "8", "-0", "0"])
    assert seqs.user_ids.tolist() == ["0", "7", "8"] and seqs.lengths.tolist() == [8, 8, 4]


# ------------------------------------------------------------------ convert_ml1m.py

# (user, item, timestamp) in file order. Raw counts: users 2, 3, 9 have 5, user 10 has 6,
# user 7 only 4; items 100, 200, 300, 500 have 5 each (one from user 7), the rest fewer.
RATINGS = [
    (10, 100, 50), (9, 100, 1), (10, 300, 40), (2, 100, 7), (10, 200, 40), (7, 100, 1),
    (9, 200, 2), (3, 100, 1), (2, 200, 8), (7, 200, 1), (3, 200, 2), (10, 500, 20),
    (9, 300, 3), (2, 300, 9), (7, 300, 1), (3, 300, 3), (10, 600, 10), (9, 500, 4),
    (2, 500, 10), (7, 500, 1), (3, 500, 4), (10, 400, 5), (9, 700, 5), (2, 600, 11), (3, 600, 5),
]
# One pass: user 7 is dropped but still counts for items 100-500 (whose kept counts fall to 4),
# and user 9 keeps 4 items after losing rare item 700. Users in numeric order (10 after 9);
# user 10's tie at t=40 keeps file order (300 before 200).
CONVERTED = (
    "2 100 7\n2 200 8\n2 300 9\n2 500 10\n"
    "3 100 1\n3 200 2\n3 300 3\n3 500 4\n"
    "9 100 1\n9 200 2\n9 300 3\n9 500 4\n"
    "10 500 20\n10 300 40\n10 200 40\n10 100 50\n"
)


@pytest.fixture
def ratings_dat(tmp_path) -> Path:
    return write(tmp_path, "".join(f"{u}::{i}::4::{t}\n" for u, i, t in RATINGS), "ratings.dat")


def test_convert_ml1m_one_pass_filter_and_order(tmp_path, ratings_dat, capsys):
    convert = load_script("convert_ml1m")
    out = tmp_path / "out" / "ml-1m.txt"
    assert convert.main(["--ratings", str(ratings_dat), "--out", str(out)]) == 0
    assert out.read_text() == CONVERTED
    assert "16 lines, 4 users, 4 items" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["ml-1m.txt"]  # no temp file left


def test_convert_ml1m_reads_the_zip(tmp_path, ratings_dat):
    convert = load_script("convert_ml1m")
    archive = tmp_path / "download"  # detected by content, not by name
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(ratings_dat, "ml-1m/ratings.dat")
    out = tmp_path / "ml-1m.txt"
    assert convert.main(["--ratings", str(archive), "--out", str(out)]) == 0
    assert out.read_text() == CONVERTED


def test_convert_ml1m_errors_are_one_line(tmp_path, capsys):
    convert = load_script("convert_ml1m")
    archive = tmp_path / "empty.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("README", "nothing here")
    for bad in (archive, tmp_path / "missing.dat"):
        assert convert.main(["--ratings", str(bad), "--out", str(tmp_path / "x.txt")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and str(bad) in err
    assert not (tmp_path / "x.txt").exists()


def test_convert_ml1m_offline_download(tmp_path):
    convert = load_script("convert_ml1m")
    with pytest.raises(convert.ConvertError, match="cannot download"):
        convert.download("http://127.0.0.1:9/ml-1m.zip", tmp_path / "ml-1m.zip")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ demo dataset


def test_demo_is_small_reproducible_and_parses(tmp_path):
    demo = REPO / "data" / "demo.txt"
    assert demo.stat().st_size < 2_000_000
    make_demo = load_script("make_demo")
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    assert make_demo.main(["--out", str(first)]) == 0 and make_demo.main(["--out", str(second)]) == 0
    assert first.read_bytes() == second.read_bytes()
    # NumPy promises stable bit streams but not stable Generator methods across releases,
    # so the shipped file is compared byte for byte only under the NumPy that wrote it.
    if np.__version__ == make_demo.NUMPY_VERSION:
        assert first.read_bytes() == demo.read_bytes(), "data/demo.txt is stale: rerun data/make_demo.py"
    data = read_interactions(str(demo))
    users = data.users.astype(np.int64)
    assert np.all(np.diff(users) >= 0)
    assert len(np.unique(users)) == 1000
    same_user = np.diff(users) == 0
    assert np.all(np.diff(data.timestamps)[same_user] >= 0)


# ------------------------------------------------------------------ real data


@pytest.mark.skipif(not ML1M_HALF.exists(), reason="shared ml-1m-half stand-in not on this machine")
def test_ml1m_half(tmp_path, capsys):
    data = read_interactions(str(ML1M_HALF))
    assert len(data.users) == 487_650
    assert len(np.unique(data.users)) == 2_999
    assert len(np.unique(data.items)) == 3_615
    assert data.timestamps[0] == 978300760
    text = ML1M_HALF.read_text()
    layout = readers._detect_layout(text, str(ML1M_HALF), None, None, None)
    assert readers._parse_fast(ML1M_HALF.read_bytes(), layout) is not None, "real data must take the fast path"

    out = tmp_path / "ml-1m.txt"
    assert load_script("convert_ml1m").main(["--ratings", str(ML1M_HALF), "--out", str(out)]) == 0
    assert "2,999 users" in capsys.readouterr().out

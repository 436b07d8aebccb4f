"""Interactions from DataFrames, Tables, arrays and parquet files (seqrec/data/frames.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from seqrec.config import DataConfig
from seqrec.data import build_sequences, interactions_from, load_sequences
from seqrec.data.readers import DataError, read_interactions

USERS = [3, 1, 3, 2, 1, 3, 2, 1, 2, 1, 3, 2]  # four each: enough for build_sequences' split
ITEMS = ["b", "a", "c", "a", "b", "a", "c", "c", "b", "d", "d", "d"]
TIMES = [30, 10, 31, 20, 11, 29, 21, 12, 22, 13, 32, 23]


def columns(users=USERS, items=ITEMS, times=TIMES) -> dict:
    return {"user_id": list(users), "item_id": list(items), "timestamp": list(times)}


def assert_interactions(data, path: str, users=USERS, items=ITEMS, times=TIMES) -> None:
    assert data.users.tolist() == [str(u) for u in users]
    assert data.items.tolist() == [str(i) for i in items]
    if times is None:
        assert data.timestamps is None
    else:
        assert data.timestamps.dtype == np.int64 and data.timestamps.tolist() == times
    assert data.path == path


def frame_error(data, **cols) -> str:
    with pytest.raises(DataError) as info:
        interactions_from(data, **cols)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ sources


def test_pandas_dataframe():
    pd = pytest.importorskip("pandas")
    assert_interactions(interactions_from(pd.DataFrame(columns())), "pandas DataFrame")


def test_polars_dataframe_and_lazyframe():
    pl = pytest.importorskip("polars")
    assert_interactions(interactions_from(pl.DataFrame(columns())), "polars DataFrame")
    assert_interactions(interactions_from(pl.DataFrame(columns()).lazy()), "polars LazyFrame")


def test_pyarrow_table_with_chunks():
    pa = pytest.importorskip("pyarrow")
    table = pa.concat_tables([pa.table(columns(USERS[:4], ITEMS[:4], TIMES[:4])),
                              pa.table(columns(USERS[4:], ITEMS[4:], TIMES[4:]))])
    assert_interactions(interactions_from(table), "pyarrow Table")


def test_dict_tuple_and_list_of_arrays():
    assert_interactions(interactions_from(columns()), "dict of arrays")
    assert_interactions(interactions_from((np.array(USERS), ITEMS, TIMES)), "tuple of arrays")
    assert_interactions(interactions_from([USERS, ITEMS]), "list of arrays", times=None)


def test_columns_by_override_and_case():
    data = {"Customer": USERS, "PRODUCT": ITEMS, "When": TIMES, "rating": [5] * len(USERS)}
    assert_interactions(interactions_from(data, user_col="customer", item_col="product", time_col="when"),
                        "dict of arrays")
    assert_interactions(interactions_from({"UserId": USERS, "MovieId": ITEMS}), "dict of arrays", times=None)


def test_parquet_file_through_read_interactions_and_the_cli_loader(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "log.parquet"
    pd.DataFrame({**columns(), "extra": range(len(USERS))}).to_parquet(path)
    assert_interactions(read_interactions(str(path)), str(path))
    assert_interactions(interactions_from(path), str(path))  # os.PathLike
    seqs = load_sequences(DataConfig(data_path=str(path)))
    assert seqs.user_ids.tolist() == ["1", "2", "3"] and seqs.lengths.tolist() == [4, 4, 4]


def test_text_paths_go_to_read_interactions(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("".join(f"{u} {i} {t}\n" for u, i, t in zip(USERS, ITEMS, TIMES)))
    assert_interactions(interactions_from(str(path)), str(path))


# ------------------------------------------------------------------ the same Sequences as the CSV export


def csv_sequences(df, tmp_path: Path):
    path = tmp_path / "export.csv"
    df.to_csv(path, index=False)
    return build_sequences(read_interactions(str(path)))


def assert_same_sequences(a, b) -> None:
    for field in ("user_ids", "item_ids", "offsets", "items", "times"):
        left, right = getattr(a, field), getattr(b, field)
        assert (left is None and right is None) or (left.dtype, left.tolist()) == (right.dtype, right.tolist()), field


def generated(rng, n: int = 300) -> dict:
    return {"user": rng.integers(-5, 40, n), "item": rng.integers(0, 60, n),
            "timestamp": rng.integers(1_600_000_000, 1_600_100_000, n)}


@pytest.mark.parametrize("ids", ["int", "big int", "string", "decimal strings", "mixed", "uint", "bool"])
def test_frame_gives_the_sequences_of_its_csv_export(tmp_path, ids):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    data = generated(rng)
    if ids == "big int":
        data["item"] = data["item"] + (2**62)
    elif ids == "uint":
        data["item"] = data["item"].astype(np.uint64) + np.uint64(2**63)  # beyond int64: strings, not numbers
    elif ids == "string":  # blanks around an id are stripped by the reader; commas and quotes are quoted
        names = np.array(["u1", " B00ABC ", "x,y", 'say "hi"', "café", "Z"])
        data["user"] = names[rng.integers(0, len(names), len(data["user"]))]
    elif ids == "decimal strings":  # "007" and "7" are one number on both paths
        data["user"] = np.array([f"{u:03d}" if u % 2 else str(u) for u in np.abs(data["user"])])
    elif ids == "bool":  # "True" only: as narrow an array as the reader's
        data["user"] = data["user"] >= -10
    elif ids == "mixed":  # an object column: what str() gives, as to_csv writes
        data["item"] = np.array([int(i) if i % 3 else f"i{i}" if i % 2 else float(i) + 0.5 for i in data["item"]],
                                dtype=object)
    df = pd.DataFrame(data)
    assert_same_sequences(build_sequences(interactions_from(df)), csv_sequences(df, tmp_path))


def test_float_and_string_timestamps_match_the_csv_export(tmp_path):
    pd = pytest.importorskip("pandas")
    data = generated(np.random.default_rng(1))
    for times in (data["timestamp"].astype(np.float64), data["timestamp"].astype(str)):
        df = pd.DataFrame({**data, "timestamp": times})
        assert_same_sequences(build_sequences(interactions_from(df)), csv_sequences(df, tmp_path))


def test_polars_and_arrow_agree_with_pandas():
    pd, pl, pa = (pytest.importorskip(name) for name in ("pandas", "polars", "pyarrow"))
    data = generated(np.random.default_rng(2))
    data["item"] = np.array([f"i{i}" for i in data["item"]])
    expected = build_sequences(interactions_from(pd.DataFrame(data)))
    for frame in (pl.DataFrame(data), pa.table(data), data, (data["user"], data["item"], data["timestamp"])):
        assert_same_sequences(build_sequences(interactions_from(frame)), expected)


# ------------------------------------------------------------------ timestamps


def test_datetimes_are_unix_seconds_whatever_the_time_zone():
    pd, pl, pa = (pytest.importorskip(name) for name in ("pandas", "polars", "pyarrow"))
    utc = pd.to_datetime([-1500, 0, 1_600_000_000_250], unit="ms", utc=True)
    frames = [
        pd.DataFrame({"user": [1, 1, 1], "item": [1, 2, 3], "time": utc.tz_convert("Asia/Kolkata")}),
        pd.DataFrame({"user": [1, 1, 1], "item": [1, 2, 3], "time": utc.tz_convert(None)}),  # naive = UTC
        pl.DataFrame({"user": [1, 1, 1], "item": [1, 2, 3],
                      "time": pl.Series(utc.tz_convert(None)).dt.replace_time_zone("UTC")
                      .dt.convert_time_zone("America/New_York")}),
        pa.table({"user": [1, 1, 1], "item": [1, 2, 3],
                  "time": pa.array(utc.tz_convert(None).to_numpy()).cast(pa.timestamp("ms", tz="Europe/Paris"))}),
    ]
    for frame in frames:  # -1.5 s rounds down to -2, as numpy's datetime64 casts do
        assert interactions_from(frame).timestamps.tolist() == [-2, 0, 1_600_000_000], type(frame)


@pytest.mark.parametrize("times, message", [
    ([1.0, 1.5, 2.5], "column 'timestamp', row 1: timestamp is not an integer: '1.5'"),
    ([1.0, 2.0, float("inf")], "row 2: timestamp is not an integer: 'inf'"),
    ([1.0, 2.0, 1e19], "row 2: timestamp out of the int64 range: '1e+19'"),
    (["1", "2", "yesterday"], "row 2: timestamp is not an integer: 'yesterday'"),
    (["1", "2.5", "3"], "row 1: timestamp is not an integer: '2.5'"),
    (np.array([1, 2, 2**63], dtype=np.uint64), "row 2: timestamp out of the int64 range: '9223372036854775808'"),
    ([True, False, True], "timestamps of type bool; expected integers, datetimes or integer strings"),
])
def test_bad_timestamps(times, message):
    assert message in frame_error({"user": [1, 2, 3], "item": [4, 5, 6], "timestamp": times})


def test_whole_float_and_numeric_string_timestamps():
    data = interactions_from({"user": [1, 2, 3], "item": [4, 5, 6], "timestamp": [" 7", "8.0", "1e3"]})
    assert data.timestamps.tolist() == [7, 8, 1000]


# ------------------------------------------------------------------ errors


def test_missing_columns_say_what_was_looked_for():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"a": [1], "b": [2]})
    assert frame_error(df) == (
        "pandas DataFrame: no user column (looked for user, user_id, userid) in columns ['a', 'b']")
    assert frame_error(df, user_col="a", item_col="b", time_col="when") == (
        "pandas DataFrame: no time column (looked for when) in columns ['a', 'b']")


def test_missing_column_wording_matches_the_csv_reader(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError) as info:
        read_interactions(str(path))
    csv_what = str(info.value).split(": ", 1)[1].replace("CSV header", "columns")
    assert frame_error({"a": [1], "b": [2]}) == f"dict of arrays: {csv_what}"


FRAMES = {"pandas": ("DataFrame", "pandas DataFrame"), "polars": ("DataFrame", "polars DataFrame"),
          "pyarrow": ("table", "pyarrow Table")}


@pytest.mark.parametrize("library", [*FRAMES, None])
def test_missing_values_name_column_and_row(library):
    """None is each library's null; NaN is a null to pandas but a value to polars, arrow and numpy."""
    make, description = (getattr(pytest.importorskip(library), FRAMES[library][0]), FRAMES[library][1]) \
        if library else (dict, "dict of arrays")
    frame = make({"user": [1, 2, None, 4], "item": [1, 2, 3, 4]})
    assert frame_error(frame) == f"{description}, column 'user', row 2: missing value (null or NaN)"
    frame = make({"user": [1, 2, 3, 4], "item": [1.0, 2.0, 3.0, float("nan")]})
    assert frame_error(frame) == f"{description}, column 'item', row 3: missing value (null or NaN)"


def test_missing_datetime_and_empty_string_id():
    pd = pytest.importorskip("pandas")
    times = pd.to_datetime([0, None], unit="s", utc=True)
    frame = pd.DataFrame({"user": [1, 2], "item": [3, 4], "ts": times})
    assert "column 'ts', row 1: missing value" in frame_error(frame)
    assert frame_error({"user": ["a", "  "], "item": [3, 4]}) == "dict of arrays, column 'user', row 1: empty user id"


def test_float_ids_are_refused_with_the_fix():
    pd = pytest.importorskip("pandas")
    message = frame_error(pd.DataFrame({"user": [1, 2], "item": [3.0, 4.0]}))
    assert message == ("pandas DataFrame, column 'item': item ids are floats (float64); ids must be integers or "
                       "strings: convert the column first, e.g. .astype('int64')")


def test_shape_errors():
    assert "got 4 arrays" in frame_error(([1], [2], [3], [4]))
    assert "apply only to named columns" in frame_error(([1], [2]), user_col="user")
    assert frame_error({"user": [1, 2], "item": [3]}) == (
        "dict of arrays: columns of different lengths ('user' 2, 'item' 1)")
    assert frame_error({"user": [], "item": []}) == "dict of arrays: no interactions (0 rows)"
    assert "expected a 1-d column" in frame_error({"user": [[1, 2]], "item": [[3, 4]]})
    with pytest.raises(TypeError, match="got int"):
        interactions_from(5)


def test_parquet_errors(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    missing, broken = tmp_path / "none.parquet", tmp_path / "broken.pq"
    broken.write_text("user,item\n1,2\n")
    assert frame_error(missing) == f"{missing}: no such file"
    assert frame_error(broken).startswith(f"{broken}: cannot read parquet file (")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    assert frame_error(missing) == f"{missing}: reading parquet needs pyarrow: pip install 'seqrec[frames]'"

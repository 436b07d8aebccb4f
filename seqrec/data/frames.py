"""Interactions from in-memory tables and arrays, and from parquet files.

`interactions_from` takes what a Python caller holds -- a pandas or polars DataFrame (or
LazyFrame), a pyarrow Table, a dict of columns, a tuple of arrays -- or a path, and returns
the same `Interactions` the file readers return, so everything downstream (build_sequences,
the trainer) sees one kind of input.

The contract is equivalence with the CSV reader: a frame gives exactly the Sequences that its
``df.to_csv(index=False)`` export gives through read_interactions. Hence columns are found by
the CSV header's rule (readers.find_columns), and ids become the strings the export would
hold, so that build_sequences' id rule (all plain decimals: numbers; else strings) sees the
same column. What a typed column allows beyond text is decided here:

* ids: integers as their decimal strings, bools as "True"/"False", other objects (a mixed
  column) as str() gives them, as to_csv writes them; all stripped of surrounding blanks, as
  the readers strip fields. A float column is refused: it is almost always integers that
  went through NaN, and its export would make them the strings "1.0", "2.0", not the numbers
  the caller meant; an explicit ``.astype("int64")`` (or ``str``) says which.
* timestamps: integers as they are; floats and numeric strings only when whole (the CSV
  reader truncates "1.5"; a typed column that holds fractions is more likely a unit mistake);
  datetimes (naive ones read as UTC, tz-aware ones as the instant they name) as unix seconds,
  rounded down.
* a missing value (None, NaN, NaT, NA) in a used column is an error naming its row: the
  0-based position, not a pandas index label.

pandas, polars and pyarrow stay optional: a table is recognised by isinstance against the
library's classes only when that library is already imported (it must be, for the caller
to hold one of its objects), so nothing here imports one that the caller did not.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .readers import DataError, Interactions, _quote, find_columns, read_interactions

__all__ = ["interactions_from", "read_parquet"]

_INT64_MAX = 2**63 - 1
_POSITIONAL = ("users", "items", "timestamps")  # the columns of a tuple of arrays, for messages
_INSTALL = "pip install 'seqrec[frames]'"


def interactions_from(data: Any, user_col: str | None = None, item_col: str | None = None,
                      time_col: str | None = None) -> Interactions:
    """Interactions from a DataFrame, Table, dict of columns, (users, items[, timestamps])
    tuple or file path; raise DataError with a one-line message on bad data.

    user_col/item_col/time_col name the columns when the usual names (user, item_id, movieId,
    timestamp, ...) do not fit; a tuple's columns are found by position instead."""
    if isinstance(data, (str, os.PathLike)):
        return read_interactions(os.fspath(data), user_col=user_col, item_col=item_col, time_col=time_col)
    return _interactions(_table(data), user_col, item_col, time_col)


def read_parquet(path: str, user_col: str | None = None, item_col: str | None = None,
                 time_col: str | None = None) -> Interactions:
    """A parquet file's interactions (read_interactions sends .parquet/.pq files here); only
    the columns used are read, so wide files cost what their three columns cost."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: {_INSTALL}") from None
    import pyarrow as pa

    try:
        with pq.ParquetFile(path) as file:
            names = file.schema_arrow.names
            table = _Table(path, names, lambda k: file.read(columns=[names[k]]).column(0), named=True)
            return _interactions(table, user_col, item_col, time_col)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, pa.ArrowException) as err:
        reason = " ".join(str(err).split())  # arrow's messages can span lines
        raise DataError(f"{path}: cannot read parquet file ({reason})") from None


# ---------------------------------------------------------------- tables


@dataclass(frozen=True)
class _Table:
    """Columns by position, whatever holds them; `description` starts every message."""

    description: str
    names: list
    column: Callable[[int], Any]  # position -> Series, Array, ndarray or list
    named: bool  # False for a tuple of arrays, whose columns are found by position


def _loaded(name: str):
    """The module if the caller's process has imported it, else None -- never an import."""
    return sys.modules.get(name)


def _table(data: Any) -> _Table:
    pandas, polars, arrow = _loaded("pandas"), _loaded("polars"), _loaded("pyarrow")
    if pandas is not None and isinstance(data, pandas.DataFrame):
        return _Table("pandas DataFrame", list(data.columns), lambda k: data.iloc[:, k], named=True)
    if polars is not None and isinstance(data, polars.LazyFrame):
        frame = data.collect()
        return _Table("polars LazyFrame", frame.columns, frame.to_series, named=True)
    if polars is not None and isinstance(data, polars.DataFrame):
        return _Table("polars DataFrame", data.columns, data.to_series, named=True)
    if arrow is not None and isinstance(data, arrow.Table):
        return _Table("pyarrow Table", data.column_names, data.column, named=True)
    if isinstance(data, dict):
        names = list(data)
        return _Table("dict of arrays", names, lambda k: data[names[k]], named=True)
    if isinstance(data, (tuple, list)):
        if len(data) not in (2, 3):
            raise DataError(f"{type(data).__name__} of arrays: expected (users, items) or "
                            f"(users, items, timestamps), got {len(data)} arrays")
        return _Table(f"{type(data).__name__} of arrays", list(_POSITIONAL[:len(data)]), data.__getitem__,
                      named=False)
    raise TypeError(f"interactions_from: expected a pandas/polars DataFrame, a pyarrow Table, a dict of "
                    f"arrays, a (users, items[, timestamps]) tuple or a file path, got {type(data).__name__}")


def _positions(table: _Table, user_col: str | None, item_col: str | None,
               time_col: str | None) -> tuple[int, int, int | None]:
    if table.named:
        return find_columns(table.names, user_col, item_col, time_col, table.description, "columns")
    if any(col is not None for col in (user_col, item_col, time_col)):
        raise DataError(f"{table.description}: user_col/item_col/time_col apply only to named columns "
                        f"(a DataFrame, Table or dict), not to arrays given by position")
    return 0, 1, 2 if len(table.names) == 3 else None


def _interactions(table: _Table, user_col: str | None, item_col: str | None,
                  time_col: str | None) -> Interactions:
    positions = [p for p in _positions(table, user_col, item_col, time_col) if p is not None]
    wheres = [f"{table.description}, column {table.names[p]!r}" for p in positions]
    arrays = [_array(table.column(p), where) for p, where in zip(positions, wheres)]
    lengths = {len(values) for values in arrays}
    if len(lengths) > 1:
        sizes = ", ".join(f"{table.names[p]!r} {len(values)}" for p, values in zip(positions, arrays))
        raise DataError(f"{table.description}: columns of different lengths ({sizes})")
    if lengths == {0}:
        raise DataError(f"{table.description}: no interactions (0 rows)")
    users = _ids(arrays[0], wheres[0], "user")
    items = _ids(arrays[1], wheres[1], "item")
    timestamps = _timestamps(arrays[2], wheres[2]) if len(arrays) == 3 else None
    return Interactions(users=users, items=items, timestamps=timestamps, path=table.description)


# ---------------------------------------------------------------- columns


def _array(column: Any, where: str) -> np.ndarray:
    """The column as a 1-d numpy array; a missing value (None, NaN, NaT, NA) is a DataError
    at its row. Each library is asked for its own null mask first, because its conversion
    to numpy turns nulls into values (NaN in an int column) or refuses them."""
    pandas, polars, arrow = _loaded("pandas"), _loaded("polars"), _loaded("pyarrow")
    if pandas is not None and isinstance(column, pandas.Series):
        _refuse_missing(column.isna().to_numpy(), where)
        if pandas.api.types.is_datetime64_any_dtype(column.dtype) and column.dt.tz is not None:
            column = column.dt.tz_convert(None)  # the same instants as naive UTC, which to_numpy keeps datetime64
        values = column.to_numpy()
    elif polars is not None and isinstance(column, polars.Series):
        _refuse_missing(column.is_null().to_numpy(), where)
        values = column.to_numpy()  # tz-aware datetimes come as UTC datetime64
    elif arrow is not None and isinstance(column, (arrow.Array, arrow.ChunkedArray)):
        _refuse_missing(column.is_null().to_numpy(zero_copy_only=False), where)
        values = column.to_numpy(zero_copy_only=False)  # timestamps are stored (and come) as UTC
    else:
        values = np.asarray(column)
        if values.dtype.kind == "O":
            _refuse_missing(np.equal(values, None) | np.not_equal(values, values), where)  # None, NaN
    if values.ndim != 1:
        raise DataError(f"{where}: expected a 1-d column, got shape {values.shape}")
    if values.dtype.kind == "f":
        _refuse_missing(np.isnan(values), where)  # polars and numpy hold NaN as a value, not a null
    elif values.dtype.kind in "mM":
        _refuse_missing(np.isnat(values), where)
    return values


def _refuse_missing(missing: np.ndarray, where: str) -> None:
    if missing.any():
        raise DataError(f"{where}, row {int(np.argmax(missing))}: missing value (null or NaN)")


def _ids(values: np.ndarray, where: str, what: str) -> np.ndarray:
    """Ids as the strings the column's CSV export holds once the reader strips its fields, in
    an array exactly as wide as the longest, as the reader makes it (so that even the bytes
    of the Sequences match)."""
    kind = values.dtype.kind
    if kind in "iu":  # the width from the extremes, without formatting every id twice
        return values.astype(f"U{max(len(str(values.min())), len(str(values.max())))}")
    if kind == "b":
        return _narrowed(values.astype(str))  # "True"/"False", as df.to_csv writes them
    if kind in "UO":
        ids = np.char.strip(values.astype(str, copy=False))  # objects: str(value), as df.to_csv writes them
        empty = ids == ""
        if empty.any():
            raise DataError(f"{where}, row {int(np.argmax(empty))}: empty {what} id")
        return _narrowed(ids)
    if kind == "f":
        raise DataError(f"{where}: {what} ids are floats ({values.dtype}); ids must be integers or strings: "
                        f"convert the column first, e.g. .astype('int64')")
    raise DataError(f"{where}: {what} ids of type {values.dtype}; ids must be integers or strings")


def _narrowed(strings: np.ndarray) -> np.ndarray:
    return strings.astype(f"U{max(int(np.char.str_len(strings).max()), 1)}", copy=False)


def _timestamps(values: np.ndarray, where: str) -> np.ndarray:
    """int64 seconds from integers, whole floats, datetimes or numeric strings."""
    kind = values.dtype.kind
    if kind == "i":
        return values.astype(np.int64)
    if kind == "u":
        _refuse_times(values > _INT64_MAX, values, where, "timestamp out of the int64 range")
        return values.astype(np.int64)
    if kind == "M":
        return values.astype("datetime64[s]").astype(np.int64)  # numpy rounds down to the second
    if kind == "f":
        return _whole_seconds(values, values, where)
    if kind in "UO":
        return _text_seconds(values.astype(str), where)
    raise DataError(f"{where}: timestamps of type {values.dtype}; expected integers, datetimes or integer strings")


def _text_seconds(text: np.ndarray, where: str) -> np.ndarray:
    """Strings read as the CSV reader reads a timestamp field (numpy parses like int() and
    float(), surrounding blanks allowed), except that a fraction is an error, not truncated."""
    try:
        return text.astype(np.int64)
    except (ValueError, OverflowError):
        pass
    try:
        real = text.astype(np.float64)
    except ValueError:  # not all numbers: a loop, only on the way to the message naming the first
        real = np.array([_float_or_nan(value) for value in text])
    return _whole_seconds(real, text, where)


def _float_or_nan(value: str) -> float:
    """float(value), or NaN -- which _whole_seconds refuses -- for a string that is not a number."""
    try:
        return float(value)
    except ValueError:
        return math.nan


def _whole_seconds(real: np.ndarray, shown: np.ndarray, where: str) -> np.ndarray:
    """Floats that are whole numbers within int64; `shown` holds what the messages quote."""
    _refuse_times(~np.isfinite(real) | (np.trunc(real) != real), shown, where, "timestamp is not an integer")
    # 2**63 is exact in float64; every float below it converts to int64 exactly.
    _refuse_times((real < -(2.0**63)) | (real >= 2.0**63), shown, where, "timestamp out of the int64 range")
    return real.astype(np.int64)


def _refuse_times(bad: np.ndarray, shown: np.ndarray, where: str, what: str) -> None:
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{where}, row {row}: {what}: {_quote(str(shown[row]))}")

"""Read raw interaction logs into arrays of (user, item, timestamp).

Supported layouts are recognised from the content, because the same names
(`ratings.dat`, `data.txt`) are used for different layouts in the wild:

* MovieLens-1M `ratings.dat`: ``UserID::MovieID::Rating::Timestamp``;
* whitespace text: ``user item``, ``user item timestamp`` or, as in
  MovieLens-100K `u.data`, ``user item rating timestamp``;
* CSV with a header row naming the user, item and (optional) time columns;
* parquet (``.parquet``, ``.pq``), binary and so recognised by name: its columns are found
  as a CSV header's and converted by frames.py, which needs pyarrow (the ``frames`` extra).

Ids stay strings: datasets use ids such as ``B00ABC`` and re-indexing belongs to
the caller, who also decides what "same user" means across files.

Two parsers give identical results. The line-by-line parser is the reference
and the only one that reports errors, so a message always names the first bad
line. A vectorised parser handles the common case -- clean ASCII -- and
declines (returns None) as soon as it cannot vouch for the input, which keeps
20M-line files (ML-20M) in the seconds range without giving up exact messages.
"""

from __future__ import annotations

import codecs
import csv
import math
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["DataError", "Interactions", "read_interactions"]


class DataError(ValueError):
    """Bad input data; str(err) is one line naming the file (and line number where there is one)."""


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on arrays has no truth value
class Interactions:
    """Interactions in file order; ids are the original strings."""

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray | None
    path: str


# Usual column names, compared case-insensitively (so "userId" matches "userid").
_USER_NAMES = ("user", "user_id", "userid")
_ITEM_NAMES = ("item", "item_id", "itemid", "movieid", "movie_id")
_TIME_NAMES = ("timestamp", "time", "ts")

_WHITESPACE_LAYOUTS = {
    2: ("user", "item"),
    3: ("user", "item", "timestamp"),
    4: ("user", "item", "rating", "timestamp"),
}

# ASCII bytes that str.split() treats as whitespace; the fast parser must split
# exactly where the reference parser does.
_ASCII_BLANKS = (9, 10, 11, 12, 13, 28, 29, 30, 31, 32)
# Bytes in a CSV body where splitting at commas and blanks could disagree with the
# csv module: quotes, and blanks inside a line (which could hide an empty field).
_CSV_UNSAFE = tuple(bytes([byte]) for byte in (ord('"'),) + _ASCII_BLANKS if byte != ord("\n"))

_PARQUET_SUFFIXES = (".parquet", ".pq")

_INT64_LIMIT = 2**63
_FLOAT_EXACT = 2**53  # beyond this, float64 would silently round integer timestamps


@dataclass(frozen=True)
class _Layout:
    """Where the fields of one data line are, and how to split it."""

    separator: str | None  # None: runs of whitespace
    names: tuple[str, ...]  # every field, for "expected ..." messages
    user: int
    item: int
    time: int | None
    data_start: int  # number of lines before the data (the CSV header)

    def describe(self) -> str:
        joiner = " " if self.separator is None else self.separator
        return joiner.join(self.names)


def read_interactions(
    path: str,
    *,
    user_col: str | None = None,
    item_col: str | None = None,
    time_col: str | None = None,
) -> Interactions:
    """Read an interaction file; raise DataError with a one-line message on bad data.

    user_col/item_col/time_col name CSV or parquet columns when the usual names do not fit.
    """
    path = os.fspath(path)
    if path.lower().endswith(_PARQUET_SUFFIXES):
        from .frames import read_parquet  # imported here: frames builds on this module

        return read_parquet(path, user_col=user_col, item_col=item_col, time_col=time_col)
    data = _read_bytes(path)
    layout = _detect_layout(_decode(data, path), path, user_col, item_col, time_col)
    # The text is decoded again only for the reference parser, so that the fast one does
    # not hold a second copy of the file.
    columns = _parse_fast(data, layout) or _parse_lines(_decode(data, path), layout, path)
    users, items, timestamps = columns
    if len(users) == 0:
        raise _error(path, f"no interactions after the header (line {layout.data_start})")
    return Interactions(users=users, items=items, timestamps=timestamps, path=path)


# ---------------------------------------------------------------- file level


def _error(path: str, what: str, lineno: int | None = None) -> DataError:
    where = path if lineno is None else f"{path}:{lineno}"
    return DataError(f"{where}: {what}")


def _quote(value: str) -> str:
    """repr() keeps the message on one line even for values with control characters."""
    return repr(value if len(value) <= 40 else value[:40] + "...")


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise _error(path, "no such file") from None
    except OSError as err:
        raise _error(path, f"cannot read file ({err.strerror})") from None
    # A BOM would otherwise become part of the first CSV column name.
    return data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data


def _decode(data: bytes, path: str) -> str:
    """Reject binary input early, where the message can still say what the file is."""
    wide = _wide_encoding(data)
    if wide:
        what, source = wide
        raise _error(path, f"not UTF-8 text: the file is {what}; convert it: iconv -f {source} -t UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise _error(path, "not a text file (binary data: NUL byte)", _line_of(data, nul))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        byte = data[err.start]
        raise _error(
            path, f"not a text file (binary data or not UTF-8: byte 0x{byte:02x})", _line_of(data, err.start)
        ) from None
    if not text or text.isspace():
        raise _error(path, "empty file (no interactions)")
    return text


# Longest byte-order marks first: UTF-32LE's starts with UTF-16LE's.
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32LE"), (codecs.BOM_UTF32_BE, "UTF-32BE"),
              (codecs.BOM_UTF16_LE, "UTF-16LE"), (codecs.BOM_UTF16_BE, "UTF-16BE"))


def _wide_encoding(data: bytes) -> tuple[str, str] | None:
    """(what, iconv's source encoding) for a file in UTF-16 or UTF-32, which Windows tools
    write by default and which would otherwise be reported as binary: found by its byte-order
    mark, or without one by ASCII text's signature in UTF-16 -- a NUL at every second byte
    and nowhere else (then iconv must be told the byte order; with a mark it reads it)."""
    for bom, name in _WIDE_BOMS:
        if data.startswith(bom):
            return f"{name} (byte-order mark)", name[:-2]
    head = data[:4096]
    even, odd = head[0:len(head) - len(head) % 2:2], head[1::2]
    if len(odd) < 2:
        return None
    if even.count(0) == 0 and odd.count(0) == len(odd):
        return "UTF-16LE (NUL at every second byte)", "UTF-16LE"
    if odd.count(0) == 0 and even.count(0) == len(even):
        return "UTF-16BE (NUL at every second byte)", "UTF-16BE"
    return None


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _first_line(text: str) -> tuple[int, str]:
    """First non-blank line and its number; the caller has checked that one exists."""
    start, lineno = 0, 1
    while True:
        end = text.find("\n", start)
        line = text[start:] if end < 0 else text[start:end]
        if line.strip():
            return lineno, line
        start, lineno = end + 1, lineno + 1


# ---------------------------------------------------------------- layouts


def _detect_layout(
    text: str, path: str, user_col: str | None, item_col: str | None, time_col: str | None
) -> _Layout:
    lineno, line = _first_line(text)
    if "::" not in line and "," in line:
        return _csv_layout(line, lineno, path, user_col, item_col, time_col)
    if any(col is not None for col in (user_col, item_col, time_col)):
        raise _error(path, "user_col/item_col/time_col apply only to CSV files with a header row and parquet files")
    if "::" in line:
        return _Layout("::", ("UserID", "MovieID", "Rating", "Timestamp"), 0, 1, 3, 0)
    width = len(line.split())
    if width not in _WHITESPACE_LAYOUTS:
        expected = " | ".join(" ".join(names) for names in _WHITESPACE_LAYOUTS.values())
        raise _error(path, f"expected 2, 3 or 4 whitespace-separated fields ({expected}), got {width}", lineno)
    time = width - 1 if width > 2 else None
    return _Layout(None, _WHITESPACE_LAYOUTS[width], 0, 1, time, 0)


def _csv_layout(
    line: str, lineno: int, path: str, user_col: str | None, item_col: str | None, time_col: str | None
) -> _Layout:
    header = [name.strip() for name in next(csv.reader([line]))]
    user, item, time = find_columns(header, user_col, item_col, time_col, f"{path}:{lineno}", "CSV header")
    return _Layout(",", tuple(header), user, item, time, lineno)


def find_columns(
    names: list, user_col: str | None, item_col: str | None, time_col: str | None, where: str, listing: str
) -> tuple[int, int, int | None]:
    """Positions of the user, item and (optional) time columns among `names`: the override
    where one is given, else the first usual name present, compared case-insensitively.

    Shared by the CSV header and the in-memory tables of frames.py, so that one frame and its
    CSV export find the same columns and fail with the same message: "{where}: no ... column
    (looked for ...) in {listing} [names]"."""
    lowered = [str(name).lower() for name in names]

    def find(what: str, override: str | None, usual: tuple[str, ...], required: bool) -> int | None:
        wanted = (override,) if override is not None else usual
        for name in wanted:
            if name.lower() in lowered:
                return lowered.index(name.lower())
        if required or override is not None:
            raise DataError(f"{where}: no {what} column (looked for {', '.join(wanted)}) in {listing} {names}")
        return None

    user = find("user", user_col, _USER_NAMES, True)
    item = find("item", item_col, _ITEM_NAMES, True)
    time = find("time", time_col, _TIME_NAMES, False)
    return user, item, time


# ---------------------------------------------------------------- reference parser


def _parse_lines(text: str, layout: _Layout, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    for lineno, fields in _records(text, layout):
        if len(fields) != len(layout.names):
            raise _error(
                path, f"expected {len(layout.names)} fields ({layout.describe()}), got {len(fields)}", lineno
            )
        for what, index in (("user", layout.user), ("item", layout.item)):
            if not fields[index]:
                raise _error(path, f"empty {what} id", lineno)
        users.append(fields[layout.user])
        items.append(fields[layout.item])
        if layout.time is not None:
            times.append(_parse_timestamp(fields[layout.time], path, lineno))
    timestamps = np.array(times, dtype=np.int64) if layout.time is not None else None
    return np.array(users, dtype=str), np.array(items, dtype=str), timestamps


def _records(text: str, layout: _Layout):
    """Yield (line number, fields) for every non-blank data line."""
    lines = text.split("\n")
    if layout.separator == ",":
        reader = csv.reader(lines[layout.data_start:], skipinitialspace=True)
        for row in reader:
            fields = [field.strip() for field in row]
            if any(fields):
                yield layout.data_start + reader.line_num, fields
        return
    for lineno, line in enumerate(lines[layout.data_start:], layout.data_start + 1):
        fields = (line.replace(layout.separator, " ") if layout.separator else line).split()
        if fields:
            yield lineno, fields


def _parse_timestamp(value: str, path: str, lineno: int) -> int:
    """Integers, or floats such as "978300760.0" truncated; nothing else passes."""
    try:
        number = int(value)
    except ValueError:
        try:
            real = float(value)
        except ValueError:
            raise _error(path, f"timestamp is not an integer: {_quote(value)}", lineno) from None
        if not math.isfinite(real):
            raise _error(path, f"timestamp is not an integer: {_quote(value)}", lineno) from None
        number = int(real)
    if not -_INT64_LIMIT <= number < _INT64_LIMIT:
        raise _error(path, f"timestamp out of the int64 range: {_quote(value)}", lineno)
    return number


# ---------------------------------------------------------------- fast parser


def _parse_fast(data: bytes, layout: _Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """Vectorised parse of clean ASCII input; None whenever the reference parser must decide."""
    if not data.isascii():
        return None
    blanked = _blank_separated(data, _data_offset(data, layout.data_start), layout.separator)
    width = len(layout.names)
    wanted = [layout.user, layout.item] + ([layout.time] if layout.time is not None else [])
    columns = None if blanked is None else _split_columns(*blanked, width, wanted)
    if columns is None:
        return None
    # With no blanks inside CSV lines, each data line has at least width-1 commas, so an
    # exact total rules out lines with extra, empty fields.
    body, offset, _ = blanked
    if layout.separator == "," and body.count(b",", offset) != len(columns[0]) * (width - 1):
        return None
    users, items = columns[0].astype(str), columns[1].astype(str)
    if layout.time is None:
        return users, items, None
    timestamps = _fast_timestamps(columns[2])
    return None if timestamps is None else (users, items, timestamps)


def _data_offset(data: bytes, count: int) -> int:
    """Where the data starts after `count` header lines (an offset, not a copy: files run to GBs)."""
    start = 0
    for _ in range(count):
        start = data.find(b"\n", start) + 1
        if start == 0:
            return len(data)
    return start


def _blank_separated(data: bytes, offset: int, separator: str | None) -> tuple[bytes, int, int | None] | None:
    """(body, offset, extra blank byte) such that fields are the runs of non-blank bytes of
    body[offset:] with the extra byte also counted as blank; None if that could change the fields.
    A CSV comma becomes that extra blank instead of being replaced, which would copy the file."""
    if separator is None:
        return data, offset, None
    if separator != ",":
        return data[offset:].replace(separator.encode(), b" "), 0, None
    if data.find(b"\r", offset) >= 0:
        data, offset = data[offset:].replace(b"\r\n", b"\n"), 0
    # Commas may count as blanks only where no field is quoted or holds blanks; a few
    # memchr scans are far cheaper than a per-byte test.
    if any(data.find(unsafe, offset) >= 0 for unsafe in _CSV_UNSAFE):
        return None
    return data, offset, ord(",")


def _blank(chars: np.ndarray, extra: int | None) -> np.ndarray:
    """Bytes that str.split() treats as whitespace (9-13, 28-32), or equal to `extra`. uint8
    arithmetic wraps below 9 and 28; two range tests took 18 ms per 32 MB block here, a
    256-entry table lookup 39 ms."""
    blank = ((chars - 9) <= 4) | ((chars - 28) <= 4)
    return blank if extra is None else blank | (chars == extra)


_BLOCK = 1 << 25  # bytes per block of _split_columns: bounds its temporaries to a few times this


def _split_columns(body: bytes, offset: int, extra: int | None, width: int,
                   wanted: list[int]) -> list[np.ndarray] | None:
    """Byte-string columns `wanted` of body[offset:], or None unless each line has `width` fields.

    Runs over blocks of whole lines, so the token positions (8 bytes per token edge) of a
    20M-line file never exist at once."""
    chars = np.frombuffer(body, dtype=np.uint8)
    parts: list[list[np.ndarray]] = [[] for _ in wanted]
    start = offset
    while start < len(chars):
        stop = body.find(b"\n", min(start + _BLOCK, len(chars)) - 1) + 1 or len(chars)
        block = chars[start:stop]
        solid = np.zeros(len(block) + 2, dtype=bool)  # inside a token; padded with blanks
        solid[1:-1] = ~_blank(block, extra)
        edges = np.flatnonzero(solid[1:] != solid[:-1])  # alternately token start and token end
        starts, ends = edges[0::2], edges[1::2]
        line_ends = np.append(np.flatnonzero(block == ord("\n")), len(block))
        per_line = np.diff(np.searchsorted(starts, line_ends), prepend=0)
        if np.any((per_line != 0) & (per_line != width)):
            return None
        for part, field in zip(parts, wanted):
            part.append(_gather(block, starts[field::width], ends[field::width]))
        start = stop
    return [np.concatenate(part) if part else np.empty(0, dtype="S1") for part in parts]


def _gather(chars: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Copy the tokens [starts, ends) into one fixed-width bytes array without Python objects."""
    lengths = ends - starts
    size = max(int(lengths.max(initial=0)), 1)
    padded = np.concatenate((chars, np.zeros(size, dtype=np.uint8)))
    rows = np.lib.stride_tricks.sliding_window_view(padded, size)[starts]
    rows[np.arange(size) >= lengths[:, None]] = 0  # 'S' strings end at the first NUL
    return rows.view(f"S{size}").ravel()


def _fast_timestamps(column: np.ndarray) -> np.ndarray | None:
    try:
        return column.astype(np.int64)
    except (ValueError, OverflowError):
        pass
    try:
        real = column.astype(np.float64)
    except ValueError:
        return None
    if not np.all(np.abs(real) < _FLOAT_EXACT):  # also false for nan/inf
        return None
    return np.trunc(real).astype(np.int64)

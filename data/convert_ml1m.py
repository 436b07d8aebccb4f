"""Convert MovieLens-1M ratings into SASRec's `ml-1m.txt` layout: `user item timestamp` lines.

The SASRec authors' preprocessing counts interactions per user and per item once,
on the raw data, and keeps an interaction when both counts reach 5. It is a single
pass, not an iterated k-core: a kept user may end with fewer than 5 interactions.
We reproduce that so that results stay comparable with the papers, but keep the
original ids and the timestamps (time-aware models need them; ids are remapped
when the file is loaded).

Usage:
    python data/convert_ml1m.py                          # download ml-1m.zip from GroupLens
    python data/convert_ml1m.py --ratings ratings.dat    # or a local ratings.dat / ml-1m.zip
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing the package

from seqrec.data.readers import DataError, Interactions, read_interactions  # noqa: E402

URL = "http://files.grouplens.org/datasets/movielens/ml-1m.zip"
ZIP_MEMBER = "ml-1m/ratings.dat"


class ConvertError(Exception):
    """A one-line reason the conversion cannot go on (offline, bad archive)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert MovieLens-1M ratings.dat into SASRec-style 'user item timestamp' lines, "
        "users in ascending id order, each user's items by time (ties keep file order), after "
        "SASRec's one-pass count filter.",
    )
    parser.add_argument(
        "--ratings",
        type=Path,
        metavar="PATH",
        help=f"local ratings.dat or ml-1m.zip (reads {ZIP_MEMBER}); default: download {URL} into {HERE}",
    )
    parser.add_argument(
        "--out", type=Path, metavar="PATH", default=HERE / "ml-1m.txt", help="output file (default: %(default)s)"
    )
    parser.add_argument(
        "--min_count",
        type=int,
        metavar="N",
        default=5,
        help="keep an interaction only if its user and its item each have at least this many "
        "interactions in the raw data (default: %(default)s)",
    )
    return parser.parse_args(argv)


def download(url: str, dest: Path) -> Path:
    """Fetch once; a finished download is reused, a broken one never is (written to .part first)."""
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f)
    except (urllib.error.URLError, OSError) as err:
        part.unlink(missing_ok=True)
        reason = getattr(err, "reason", err)
        hint = "pass --ratings PATH to a local ratings.dat or ml-1m.zip"
        raise ConvertError(f"cannot download {url} ({reason}); {hint}") from None
    os.replace(part, dest)
    return dest


def read_ratings(path: Path) -> Interactions:
    """ratings.dat directly, or the member of the official zip (detected from content, not name)."""
    if not zipfile.is_zipfile(path):
        return read_interactions(str(path))
    name = f"{path}:{ZIP_MEMBER}"  # how messages name the member instead of its temporary copy
    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory() as tmp:
        if ZIP_MEMBER not in archive.namelist():
            raise ConvertError(f"{path}: no {ZIP_MEMBER} in the archive")
        extracted = archive.extract(ZIP_MEMBER, tmp)
        try:
            return dataclasses.replace(read_interactions(extracted), path=name)
        except DataError as err:
            raise DataError(str(err).replace(extracted, name)) from None


def count_filter(data: Interactions, min_count: int) -> np.ndarray:
    """Mask of interactions whose user and item both have >= min_count raw interactions."""
    keep = np.ones(len(data.users), dtype=bool)
    for ids in (data.users, data.items):
        _, codes, counts = np.unique(ids, return_inverse=True, return_counts=True)
        keep &= counts[codes] >= min_count
    return keep


def ordered_lines(data: Interactions, keep: np.ndarray) -> list[str]:
    """Users by numeric id, then by time; lexsort is stable, so ties keep file order."""
    if data.timestamps is None:
        raise ConvertError(f"{data.path}: no timestamps, cannot order interactions by time")
    users, items, times = data.users[keep], data.items[keep], data.timestamps[keep]
    try:
        numeric_users = users.astype(np.int64)
    except ValueError:
        raise ConvertError(f"{data.path}: user ids are not integers, not a MovieLens ratings file") from None
    order = np.lexsort((times, numeric_users))
    return [f"{u} {i} {t}\n" for u, i, t in zip(users[order], items[order], times[order].tolist())]


def write_atomic(path: Path, lines: list[str]) -> None:
    """Readers never see a half-written file, even if the conversion is interrupted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        source = args.ratings if args.ratings is not None else download(URL, HERE / "ml-1m.zip")
        data = read_ratings(source)
        keep = count_filter(data, args.min_count)
        lines = ordered_lines(data, keep)
        write_atomic(args.out, lines)
    except (ConvertError, DataError, zipfile.BadZipFile) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.out}: {len(lines):,} lines, {len(np.unique(data.users[keep])):,} users, "
        f"{len(np.unique(data.items[keep])):,} items "
        f"(kept {len(lines):,} of {len(keep):,} ratings, min_count {args.min_count})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`seqrec recommend`: top-k items for some users, or for all of them into a CSV or parquet file.

Known users' histories come from the run directory (``sequences.npz``, what the run trained
on), so serving needs neither the training file nor a second read of the checkpoint;
``--data_path`` serves the histories of another interactions file instead (fresher logs):
its items the model does not know are dropped. Bulk output is written in batches of
``--batch_size`` users, each scored ``--item_chunk`` items at a time, so memory is bounded
by batch x chunk scores at any number of users and items; the file appears (renamed from a
temporary one) only when complete.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import ConfigError, from_dict
from .data import DataError, Sequences, load_sequences, resolve_path
from .devices import resolve_device
from .serve import Recommender

OUT_FORMATS = (".csv", ".parquet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqrec recommend", description=main.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a run directory (its best.pt) or a checkpoint file")
    who = parser.add_argument_group("users (one of)")
    who.add_argument("--user", action="append", default=[], help="user id (repeatable)")
    who.add_argument("--users_file", help="file with one user id per line")
    who.add_argument("--all_users", action="store_true", help="every user of the run (or of --data_path)")
    parser.add_argument("-k", type=int, default=10, help="recommendations per user")
    parser.add_argument("--out", help="write (user, rank, item, score) rows to FILE.csv or FILE.parquet "
                                      "instead of printing them (needed with --all_users)")
    parser.add_argument("--exclude_seen", action=argparse.BooleanOptionalAction, default=True,
                        help="leave out every item of the user's history (default: on)")
    parser.add_argument("--include_seen", action="store_false", dest="exclude_seen", help=argparse.SUPPRESS)
    parser.add_argument("--exclude_items", help="file of item ids (one per line) never to recommend")
    parser.add_argument("--allow_items", help="file of the only item ids to recommend")
    parser.add_argument("--data_path", help="serve the histories of this interactions file "
                                            "(default: the run's own, from its sequences.npz)")
    parser.add_argument("--batch_size", type=int, default=256, help="users scored at a time")
    parser.add_argument("--item_chunk", type=int, default=65536,
                        help="item ids scored at a time (memory: batch_size x item_chunk scores)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`seqrec recommend --checkpoint RUN (--user ID | --users_file F | --all_users --out FILE) [-k 10]`."""
    args = build_parser().parse_args(argv)
    try:
        check_flags(args)
        rec = Recommender.from_checkpoint(args.checkpoint, resolve_device(args.device))
        if args.data_path or rec.users is None:
            rec.users = aligned(histories_file(args, rec), rec)
        eligible = rec.eligible(read_ids(args.exclude_items, "item ids") if args.exclude_items else None,
                                read_ids(args.allow_items, "item ids") if args.allow_items else None)
        filters = {"exclude_seen": args.exclude_seen, "item_chunk": args.item_chunk, "eligible": eligible}
        users = rec.users.user_ids.astype(str) if args.all_users else requested_users(args)
        rec.user_rows(users)  # unknown users: one line before any output
        batches = recommend_in_batches(rec, users, args.k, args.batch_size, filters)
        if args.out:
            write_rows(Path(args.out), batches)
            print(f"wrote recommendations for {len(users):,} users to {args.out}", file=sys.stderr)
        else:
            for user_ids, ids, scores in batches:
                for user, row_ids, row_scores in zip(user_ids, ids, scores):
                    print(f"{user}\t" + " ".join(f"{i}:{s:.3f}" for i, s in zip(row_ids, row_scores) if i is not None))
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    except (ConfigError, DataError, ckpt.CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def check_flags(args: argparse.Namespace) -> None:
    for flag, value in (("-k", args.k), ("--item_chunk", args.item_chunk), ("--batch_size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.all_users and (args.user or args.users_file):
        raise ConfigError("give --all_users or --user / --users_file, not both")
    if not (args.all_users or args.user or args.users_file):
        raise ConfigError("give --user ID, --users_file FILE or --all_users")
    if args.all_users and not args.out:
        raise ConfigError("--all_users writes a file: give --out recs.parquet or recs.csv")
    if args.out and Path(args.out).suffix not in OUT_FORMATS:
        raise ConfigError(f"--out {args.out}: the name must end in {' or '.join(OUT_FORMATS)}")


def requested_users(args: argparse.Namespace) -> list[str]:
    return [*args.user, *(read_ids(args.users_file, "user ids") if args.users_file else [])]


def histories_file(args: argparse.Namespace, rec: Recommender) -> Sequences:
    """The sequences of --data_path, or of the checkpoint's own training data when its run
    directory holds none."""
    data_cfg = from_dict({"data": (rec.config or {}).get("data") or {}}, f"{args.checkpoint}: config").data
    if args.data_path:
        data_cfg.data_path, data_cfg.dataset = args.data_path, None
    seqs = load_sequences(data_cfg)
    if rec.uses_time and seqs.times is None:
        raise DataError(f"{resolve_path(data_cfg)}: this TiSASRec model needs timestamps and the file has none")
    return seqs


def aligned(seqs: Sequences, rec: Recommender) -> Sequences:
    """`seqs` re-indexed to the model's items; interactions with items it does not know are dropped."""
    index = np.array([rec.index.get(str(item), 0) for item in seqs.item_ids], dtype=np.int64)
    items = index[seqs.items - 1]
    keep = items > 0
    counts = np.bincount(np.repeat(np.arange(seqs.num_users), seqs.lengths)[keep], minlength=seqs.num_users)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    times = None if seqs.times is None else seqs.times[keep]
    return Sequences(seqs.user_ids, np.array(rec.item_ids), offsets, items[keep], times)


def recommend_in_batches(rec: Recommender, users, k: int, batch_size: int,
                         filters: dict) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(user ids, item ids, scores) for `users`, batch_size users at a time, with a progress bar."""
    users = np.asarray(users, dtype=object)
    with tqdm(total=len(users), unit="user", desc="recommend", disable=None, file=sys.stderr) as bar:
        for start in range(0, len(users), batch_size):
            part = users[start:start + batch_size]
            ids, scores = rec.recommend(list(part), k, **filters)
            bar.update(len(part))
            yield part, ids, scores


def write_rows(out: Path, batches) -> None:
    """(user, rank, item, score) rows, rank 1 = best, rows without an item left out; written to a
    temporary file beside `out` and renamed, so a stopped job leaves no partial file."""
    fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        (_write_parquet if out.suffix == ".parquet" else _write_csv)(Path(tmp), batches)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _long_rows(user_ids, ids, scores):
    """One batch as flat columns, best first per user, without the empty tail of short rows."""
    k = ids.shape[1]
    keep = ids != None  # noqa: E711 (elementwise on an object array)
    users = np.repeat(np.asarray(user_ids, dtype=object), k).reshape(-1, k)[keep]
    ranks = np.broadcast_to(np.arange(1, k + 1, dtype=np.int32), ids.shape)[keep]
    return users, ranks, ids[keep], scores[keep]


def _write_csv(path: Path, batches) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "rank", "item", "score"])
        for batch in batches:
            users, ranks, items, scores = _long_rows(*batch)
            writer.writerows(zip(users, ranks.tolist(), items, (f"{s:.6g}" for s in scores.tolist())))


def _write_parquet(path: Path, batches) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("parquet output needs pyarrow: pip install 'seqrec[frames]' (or write --out FILE.csv)") from None
    schema = pa.schema([("user", pa.string()), ("rank", pa.int32()), ("item", pa.string()), ("score", pa.float32())])
    with pq.ParquetWriter(path, schema) as writer:
        for batch in batches:
            users, ranks, items, scores = _long_rows(*batch)
            writer.write_table(pa.table([pa.array(users.astype(str)), pa.array(ranks), pa.array(items.astype(str)),
                                         pa.array(scores)], schema=schema))


def read_ids(path: str, what: str) -> list[str]:
    """The non-blank lines of an ids file, or ConfigError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what} ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read {what} (not UTF-8 text)") from None

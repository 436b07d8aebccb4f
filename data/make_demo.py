"""Write `demo.txt`, the synthetic demo dataset (sequential and temporal structure).

The generator lives in the package (seqrec/data/demo.py, where its generative process is
described), so an installed seqrec produces the same data for `--dataset demo` from any
directory; this script writes it to a file. data/demo.txt is its default output, a pure
function of --seed and --users (byte-identical under NumPy `NUMPY_VERSION`).

Usage: python data/make_demo.py [--seed 0] [--users 1000] [--out data/demo.txt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing the package

from seqrec.data import demo  # noqa: E402

NUMPY_VERSION = demo.NUMPY_VERSION  # the NumPy that wrote data/demo.txt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a synthetic 'user item timestamp' dataset with chain (sequential) and "
        "session (temporal) structure; the output is a pure function of --seed and --users.",
    )
    parser.add_argument("--seed", type=int, default=demo.SEED, help="random seed (default: %(default)s)")
    parser.add_argument("--users", type=int, default=demo.USERS, help="number of users (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=HERE / "demo.txt", metavar="PATH", help="output file (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    text = demo.generate(args.seed, args.users)
    demo.write(args.out, text)
    rows = [line.split(" ") for line in text.splitlines()]
    users = {row[0] for row in rows}
    items = {row[1] for row in rows}
    lines = len(rows)
    print(
        f"wrote {args.out}: {lines:,} lines, {len(users):,} users, {len(items):,} items, "
        f"{len(text):,} bytes, mean length {lines / len(users):.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

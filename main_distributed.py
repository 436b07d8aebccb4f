"""Alias kept so the seed's `torchrun ... main_distributed.py ...` command lines keep working."""
import sys

from seqrec.cli import main

if __name__ == "__main__":
    sys.exit(main())

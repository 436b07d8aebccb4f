"""Distributed environment check: python test_distributed.py (or under torchrun)."""
import sys

from seqrec.envcheck import main

if __name__ == "__main__":
    sys.exit(main())

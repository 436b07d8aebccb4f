"""Single entry point: `python main.py ...` is one process; under torchrun it is one DDP rank."""
import sys

from seqrec.cli import main

if __name__ == "__main__":
    sys.exit(main())

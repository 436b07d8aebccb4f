"""GPU tests: skipped, cleanly, where torch sees no CUDA device.

Run them on a GPU machine with ``python -m pytest tests/gpu`` (a minute or two). They need a
CUDA build of torch and one GPU; nothing else.

conftest.py files outside packages all have the module name ``conftest``; pytest drops the
previous one from ``sys.modules`` before importing the next, so once this folder has been
collected, ``from conftest import small_config`` in any other test file would find this
module. It therefore re-exports the helpers of tests/conftest.py (not its fixtures, which
pytest already applies here from their own file).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

try:
    from _pytest.fixtures import getfixturemarker
except ImportError:  # pragma: no cover  (older or newer pytest: fall back to the marker attributes)
    def getfixturemarker(obj):
        return getattr(obj, "_pytestfixturefunction", None) or getattr(obj, "_fixture_function_marker", None)

# cuBLAS reads this when its first handle is made, which in a test session can be before a
# test's --deterministic run sets it; without it deterministic mode cannot make matmuls exact.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_seqrec_tests_conftest", HERE.parent / "conftest.py")
_parent = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_parent)
globals().update({name: value for name, value in vars(_parent).items()
                  if not name.startswith("__") and not name.startswith("_") and getfixturemarker(value) is None})

NO_CUDA = None if torch.cuda.is_available() else (
    f"no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'})")


def pytest_collection_modifyitems(config, items):
    """Skip the tests of this folder without CUDA (the hook sees every collected item)."""
    if NO_CUDA is None:
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)

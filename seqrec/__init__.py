"""seqrec: SASRec and TiSASRec sequential recommenders, with optional mHC residuals.

``seqrec.fit(data, ...)`` trains and returns a Recommender, ``seqrec.load(run_dir)`` loads
one (seqrec/api.py). They are imported on first use, so ``import seqrec`` stays cheap and
free of side effects.
"""

__version__ = "0.1.0"  # the one version: pyproject.toml reads it ([tool.setuptools.dynamic])

__all__ = ["Recommender", "__version__", "fit", "load"]


def __getattr__(name: str):
    if name in ("fit", "load"):
        from . import api
        return getattr(api, name)
    if name == "Recommender":
        from .serve import Recommender
        return Recommender
    raise AttributeError(f"module 'seqrec' has no attribute {name!r}")

"""seqrec: SASRec and TiSASRec sequential recommenders, with optional mHC residuals."""

__version__ = "0.1.0"  # the one version: pyproject.toml reads it ([tool.setuptools.dynamic])

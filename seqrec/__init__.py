"""seqrec: SASRec and TiSASRec sequential recommenders, with optional mHC residuals."""

"""The tutorial's materializing trainer steps (:mod:`.tutorial`, the baseline) and the same steps on
fastalign's kernels (:mod:`.on_fastalign`); :mod:`.tutorial_ops` holds the eager token-level code."""

from fastalign.reference import on_fastalign, tutorial

__all__ = ["on_fastalign", "tutorial"]

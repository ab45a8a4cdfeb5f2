"""ROC and TAR@FAR of genuine vs impostor pair scores (docs/metrics.md §4), accept iff score >= threshold.

One sort of the scores gives the confusion counts at every distinct score (what scikit-learn's
roc_curve computes, in numpy only); every reading of TAR at a target FAR is then a search in those
counts, so IJB-C's 15.7M pair scores cost about one sort. Every report names its reading mode:

- "insightface": eval_ijbc.py. roc_curve (drop_intermediate), arrays reversed, the point whose FPR is
  nearest the target; ties -> first in reversed order (highest TAR). May read a point with FPR > target.
- "ijb_evals": docs/metrics.md §4(b): nearest FPR in roc_curve's own order; ties -> lowest TAR. (The copies
  of ijb_evals.py we read also reverse the arrays, which makes them equal to "insightface".)
- "conservative" (default): the highest TAR over all thresholds with FAR <= target, ties exact.
- "interpolated": linear in FPR over the upper envelope (the highest TAR of each distinct FPR).
"conservative" and "interpolated" are NaN for targets below 1/|impostors| (not one false accept can be
resolved there) unless `nan_unresolved=False`; the nearest modes always read some point, as their
scripts do.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facebce.errors import DataFormatError

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TAR_MODES = ("insightface", "ijb_evals", "conservative", "interpolated")
DEFAULT_TAR_MODE = "conservative"


@dataclass(frozen=True)
class TarAtFar:
    mode: str
    far_targets: np.ndarray
    tar: np.ndarray
    far: np.ndarray  # FAR of the point read (the target itself for "interpolated")
    threshold: np.ndarray  # accept iff score >= threshold (NaN for "interpolated")


class Roc:
    """Confusion counts of a verification score set at every distinct score, highest score first.

    `thresholds[i]` accepts `tp[i]` genuine and `fp[i]` impostor pairs (those with score >= it).
    """

    def __init__(self, genuine, impostor):
        genuine, impostor = _scores("genuine", genuine), _scores("impostor", impostor)
        common = np.result_type(genuine, impostor)  # float32 scores stay float32: a faster sort
        genuine, impostor = genuine.astype(common, copy=False), impostor.astype(common, copy=False)
        self.n_genuine, self.n_impostor = genuine.size, impostor.size
        imp_values, imp_counts = _distinct(np.sort(impostor))
        gen_values, gen_counts = _distinct(np.sort(genuine))
        # Merge the genuine values into the (large) impostor ones without sorting everything again.
        at = np.searchsorted(imp_values, gen_values)
        new = (at == imp_values.size) | (imp_values[np.minimum(at, imp_values.size - 1)] != gen_values)
        values = np.insert(imp_values, at[new], gen_values[new])
        fp_counts = np.insert(imp_counts, at[new], 0)
        tp_counts = np.zeros(values.size, np.int64)
        tp_counts[np.searchsorted(values, gen_values)] = gen_counts
        self.thresholds = values[::-1]
        self.tp = np.cumsum(tp_counts[::-1])
        self.fp = np.cumsum(fp_counts[::-1])

    @classmethod
    def from_labels(cls, scores, labels) -> "Roc":
        """From one score per pair and its label (true / 1 = genuine)."""
        scores = np.asarray(scores).ravel()
        labels = np.asarray(labels).ravel()
        if scores.shape != labels.shape:
            raise DataFormatError(f"scores: {scores.size} scores but {labels.size} labels")
        genuine = labels.astype(bool)
        return cls(scores[genuine], scores[~genuine])

    def curve(self, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fpr, tpr, thresholds) exactly as sklearn.metrics.roc_curve returns them (first point (0, 0) at inf)."""
        tp, fp, thresholds = self.tp, self.fp, self.thresholds
        if drop_intermediate and fp.size > 2:
            corner = np.flatnonzero(np.concatenate([[True], (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0), [True]]))
            tp, fp, thresholds = tp[corner], fp[corner], thresholds[corner]
        fpr = np.concatenate([[0], fp]) / self.n_impostor
        tpr = np.concatenate([[0], tp]) / self.n_genuine
        return fpr, tpr, np.concatenate([[np.inf], thresholds.astype(np.float64)])

    def tar_at_far(self, far_targets=FAR_TARGETS, mode: str = DEFAULT_TAR_MODE, *,
                   nan_unresolved: bool = True) -> TarAtFar:
        """TAR at each target FAR, read the way `mode` names (see the module docstring)."""
        if mode not in TAR_MODES:
            raise DataFormatError(f"mode: {mode!r} is not one of {', '.join(TAR_MODES)}")
        targets = np.asarray(far_targets, dtype=np.float64).ravel()
        if mode in ("insightface", "ijb_evals"):
            fpr, tpr, thresholds = self.curve(drop_intermediate=True)
            if mode == "insightface":
                fpr, tpr, thresholds = fpr[::-1], tpr[::-1], thresholds[::-1]
            at = np.array([np.argmin(np.abs(fpr - f)) for f in targets], dtype=np.int64)
            return TarAtFar(mode, targets, tpr[at], fpr[at], thresholds[at])
        # The exact modes read the full curve (every distinct score) with the (0, 0) point in front.
        fpr = np.concatenate([[0], self.fp]) / self.n_impostor
        tpr = np.concatenate([[0], self.tp]) / self.n_genuine
        if mode == "conservative":
            at = np.searchsorted(fpr, targets, side="right") - 1  # last point with FAR <= target
            thresholds = np.concatenate([[np.inf], self.thresholds.astype(np.float64)])
            tar, far, threshold = tpr[at], fpr[at], thresholds[at]
        else:
            top = np.flatnonzero(np.concatenate([fpr[1:] != fpr[:-1], [True]]))  # best TAR per FPR
            tar, far, threshold = np.interp(targets, fpr[top], tpr[top]), targets.copy(), np.full(targets.size, np.nan)
        if nan_unresolved:
            for a in (tar, far, threshold):
                a[targets < 1.0 / self.n_impostor] = np.nan
        return TarAtFar(mode, targets, tar, far, threshold)


def tar_at_far(genuine, impostor, far_targets=FAR_TARGETS, mode: str = DEFAULT_TAR_MODE, *,
               nan_unresolved: bool = True) -> TarAtFar:
    """TAR at each target FAR; build a `Roc` once instead when reading several modes."""
    return Roc(genuine, impostor).tar_at_far(far_targets, mode, nan_unresolved=nan_unresolved)


def _scores(name: str, scores) -> np.ndarray:
    scores = np.asarray(scores).ravel()
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if scores.size == 0:
        raise DataFormatError(f"{name}: no scores")
    if not np.all(np.isfinite(scores)):
        raise DataFormatError(f"{name}: {int(np.sum(~np.isfinite(scores)))} scores are NaN or Inf")
    return scores


def _distinct(sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a sorted array and how often each occurs."""
    start = np.flatnonzero(np.concatenate([[True], sorted_scores[1:] != sorted_scores[:-1]]))
    return sorted_scores[start], np.diff(np.append(start, sorted_scores.size))

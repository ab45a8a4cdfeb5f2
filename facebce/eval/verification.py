"""Pair-verification metrics at one global threshold (docs/metrics.md §3).

Accept a pair as "same" iff its cosine score is strictly greater than the threshold. The best
threshold is found exactly by a sort-based sweep over midpoints of consecutive distinct scores
(no grid); on ties the lowest threshold wins.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facebce.errors import DataFormatError


@dataclass(frozen=True)
class ThresholdResult:
    threshold: float
    accuracy: float
    tar: float  # true-accept rate on genuine pairs
    far: float  # false-accept rate on impostor pairs


def _check(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    issame = np.asarray(issame, dtype=bool).ravel()
    if scores.shape != issame.shape:
        raise DataFormatError(f"scores: {scores.size} scores but {issame.size} labels")
    if scores.size == 0:
        raise DataFormatError("scores: no pairs to evaluate")
    if not np.all(np.isfinite(scores)):
        raise DataFormatError(f"scores: {int(np.sum(~np.isfinite(scores)))} scores are NaN or Inf")
    return scores, issame


def accuracy_at_threshold(scores, issame, threshold: float) -> ThresholdResult:
    """Accuracy, TAR and FAR when every pair is judged by `score > threshold`."""
    scores, issame = _check(scores, issame)
    accept = scores > threshold
    n_pos, n_neg = int(issame.sum()), int((~issame).sum())
    tp = int(np.sum(accept & issame))
    fp = int(np.sum(accept & ~issame))
    return ThresholdResult(
        threshold=float(threshold),
        accuracy=(tp + n_neg - fp) / scores.size,
        tar=tp / n_pos if n_pos else float("nan"),
        far=fp / n_neg if n_neg else float("nan"),
    )


def best_threshold(scores, issame) -> ThresholdResult:
    """The single threshold that maximises accuracy on these pairs (exact, O(n log n))."""
    scores, issame = _check(scores, issame)
    values, correct = correct_per_cut(scores, issame)
    k = int(np.argmax(correct))  # first maximum = lowest threshold
    return accuracy_at_threshold(scores, issame, cut_threshold(values, k))


def correct_per_cut(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct scores (ascending) and, for every cut k = 0..len(values), the number of correct
    decisions when values[:k] are rejected and values[k:] accepted.

    Cut k is every threshold strictly between values[k-1] and values[k]; shared by the exact
    sweeps of this package (10-fold `exact` mode, class-wise thresholds).
    """
    values, inverse = np.unique(scores, return_inverse=True)
    pos = np.bincount(inverse, weights=positive, minlength=values.size)
    neg = np.bincount(inverse, weights=~positive, minlength=values.size)
    tn = np.concatenate([[0.0], np.cumsum(neg)])
    tp = pos.sum() - np.concatenate([[0.0], np.cumsum(pos)])
    return values, tp + tn


def cut_threshold(values: np.ndarray, k: int) -> float:
    """A threshold t for which `score > t` accepts exactly values[k:] (the midpoint where it can)."""
    if k == 0:
        return float(np.nextafter(values[0], -np.inf))
    if k == values.size:
        return float(values[-1])
    threshold = float((values[k - 1] + values[k]) / 2)
    if threshold >= values[k]:  # adjacent floats: the midpoint rounded up
        threshold = float(values[k - 1])
    return threshold

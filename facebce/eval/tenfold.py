"""LFW-style 10-fold verification, the numbers insightface's eval/verification.py prints (docs/metrics.md §2).

Same folds (contiguous, the first P mod 10 one pair longer), same grids, strict `dist < thr`, first
argmax, population std: identical floats. What differs is speed: each pair is binned once against the
grid and cumulative counts give every threshold's confusion counts for every fold, instead of one
boolean pass per threshold. One deviation, as docs/metrics.md §2.7 rules: VAL@FAR interpolates with
`np.interp` after keeping the first (smallest) threshold of each distinct train FAR, where the
original's `interp1d(kind='slinear')` raises on the duplicate FARs on SciPy >= 1.9.

`exact=True` picks each fold's threshold from every distinct train distance (midpoints, the smallest
threshold on ties) instead of the 0.01 grid; it can differ from insightface by construction. It only
changes the accuracy; ROC and VAL stay on their grids.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facebce.errors import DataFormatError
from facebce.eval.verification import correct_per_cut, cut_threshold

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)  # insightface evaluate(): 400 squared-distance thresholds
VAL_THRESHOLDS = np.arange(0, 4, 0.001)  # 4000, for VAL@FAR
VAL_FAR_TARGET = 1e-3


@dataclass(frozen=True)
class TenFoldResult:
    accuracy: float  # mean of the fold test accuracies
    std: float  # population std (ddof 0) of the fold test accuracies
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray  # squared-distance threshold chosen on each fold's train part
    tpr: np.ndarray  # ROC on ACCURACY_THRESHOLDS, averaged over the test folds
    fpr: np.ndarray
    val: float  # VAL@FAR: mean over folds of the test TAR at the train threshold for far_target
    val_std: float
    far: float  # mean test FAR at those thresholds
    exact: bool

    def __str__(self) -> str:
        return f"{self.accuracy:1.5f}+-{self.std:1.5f}"  # insightface's "Accuracy-Flip" format


def fold_bounds(n_pairs: int, n_folds: int = 10) -> np.ndarray:
    """Fold edges of scikit-learn's KFold(n_folds, shuffle=False): fold f is pairs[b[f]:b[f+1]]."""
    sizes = np.full(n_folds, n_pairs // n_folds)
    sizes[: n_pairs % n_folds] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def pair_distances(embeddings1, embeddings2) -> np.ndarray:
    """Squared L2 distance of each row pair, computed in float64 as insightface does."""
    e1 = np.asarray(embeddings1, dtype=np.float64)
    e2 = np.asarray(embeddings2, dtype=np.float64)
    if e1.ndim != 2 or e1.shape != e2.shape:
        raise DataFormatError(f"embeddings: need two equal 2-D arrays, got shapes {e1.shape} and {e2.shape}")
    return np.sum(np.square(np.subtract(e1, e2)), 1)


def ten_fold(embeddings1, embeddings2, issame, *, n_folds: int = 10, exact: bool = False,
             far_target: float = VAL_FAR_TARGET) -> TenFoldResult:
    """10-fold accuracy, ROC and VAL@FAR of L2-normalised pair embeddings (rows of embeddings1 vs embeddings2)."""
    return ten_fold_from_distances(pair_distances(embeddings1, embeddings2), issame,
                                   n_folds=n_folds, exact=exact, far_target=far_target)


def ten_fold_from_distances(distances, issame, *, n_folds: int = 10, exact: bool = False,
                            far_target: float = VAL_FAR_TARGET) -> TenFoldResult:
    """As `ten_fold`, from squared distances (a pair is predicted "same" iff distance < threshold)."""
    dist = np.asarray(distances, dtype=np.float64).ravel()
    same = np.asarray(issame, dtype=bool).ravel()
    if dist.shape != same.shape:
        raise DataFormatError(f"distances: {dist.size} distances but {same.size} labels")
    if n_folds < 1 or dist.size < n_folds:
        raise DataFormatError(f"distances: {dist.size} pairs cannot make {n_folds} folds")
    if not np.all(np.isfinite(dist)):
        raise DataFormatError(f"distances: {int(np.sum(~np.isfinite(dist)))} distances are NaN or Inf")
    bounds = fold_bounds(dist.size, n_folds)
    size = np.diff(bounds)
    fold = np.repeat(np.arange(n_folds), size)

    # Test-fold confusion counts at every grid threshold; train counts are all-pairs minus test.
    tp, fp = _accepted_per_fold(dist, same, fold, n_folds, ACCURACY_THRESHOLDS)
    n_same = np.bincount(fold, weights=same, minlength=n_folds).astype(np.int64)
    n_diff = size - n_same
    with np.errstate(invalid="ignore", divide="ignore"):
        tprs = np.where(n_same[:, None] > 0, tp / n_same[:, None], 0.0)
        fprs = np.where(n_diff[:, None] > 0, fp / n_diff[:, None], 0.0)

    if exact:
        thresholds = np.array([_exact_threshold(*_train_part(dist, same, bounds, f)) for f in range(n_folds)])
        accept = dist < thresholds[fold]
        accuracy = np.bincount(fold, weights=accept == same, minlength=n_folds) / size
    else:
        tn = n_diff[:, None] - fp
        best = np.argmax(_train(tp) + _train(tn), axis=1)  # first max = smallest threshold
        rows = np.arange(n_folds)
        accuracy = (tp[rows, best] + tn[rows, best]) / size
        thresholds = ACCURACY_THRESHOLDS[best]

    val, far = _val_far(dist, same, fold, bounds, n_same, n_diff, far_target)
    return TenFoldResult(
        accuracy=float(np.mean(accuracy)), std=float(np.std(accuracy)),
        fold_accuracies=accuracy, fold_thresholds=thresholds,
        tpr=np.mean(tprs, 0), fpr=np.mean(fprs, 0),
        val=float(np.mean(val)), val_std=float(np.std(val)), far=float(np.mean(far)), exact=exact,
    )


def _train(per_fold: np.ndarray) -> np.ndarray:
    """Per-fold counts -> the same counts over each fold's train part (all folds but it).

    One fold trains and tests on all pairs, as insightface's LFold(n_splits=1) does.
    """
    return per_fold.sum(0) - per_fold if per_fold.shape[0] > 1 else per_fold


def _train_part(dist, same, bounds, f) -> tuple[np.ndarray, np.ndarray]:
    if bounds.size == 2:
        return dist, same
    test = slice(bounds[f], bounds[f + 1])
    return np.delete(dist, test), np.delete(same, test)


def _accepted_per_fold(dist, same, fold, n_folds, grid) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp), each (n_folds, len(grid)): pairs of each fold with `dist < grid[j]`, same / different."""
    first = np.searchsorted(grid, dist, side="right")  # dist < grid[j]  <=>  j >= first
    slots = grid.size + 1
    cell = (fold * 2 + same) * slots + first
    hist = np.bincount(cell, minlength=n_folds * 2 * slots).reshape(n_folds, 2, slots)
    accepted = np.cumsum(hist, axis=2)[:, :, :-1]
    return accepted[:, 1], accepted[:, 0]


def _exact_threshold(dist: np.ndarray, same: np.ndarray) -> float:
    """Best train threshold over every distinct distance; the smallest one on ties (insightface's rule)."""
    # On s = -dist, "dist < thr" is "s > -thr": the shared sweep; the last best cut accepts the fewest.
    values, correct = correct_per_cut(-dist, same)
    k = correct.size - 1 - int(np.argmax(correct[::-1]))
    return -cut_threshold(values, k)


def _val_far(dist, same, fold, bounds, n_same, n_diff, far_target) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold VAL and FAR (docs/metrics.md §2.7); NaN for a fold with no same or no different test pair."""
    _, fp = _accepted_per_fold(dist, same, fold, bounds.size - 1, VAL_THRESHOLDS)
    with np.errstate(invalid="ignore", divide="ignore"):
        far_train = _train(fp) / _train(n_diff)[:, None]
    val = np.empty(bounds.size - 1)
    far = np.empty(bounds.size - 1)
    for f in range(bounds.size - 1):
        if np.max(far_train[f]) >= far_target:
            fars, first = np.unique(far_train[f], return_index=True)  # first = smallest threshold per FAR
            threshold = np.interp(far_target, fars, VAL_THRESHOLDS[first])
        else:
            threshold = 0.0
        test = slice(bounds[f], bounds[f + 1])
        accept = dist[test] < threshold
        with np.errstate(invalid="ignore", divide="ignore"):
            val[f] = np.sum(accept & same[test]) / n_same[f]
            far[f] = np.sum(accept & ~same[test]) / n_diff[f]
    return val, far

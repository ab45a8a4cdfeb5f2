"""LFW-style 10-fold verification, the numbers insightface's eval/verification.py prints (docs/metrics.md §2).

Same folds (contiguous, the first P mod 10 one pair longer), same grids, strict `dist < thr`, first
argmax, population std: identical floats. What differs is speed: each pair is binned once against the
grid and cumulative counts give every threshold's confusion counts for every fold, instead of one
boolean pass per threshold.

VAL@FAR: two rules, both reported. The train FAR of a fold is a step function of the threshold, so
"the threshold where train FAR = 1e-3" must be read off flat runs of equal FARs. insightface's
verification.py calls `interp1d(far_train, thresholds, kind='slinear')` on them: SciPy >= 1.9 refuses
the duplicate FARs (ValueError), and older SciPy (a linear B-spline over the duplicated points, after
a stable sort) interpolates between the *last* threshold whose train FAR is <= the target and the
first threshold above it — that is the number verification.py prints and papers quote, and it is
reported here as `parity` ("VAL@FAR (insightface rule)"), equal to that code's output.

facebce's own number (`val`, docs/metrics.md §2.7) keeps the *first* (smallest) threshold of each distinct
train FAR and interpolates with `np.interp`: the FAR curve read at the threshold where each FAR level
is first reached. The two agree up to the width of one flat run. They split on small sets, where one
false accept on the train folds is already above the target (600 pairs: 1 of 270 impostors =
3.7e-3 > 1e-3): there the train data cannot resolve FAR 1e-3 at all; insightface's rule then takes
the widest threshold that still had zero train false accepts, so its VAL is what that plateau's edge
happens to accept (on test folds with ~30 impostors it measures nothing at 1e-3), while facebce's rule
stays near threshold 0 and reports VAL ~ 0, the conservative reading of a target the data cannot
support. That is why facebce keeps its rule as the headline; `parity` is there so a table compares.

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
class ValParity:
    """VAL@FAR by insightface verification.py's rule (see the module docstring): mean and population
    std over folds of the test TAR, and the mean test FAR, at each fold's train threshold."""

    rule: str  # "insightface"
    val: float
    val_std: float
    far: float


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
    parity: ValParity | None = None  # VAL@FAR by insightface's rule (the number verification.py prints)

    def __str__(self) -> str:
        return f"{self.accuracy:1.5f}+-{self.std:1.5f}"  # insightface's "Accuracy-Flip" format


def check_fold_count(n_pairs: int, n_folds: int, where: str) -> None:
    """One DataFormatError line naming the set when it has too few pairs for `n_folds` folds."""
    if n_pairs < n_folds:
        raise DataFormatError(f"{where}: {n_pairs} pairs, but {n_folds}-fold verification needs at least "
                              f"{n_folds} pairs (one per fold; a few hundred for a meaningful accuracy)")


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

    (val, far), (val_if, far_if) = _val_far(dist, same, fold, bounds, n_same, n_diff, far_target)
    return TenFoldResult(
        accuracy=float(np.mean(accuracy)), std=float(np.std(accuracy)),
        fold_accuracies=accuracy, fold_thresholds=thresholds,
        tpr=np.mean(tprs, 0), fpr=np.mean(fprs, 0),
        val=float(np.mean(val)), val_std=float(np.std(val)), far=float(np.mean(far)), exact=exact,
        parity=ValParity("insightface", float(np.mean(val_if)), float(np.std(val_if)), float(np.mean(far_if))),
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


def _val_far(dist, same, fold, bounds, n_same, n_diff, far_target):
    """Per-fold (VAL, FAR) by facebce's rule (docs/metrics.md §2.7) and by insightface's (`parity`); NaN for a
    fold with no same or no different test pair."""
    _, fp = _accepted_per_fold(dist, same, fold, bounds.size - 1, VAL_THRESHOLDS)
    with np.errstate(invalid="ignore", divide="ignore"):
        far_train = _train(fp) / _train(n_diff)[:, None]
    n = bounds.size - 1
    val, far, val_if, far_if = (np.empty(n) for _ in range(4))
    for f in range(n):
        ours = theirs = 0.0
        if np.max(far_train[f]) >= far_target:
            fars, first = np.unique(far_train[f], return_index=True)  # first = smallest threshold per FAR
            ours = np.interp(far_target, fars, VAL_THRESHOLDS[first])
            theirs = _insightface_threshold(far_train[f], far_target)
        test = slice(bounds[f], bounds[f + 1])
        for threshold, v, r in ((ours, val, far), (theirs, val_if, far_if)):
            accept = dist[test] < threshold
            with np.errstate(invalid="ignore", divide="ignore"):
                v[f] = np.sum(accept & same[test]) / n_same[f]
                r[f] = np.sum(accept & ~same[test]) / n_diff[f]
    return (val, far), (val_if, far_if)


def _insightface_threshold(far_train: np.ndarray, far_target: float) -> float:
    """What verification.py's `interp1d(far_train, thresholds, kind='slinear')(far_target)` returned on
    SciPy < 1.9 (a linear B-spline with knots [x0, x0..xn, xn] and coefficients y, after a stable sort of
    the already non-decreasing FARs): linear between the last threshold whose FAR <= the target and
    the next one; the last threshold when the target is the curve's last FAR."""
    i = int(np.searchsorted(far_train, far_target, side="right")) - 1  # far_train[0] = 0 <= target: i >= 0
    if i >= far_train.size - 1:
        return float(VAL_THRESHOLDS[-1])
    x0, x1 = far_train[i], far_train[i + 1]
    y0, y1 = VAL_THRESHOLDS[i], VAL_THRESHOLDS[i + 1]
    w = 1.0 / (x1 - x0)  # the B-spline's two basis weights, computed as SciPy's de Boor loop does
    return float(y0 * (w * (x1 - far_target)) + y1 * (w * (far_target - x0)))

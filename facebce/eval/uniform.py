"""Uniform classification metrics of the BCE paper (docs/metrics.md §1) on a bias-free score matrix.

A score matrix S (n samples x N classes, numpy or torch) and labels y give per sample the positive
score p_i = S[i, y_i] and the hardest negative q_i = max_{j != y_i} S[i, j]. Sample-wise accuracy
lets each sample use its own threshold; uniform accuracy asks for one threshold t for all of them
(q_i < t < p_i); class-wise accuracy allows one threshold per class. `uniform_section` gathers
them into the report's uniform-classification section (used by evaluation and the training callback).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facebce.errors import DataFormatError
from facebce.eval.verification import correct_per_cut

_ROWS = 4096  # rows per block when a full n x N temporary would be large


@dataclass(frozen=True)
class UniformResult:
    accuracy: float  # Acc_Uni = max_t mean_i [q_i < t < p_i]
    threshold: float  # t*: midpoint of `segment` (NaN when no sample is sample-wise correct)
    segment: tuple[float, float]  # the lowest open interval of thresholds reaching `accuracy`
    n_correct: int


@dataclass(frozen=True)
class UniformSection:
    """Uniform classification (BCE paper, docs/metrics.md §1) of a classifier's bias-free score matrix."""

    sample_wise: float
    uniform: UniformResult  # Acc_Uni, t*, its segment
    bias: float | None  # the learned threshold (b or b/γ), when given
    gap: float | None  # bias - t*
    class_wise_opt: float | None = None  # Acc_CW_opt: per-class thresholds optimised from t*
    class_wise_learned: float | None = None  # Acc_CW at the head's learned per-class thresholds, if any
    name: str | None = None  # the classification set it was computed on (None: a given score matrix)
    path: str | None = None
    n_samples: int | None = None
    num_classes: int | None = None


@dataclass(frozen=True)
class ClassWiseResult:
    accuracy: float
    thresholds: np.ndarray  # one per class: class j accepts iff S[i, j] > thresholds[j]
    passes: int  # full coordinate-ascent passes run (0 when the thresholds were given)


def positive_and_hardest_negative(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(p, q): each sample's own-class score and its highest other-class score (-inf when N = 1)."""
    scores, labels = _check(scores, labels)
    rows = np.arange(labels.size)
    p = scores[rows, labels].astype(np.float64)
    q = np.empty(labels.size)
    for s in range(0, labels.size, _ROWS):
        block = scores[s:s + _ROWS].astype(np.float64)  # a copy: the positive is masked out below
        block[np.arange(block.shape[0]), labels[s:s + _ROWS]] = -np.inf
        q[s:s + _ROWS] = block.max(axis=1)
    return p, q


def sample_wise_accuracy(scores, labels) -> float:
    """Acc_SW = mean(p_i > q_i): strict, so a tie with a negative is an error."""
    p, q = positive_and_hardest_negative(scores, labels)
    return float(np.mean(p > q))


def uniform_accuracy(scores, labels) -> UniformResult:
    """Acc_Uni and t*, exactly: a sweep over the endpoints of the intervals (q_i, p_i), no grid."""
    return uniform_accuracy_from_margins(*positive_and_hardest_negative(scores, labels))


def uniform_accuracy_from_margins(p, q) -> UniformResult:
    """As `uniform_accuracy`, from the positive scores p and hardest negatives q."""
    p, q = np.asarray(p, dtype=np.float64).ravel(), np.asarray(q, dtype=np.float64).ravel()
    correct = p > q
    if not correct.any():
        return UniformResult(0.0, float("nan"), (float("nan"), float("nan")), 0)
    ends = np.concatenate([q[correct], p[correct]])
    step = np.concatenate([np.ones(correct.sum(), np.int64), -np.ones(correct.sum(), np.int64)])
    order = np.lexsort((step, ends))  # at equal values closing ends (p, -1) come before opening ones
    ends, inside = ends[order], np.cumsum(step[order])
    # After the last event at a value, `inside` counts the intervals covering the open segment up to the next value.
    segment_count = np.where(ends[:-1] < ends[1:], inside[:-1], -1)
    k = int(np.argmax(segment_count))  # first maximum = lowest segment
    lo, hi = float(ends[k]), float(ends[k + 1])
    return UniformResult(float(segment_count[k] / p.size), (lo + hi) / 2, (lo, hi), int(segment_count[k]))


def uniform_accuracy_curve(scores, labels, thresholds) -> np.ndarray:
    """Acc_Uni(t) at each given t (for plots; use `uniform_accuracy` for t*)."""
    p, q = positive_and_hardest_negative(scores, labels)
    t = np.asarray(thresholds, dtype=np.float64)
    correct = p > q
    # For q < p: q < t < p  <=>  (t < p) and not (t <= q), and t <= q implies t < p.
    above = correct.sum() - np.searchsorted(np.sort(p[correct]), t, side="right")
    below_q = correct.sum() - np.searchsorted(np.sort(q[correct]), t, side="left")
    return (above - below_q) / p.size


def class_wise_accuracy(scores, labels, thresholds) -> ClassWiseResult:
    """Acc_CW at given per-class thresholds τ: correct iff p_i > τ_{y_i} and S[i, j] < τ_j for all j != y_i."""
    scores, labels = _check(scores, labels)
    tau = np.asarray(thresholds, dtype=np.float64).ravel()
    if tau.size != scores.shape[1]:
        raise DataFormatError(f"thresholds: {tau.size} thresholds for {scores.shape[1]} classes")
    return ClassWiseResult(float(np.mean(_violations(scores, labels, tau) == 0)), tau, 0)


def class_wise_accuracy_opt(scores, labels, max_passes: int = 10, start=None) -> ClassWiseResult:
    """Acc_CW_opt: coordinate ascent on per-class thresholds from τ_j = t* (a lower bound of the optimum).

    Each step gives one class the best threshold for its column with the others fixed (midpoint of the
    lowest best segment), and only when that raises the count; it stops after a pass that gains
    nothing, or `max_passes`. Starting from t* it is >= Acc_Uni. With no sample-wise correct sample
    (t* undefined) it starts from 0 unless `start` (a scalar or one threshold per class) is given.
    """
    scores, labels = _check(scores, labels)
    n, n_classes = scores.shape
    if start is None:
        t_star = uniform_accuracy(scores, labels).threshold
        start = 0.0 if np.isnan(t_star) else t_star
    tau = np.broadcast_to(np.asarray(start, dtype=np.float64), (n_classes,)).copy()
    violations = _violations(scores, labels, tau)
    passes = 0
    for passes in range(1, max_passes + 1):
        gained = False
        for j in range(n_classes):
            column, own = scores[:, j], labels == j
            wrong_here = np.where(own, column <= tau[j], column >= tau[j])
            free = violations == wrong_here  # no violation outside column j: τ_j decides these samples
            now = int(np.sum(free & ~wrong_here))
            values, correct = correct_per_cut(column[free].astype(np.float64), own[free])
            if values.size == 0 or correct.max() <= now:
                continue
            t = np.float64(_segment_threshold(values, int(np.argmax(correct))))  # not rounded to float32 scores
            wrong_new = np.where(own, column <= t, column >= t)
            if np.sum(free & ~wrong_new) > now:  # guards adjacent floats, where no midpoint exists
                tau[j] = t
                violations += wrong_new.astype(np.int64) - wrong_here
                gained = True
        if not gained:
            break
    return ClassWiseResult(float(np.mean(violations == 0)), tau, passes)


def uniform_section(scores, labels, *, bias: float | None = None, class_thresholds=None,
                    **where) -> UniformSection:
    """SW accuracy, Acc_Uni with t*, Acc_CW_opt (and Acc_CW at learned per-class thresholds when
    given), and the gap between a learned bias and t* (docs/metrics.md §1). `where`: name, path, ... ."""
    result = uniform_accuracy(scores, labels)
    gap = bias_gap(bias, result.threshold) if bias is not None else None
    learned = class_wise_accuracy(scores, labels, class_thresholds).accuracy if class_thresholds is not None else None
    return UniformSection(sample_wise_accuracy(scores, labels), result, bias, gap,
                          class_wise_opt=class_wise_accuracy_opt(scores, labels).accuracy,
                          class_wise_learned=learned, **where)


def bias_gap(bias, t_star: float, gamma: float | None = None):
    """b - t* (linear heads) or b/γ - t* (normalised heads, t* on cosines); the paper's claim is |gap| <= ~0.05."""
    b = np.asarray(bias, dtype=np.float64)
    gap = (b if gamma is None else b / gamma) - t_star
    return float(gap) if gap.ndim == 0 else gap


def _segment_threshold(values: np.ndarray, k: int) -> float:
    """A threshold inside cut k's open segment (values[k-1], values[k]), strict on both sides."""
    if k == 0:
        return float(np.nextafter(values[0], -np.inf))
    if k == values.size:
        return float(np.nextafter(values[-1], np.inf))
    return float((values[k - 1] + values[k]) / 2)


def _violations(scores: np.ndarray, labels: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Per sample, how many class-wise conditions fail at thresholds τ (0 = class-wise correct)."""
    out = np.empty(labels.size, np.int64)
    for s in range(0, labels.size, _ROWS):
        block, y = scores[s:s + _ROWS], labels[s:s + _ROWS]
        rows = np.arange(block.shape[0])
        fails = block >= tau  # a negative at or above its class threshold
        fails[rows, y] = block[rows, y] <= tau[y]  # the positive at or below its own
        out[s:s + _ROWS] = fails.sum(axis=1)
    return out


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(scores, "detach"):  # a torch tensor; no torch import needed
        scores = scores.detach().cpu().numpy()
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    labels = np.asarray(labels).ravel()
    if scores.ndim != 2:
        raise DataFormatError(f"scores: need an n x N matrix, got shape {scores.shape}")
    if labels.size != scores.shape[0]:
        raise DataFormatError(f"labels: {labels.size} labels for {scores.shape[0]} score rows")
    if labels.size == 0:
        raise DataFormatError("scores: no samples")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise DataFormatError(f"labels: need integer class indices in [0, {scores.shape[1]}), "
                              f"got {labels.dtype} in [{labels.min()}, {labels.max()}]")
    if not np.all(np.isfinite(scores)):
        raise DataFormatError(f"scores: {int(np.sum(~np.isfinite(scores)))} scores are NaN or Inf")
    return scores, labels

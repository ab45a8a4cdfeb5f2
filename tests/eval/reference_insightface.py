"""Test-only reference: insightface's 10-fold loops, transcribed line by line (slow, float64).

From deepinsight/insightface recognition/arcface_torch/eval/verification.py (MIT License,
Copyright (c) 2016 David Sandberg; adapted by the insightface authors): calculate_roc,
calculate_accuracy, calculate_val, calculate_val_far, LFold and evaluate, without the PCA branch and the
mxnet/torch model code. One change, marked below: interp1d(kind='slinear') raises on the duplicate
FAR values every real curve has (SciPy >= 1.9), so the FAR -> threshold curve keeps the first
threshold of each distinct FAR (docs/metrics.md §2.7) and is read with np.interp, or with the original
interp1d when `scipy_interp=True` (same numbers on de-duplicated points).
"""
import numpy as np
from scipy import interpolate
from sklearn.model_selection import KFold


class LFold:
    def __init__(self, n_splits=2, shuffle=False):
        self.n_splits = n_splits
        if self.n_splits > 1:
            self.k_fold = KFold(n_splits=n_splits, shuffle=shuffle)

    def split(self, indices):
        if self.n_splits > 1:
            return self.k_fold.split(indices)
        else:
            return [(indices, indices)]


def calculate_accuracy(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    fp = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict_issame), actual_issame))
    tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
    fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
    acc = float(tp + tn) / dist.size
    return tpr, fpr, acc


def calculate_roc(thresholds, dist, actual_issame, nrof_folds=10):
    nrof_pairs = len(actual_issame)
    nrof_thresholds = len(thresholds)
    k_fold = LFold(n_splits=nrof_folds, shuffle=False)
    tprs = np.zeros((nrof_folds, nrof_thresholds))
    fprs = np.zeros((nrof_folds, nrof_thresholds))
    accuracy = np.zeros((nrof_folds))
    best_thresholds = np.zeros((nrof_folds))
    indices = np.arange(nrof_pairs)
    for fold_idx, (train_set, test_set) in enumerate(k_fold.split(indices)):
        acc_train = np.zeros((nrof_thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, _, acc_train[threshold_idx] = calculate_accuracy(threshold, dist[train_set], actual_issame[train_set])
        best_threshold_index = np.argmax(acc_train)
        for threshold_idx, threshold in enumerate(thresholds):
            tprs[fold_idx, threshold_idx], fprs[fold_idx, threshold_idx], _ = calculate_accuracy(
                threshold, dist[test_set], actual_issame[test_set])
        _, _, accuracy[fold_idx] = calculate_accuracy(
            thresholds[best_threshold_index], dist[test_set], actual_issame[test_set])
        best_thresholds[fold_idx] = thresholds[best_threshold_index]
    tpr = np.mean(tprs, 0)
    fpr = np.mean(fprs, 0)
    return tpr, fpr, accuracy, best_thresholds


def calculate_val_far(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    true_accept = np.sum(np.logical_and(predict_issame, actual_issame))
    false_accept = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    n_same = np.sum(actual_issame)
    n_diff = np.sum(np.logical_not(actual_issame))
    val = float(true_accept) / float(n_same)
    far = float(false_accept) / float(n_diff)
    return val, far


def calculate_val(thresholds, dist, actual_issame, far_target, nrof_folds=10, scipy_interp=False, original=False):
    """`original=True`: verification.py's own interp1d on the duplicated FAR curve (SciPy < 1.9)."""
    nrof_pairs = len(actual_issame)
    nrof_thresholds = len(thresholds)
    k_fold = LFold(n_splits=nrof_folds, shuffle=False)
    val = np.zeros(nrof_folds)
    far = np.zeros(nrof_folds)
    indices = np.arange(nrof_pairs)
    for fold_idx, (train_set, test_set) in enumerate(k_fold.split(indices)):
        far_train = np.zeros(nrof_thresholds)
        for threshold_idx, threshold in enumerate(thresholds):
            _, far_train[threshold_idx] = calculate_val_far(threshold, dist[train_set], actual_issame[train_set])
        if np.max(far_train) >= far_target and original:
            threshold = interp1d_slinear_scipy_lt_1_9(far_train, thresholds, far_target)
        elif np.max(far_train) >= far_target:
            # CHANGED (docs/metrics.md §2.7): was interpolate.interp1d(far_train, thresholds, kind='slinear')
            fars, first = np.unique(far_train, return_index=True)
            if scipy_interp:
                threshold = interpolate.interp1d(fars, thresholds[first], kind='slinear')(far_target)
            else:
                threshold = np.interp(far_target, fars, thresholds[first])
        else:
            threshold = 0.0
        val[fold_idx], far[fold_idx] = calculate_val_far(threshold, dist[test_set], actual_issame[test_set])
    val_mean = np.mean(val)
    far_mean = np.mean(far)
    val_std = np.std(val)
    return val_mean, val_std, far_mean


def evaluate_distances(dist, actual_issame, nrof_folds=10, scipy_interp=False):
    """insightface evaluate() from squared distances: (tpr, fpr, accuracy, best_thresholds, val, val_std, far)."""
    actual_issame = np.asarray(actual_issame)
    thresholds = np.arange(0, 4, 0.01)
    tpr, fpr, accuracy, best = calculate_roc(thresholds, dist, actual_issame, nrof_folds=nrof_folds)
    thresholds = np.arange(0, 4, 0.001)
    val, val_std, far = calculate_val(thresholds, dist, actual_issame, 1e-3, nrof_folds=nrof_folds,
                                      scipy_interp=scipy_interp)
    return tpr, fpr, accuracy, best, val, val_std, far


def evaluate(embeddings, actual_issame, nrof_folds=10):
    """insightface evaluate(): images 2k and 2k+1 form pair k."""
    diff = np.subtract(embeddings[0::2], embeddings[1::2])
    return evaluate_distances(np.sum(np.square(diff), 1), actual_issame, nrof_folds)


def interp1d_slinear_scipy_lt_1_9(x, y, x_new):
    """What `interpolate.interp1d(x, y, kind='slinear')(x_new)` computed on SciPy < 1.9, which accepted
    duplicate x (SciPy 1.8.1 interpolate/_interpolate.py and _bsplines.py): a stable mergesort of x, then
    make_interp_spline(x, y, k=1), whose k=1 shortcut is BSpline(t=[x0, x0..xn, xn], c=y, k=1) — built
    here with SciPy's own BSpline, so the evaluation (de Boor) is SciPy's."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ind = np.argsort(x, kind="mergesort")
    x, y = x[ind], y[ind]
    if not x[0] <= x_new <= x[-1]:
        raise ValueError("A value in x_new is out of the interpolation range.")  # interp1d's bounds_error
    spline = interpolate.BSpline(np.r_[x[0], x, x[-1]], y, 1)
    return float(spline(x_new))


def calculate_val_original(thresholds, dist, actual_issame, far_target, nrof_folds=10):
    """calculate_val exactly as verification.py has it (interp1d on the raw, duplicated FAR curve),
    run with the SciPy < 1.9 interp1d above: the number verification.py prints (`parity` in facebce)."""
    return calculate_val(thresholds, dist, actual_issame, far_target, nrof_folds, original=True)

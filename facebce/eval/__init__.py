"""Evaluation: verification, identification and uniform-classification metrics (one implementation each)."""
from facebce.eval.identification import (
    CMC_RANKS, FPIR_TARGETS, IJB_EVALS_FPIR_GRID, OpenSetResult, OperatingPoint, ProbeScores, ijb_evals_mean,
    open_set_identification, operating_point, probe_scores,
)
from facebce.eval.roc import DEFAULT_TAR_MODE, FAR_TARGETS, TAR_MODES, Roc, TarAtFar, tar_at_far
from facebce.eval.tenfold import (
    ACCURACY_THRESHOLDS, VAL_FAR_TARGET, VAL_THRESHOLDS, TenFoldResult, fold_bounds, pair_distances, ten_fold,
    ten_fold_from_distances,
)
from facebce.eval.uniform import (
    ClassWiseResult, UniformResult, bias_gap, class_wise_accuracy, class_wise_accuracy_opt,
    positive_and_hardest_negative, sample_wise_accuracy, uniform_accuracy, uniform_accuracy_curve,
    uniform_accuracy_from_margins,
)
from facebce.eval.verification import ThresholdResult, accuracy_at_threshold, best_threshold

__all__ = [
    "ACCURACY_THRESHOLDS", "CMC_RANKS", "DEFAULT_TAR_MODE", "FAR_TARGETS", "FPIR_TARGETS", "IJB_EVALS_FPIR_GRID",
    "TAR_MODES", "VAL_FAR_TARGET", "VAL_THRESHOLDS",
    "ClassWiseResult", "OpenSetResult", "OperatingPoint", "ProbeScores", "Roc", "TarAtFar", "TenFoldResult",
    "ThresholdResult", "UniformResult",
    "accuracy_at_threshold", "best_threshold", "bias_gap", "class_wise_accuracy", "class_wise_accuracy_opt",
    "fold_bounds", "ijb_evals_mean", "open_set_identification", "operating_point", "pair_distances",
    "positive_and_hardest_negative", "probe_scores", "sample_wise_accuracy", "tar_at_far", "ten_fold",
    "ten_fold_from_distances",
    "uniform_accuracy", "uniform_accuracy_curve", "uniform_accuracy_from_margins",
]

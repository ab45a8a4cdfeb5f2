"""Open-set 1:N identification from a probe x gallery similarity matrix (docs/metrics.md §6).

A probe is mated when its subject has a gallery entry; its mate score is the best of those entries
and its rank is 1 + the number of other-subject entries scoring at least as high (a tie counts
against it, as in ijb_evals' strict `pos > max(neg)`). Non-mated probes are summarised by their
highest gallery score. With ijb_evals.py's conventions, the threshold for a target FPIR f is the
descending-sorted non-mated maxima at index max(int(n_non_mated * f) - 1, 0), and a mated probe is
detected and identified (TPIR, i.e. rank-1 DIR@FAR) iff it is rank 1 and its mate score > threshold.
Realised FPIR uses the same strict `>`. ijb_evals scores each gallery (G1, G2) on its own;
`ijb_evals_mean` combines them as it does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facebce.errors import DataFormatError

# ijb_evals run_model_test_1N: 100 log-spaced FPIRs in [1e-4, 1) plus 1; it shows every 25th.
IJB_EVALS_FPIR_GRID = np.array([10 ** ii for ii in np.arange(-4, 0, 4 / 100)] + [1])
FPIR_TARGETS = IJB_EVALS_FPIR_GRID[[0, 25, 50, 75]]  # ~1e-4, 1e-3, 1e-2, 1e-1, the exact floats ijb_evals uses
CMC_RANKS = (1, 5, 10)


@dataclass(frozen=True)
class OpenSetResult:
    n_mated: int
    n_non_mated: int
    cmc: dict[int, float]  # rank k -> fraction of mated probes whose mate ranks <= k
    fpir_targets: np.ndarray
    thresholds: np.ndarray  # chosen on the non-mated maxima (ijb_evals rule); NaN with no non-mated probe
    tpir: np.ndarray  # DIR@FAR: mated probes at rank 1 with mate score > threshold
    fpir: np.ndarray  # realised: non-mated probes whose highest score > threshold


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    tpir: float
    fpir: float


@dataclass(frozen=True)
class ProbeScores:
    """What every open-set number is computed from (also what score histograms show)."""

    mate_score: np.ndarray  # per mated probe
    rank: np.ndarray  # per mated probe, 1 = best
    non_mated_max: np.ndarray  # per non-mated probe


def open_set_identification(similarity, probe_ids, gallery_ids, fpir_targets=FPIR_TARGETS,
                            ranks=CMC_RANKS) -> OpenSetResult:
    """CMC at `ranks` and TPIR (rank-1 DIR) at each target FPIR, for one gallery."""
    probes = probe_scores(similarity, probe_ids, gallery_ids)
    targets = np.asarray(fpir_targets, dtype=np.float64).ravel()
    n_nm = probes.non_mated_max.size
    if n_nm:
        ordered = np.sort(probes.non_mated_max)[::-1]
        thresholds = ordered[np.maximum((n_nm * targets).astype(np.int64) - 1, 0)]
    else:
        thresholds = np.full(targets.size, np.nan)
    points = [_operating_point(probes, t) for t in thresholds]
    with np.errstate(invalid="ignore", divide="ignore"):
        cmc = {int(k): float(np.sum(probes.rank <= k) / probes.rank.size) for k in ranks}
    return OpenSetResult(
        n_mated=probes.rank.size, n_non_mated=n_nm, cmc=cmc, fpir_targets=targets, thresholds=thresholds,
        tpir=np.array([p.tpir for p in points]), fpir=np.array([p.fpir for p in points]),
    )


def operating_point(similarity, probe_ids, gallery_ids, threshold: float) -> OperatingPoint:
    """TPIR and FPIR at one given (global) threshold, accept iff score > threshold."""
    return _operating_point(probe_scores(similarity, probe_ids, gallery_ids), float(threshold))


def ijb_evals_mean(per_gallery: list[OpenSetResult]) -> tuple[dict[int, float], np.ndarray]:
    """ijb_evals' combined numbers over galleries that share one probe set (IJB-C G1 + G2):
    CMC = summed top-k counts over all probes (each probe is mated in at most one gallery),
    TPIR = the plain mean of the galleries' TPIRs."""
    n_probes = per_gallery[0].n_mated + per_gallery[0].n_non_mated
    cmc = {k: sum(r.cmc[k] * r.n_mated for r in per_gallery if r.n_mated) / n_probes for k in per_gallery[0].cmc}
    return cmc, np.mean([r.tpir for r in per_gallery], axis=0)


def _operating_point(probes: ProbeScores, threshold: float) -> OperatingPoint:
    with np.errstate(invalid="ignore", divide="ignore"):
        tpir = np.sum((probes.rank == 1) & (probes.mate_score > threshold)) / probes.rank.size
        fpir = np.sum(probes.non_mated_max > threshold) / probes.non_mated_max.size
    return OperatingPoint(float(threshold), float(tpir), float(fpir))


def probe_scores(similarity, probe_ids, gallery_ids) -> ProbeScores:
    """Per mated probe its mate score and rank; per non-mated probe its highest gallery score."""
    sim = np.asarray(similarity, dtype=np.float64)
    probe_ids, gallery_ids = np.asarray(probe_ids).ravel(), np.asarray(gallery_ids).ravel()
    if sim.ndim != 2 or sim.shape != (probe_ids.size, gallery_ids.size):
        raise DataFormatError(f"similarity: shape {sim.shape} does not match {probe_ids.size} probe ids "
                              f"x {gallery_ids.size} gallery ids")
    if gallery_ids.size == 0:
        raise DataFormatError("gallery_ids: empty gallery")
    if not np.all(np.isfinite(sim)):
        raise DataFormatError(f"similarity: {int(np.sum(~np.isfinite(sim)))} scores are NaN or Inf")
    mate = probe_ids[:, None] == gallery_ids[None, :]
    mated = mate.any(axis=1)
    mate_score = np.where(mate, sim, -np.inf).max(axis=1)[mated]
    rank = 1 + np.sum(~mate[mated] & (sim[mated] >= mate_score[:, None]), axis=1)
    return ProbeScores(mate_score, rank, sim[~mated].max(axis=1))

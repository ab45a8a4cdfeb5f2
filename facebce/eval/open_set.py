"""Open-set 1:N identification on a labelled image folder, split into a gallery and probes.

A seeded `unknown_fraction` of the identities is never enrolled, so all their images are non-mated
probes; every other identity enrols its first `enrol_per_identity` images (sorted file order) and
probes with the rest. Probes are scored against the gallery by cosine, and every number comes
from facebce.eval.identification (docs/metrics.md §6): CMC, DIR@FPIR (rank-1 detection-and-identification
rate at a false-positive identification rate, the `tpir` of OpenSetResult) with its threshold, and
DIR/FPIR at the run's one global threshold: the threshold calibrated on 1:1 pairs, judged in 1:N.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from facebce.errors import ConfigError
from facebce.eval.identification import (OpenSetResult, OperatingPoint, ProbeScores, open_set_identification,
                                         operating_point, probe_scores)

OPEN_SET_FPIR_TARGETS = (1e-3, 1e-2, 1e-1)  # ~1,000 non-mated probes cannot resolve 1e-4
OPEN_SET_RANKS = (1, 5)
_CURVE_POINTS = 800  # thresholds on the DIR-vs-FPIR curve beyond the first 200 (plots only)


@dataclass(frozen=True)
class GalleryProbeSplit:
    """Which images are enrolled and which identities are unknown (indices into the folder's images)."""

    gallery: np.ndarray  # image indices enrolled, ascending
    probes: np.ndarray  # every other image, ascending
    unknown: np.ndarray  # identity labels never enrolled, ascending
    enrol_per_identity: int
    unknown_fraction: float
    seed: int


def split_gallery_probe(labels, *, enrol_per_identity: int = 1, unknown_fraction: float = 0.3,
                        seed: int = 0) -> GalleryProbeSplit:
    """Split images (per image its identity label) into gallery and probes.

    round(unknown_fraction x identities) identities, drawn with numpy's default_rng(seed), are never
    enrolled; each other identity enrols its first `enrol_per_identity` images in index order (all
    of them when it has no more). The split depends only on the labels and the three settings.
    """
    labels = np.asarray(labels).ravel()
    if not (isinstance(enrol_per_identity, (int, np.integer)) and enrol_per_identity >= 1):
        raise ConfigError(f"enrol_per_identity={enrol_per_identity!r}: expected an integer >= 1")
    if not 0 <= unknown_fraction < 1:
        raise ConfigError(f"unknown_fraction={unknown_fraction!r}: expected a number in [0, 1)")
    identities = np.unique(labels)
    n_unknown = int(np.floor(unknown_fraction * identities.size + 0.5))
    if n_unknown >= identities.size:
        raise ConfigError(f"unknown_fraction={unknown_fraction} leaves none of the {identities.size} identities "
                          "to enrol; lower it or add identities")
    unknown = np.sort(np.random.default_rng(seed).permutation(identities)[:n_unknown])
    order = np.argsort(labels, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(labels[order])) + 1]
    position = np.empty(labels.size, np.int64)  # per image: how many images of its identity come before it
    position[order] = np.arange(labels.size) - np.repeat(starts, np.diff(np.r_[starts, labels.size]))
    enrolled = (position < enrol_per_identity) & ~np.isin(labels, unknown)
    return GalleryProbeSplit(np.flatnonzero(enrolled), np.flatnonzero(~enrolled), unknown,
                             int(enrol_per_identity), float(unknown_fraction), int(seed))


@dataclass(frozen=True)
class DirFpirCurve:
    """DIR and realised FPIR over thresholds taken from the non-mated maxima (for plots)."""

    thresholds: np.ndarray
    dir: np.ndarray
    fpir: np.ndarray


@dataclass(frozen=True)
class OpenSetSetResult:
    name: str
    path: str
    enrol_per_identity: int
    unknown_fraction: float
    seed: int
    n_images: int
    n_identities: int
    n_enrolled_identities: int
    unknown_identities: tuple[str, ...]  # names of the identities never enrolled
    n_gallery_images: int
    n_mated: int  # probes whose identity is enrolled
    n_non_mated: int  # probes of unknown identities
    embedding_size: int
    identification: OpenSetResult  # CMC at the ranks; DIR (tpir), realised FPIR and threshold per FPIR target
    at_global: OperatingPoint  # DIR (tpir) and FPIR at the report's one global threshold
    probes: ProbeScores  # mate score and rank per mated probe, best score per non-mated probe (not in JSON)
    curve: DirFpirCurve  # (not in JSON)


def evaluate_open_set(embeddings: np.ndarray, labels, split: GalleryProbeSplit, *, threshold: float,
                      fpir_targets: Sequence[float] = OPEN_SET_FPIR_TARGETS, ranks: Sequence[int] = OPEN_SET_RANKS,
                      classes: Sequence[str] | None = None, name: str = "open_set", path: str = "") -> OpenSetSetResult:
    """Score the probes of `split` against its gallery (cosine of L2-normalised `embeddings`, one row
    per image) and compute every number with facebce.eval.identification; `threshold` is the one
    global threshold (a probe is accepted iff its score > threshold). `classes[label]` names an identity."""
    labels = np.asarray(labels).ravel()
    emb = np.asarray(embeddings).astype(np.float64)
    similarity = emb[split.probes] @ emb[split.gallery].T
    probe_ids, gallery_ids = labels[split.probes], labels[split.gallery]
    probes = probe_scores(similarity, probe_ids, gallery_ids)
    return OpenSetSetResult(
        name=name, path=path, enrol_per_identity=split.enrol_per_identity, unknown_fraction=split.unknown_fraction,
        seed=split.seed, n_images=int(labels.size), n_identities=int(np.unique(labels).size),
        n_enrolled_identities=int(np.unique(gallery_ids).size),
        unknown_identities=tuple(str(classes[i] if classes is not None else i) for i in split.unknown),
        n_gallery_images=int(split.gallery.size), n_mated=int(probes.rank.size),
        n_non_mated=int(probes.non_mated_max.size), embedding_size=int(emb.shape[1]),
        identification=open_set_identification(similarity, probe_ids, gallery_ids, fpir_targets, ranks),
        at_global=operating_point(similarity, probe_ids, gallery_ids, threshold),
        probes=probes, curve=_dir_fpir_curve(similarity, probe_ids, gallery_ids, probes.non_mated_max.size),
    )


def _dir_fpir_curve(similarity, probe_ids, gallery_ids, n_non_mated: int) -> DirFpirCurve:
    """open_set_identification at targets that make ijb_evals' rule pick the k-th largest non-mated
    maximum: every k up to 200, then log-spaced k (int(n * (k + 1.5) / n) - 1 = k)."""
    if n_non_mated == 0:
        return DirFpirCurve(np.empty(0), np.empty(0), np.empty(0))
    k = np.unique(np.r_[np.arange(min(n_non_mated, 200)),
                        np.geomspace(1, n_non_mated, _CURVE_POINTS).astype(np.int64) - 1])
    r = open_set_identification(similarity, probe_ids, gallery_ids, (k + 1.5) / n_non_mated, ranks=())
    return DirFpirCurve(r.thresholds, r.tpir, r.fpir)

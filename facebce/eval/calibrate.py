"""Calibration: the one global pair threshold as a deployable artifact (docs/calibration.md).

`calibrate` scores every given set with the machinery `facebce eval` uses (same protocols, same
embedding cache, flip-sum, L2-normalised cosines), picks the threshold at a target FAR on one set
(or on all pairs pooled), bootstraps its uncertainty, and reports the FAR/TAR it gives on every
other set (OneFace's one-threshold-for-all protocol: the "FAR drift" = FAR at the calibrated
threshold / target). The result, `calib.json`, carries the model's digest and a checksum of its own
content; `load_calibration` verifies both, and `resolve_threshold_spec` turns "calibrated:calib.json"
(or a plain number) into a threshold with its provenance for eval, export, the gallery and the service
(both live in facebce.eval.calibration_file, re-exported here).
The module is over 450 lines because the exact threshold rule, its three bootstrap schemes (pairs,
identities of a labelled folder, subjects of an IJB set) and the consistency metrics all work on
`ScoredSet` and that one rule; apart they would import each other in a cycle.

Threshold rule (facebce's: a pair is accepted iff cosine > t). With n impostor scores and a target
FAR f, k = floor(f * n) false accepts are allowed and the calibrated threshold is the (k+1)-th
highest impostor score: the smallest t with FAR(t) = #{impostor > t} / n <= f. It is exact (no
interpolation) and tie-proof: impostors tied with it are rejected, so its FAR may be below f when
ties straddle the cut. k = 0 (n < 1/f) would put the threshold at the highest impostor, with no
impostor above it and nothing measured about the target: refused, naming the impostor count needed.

Weighted rule (the identity and subject bootstraps): with a weight w >= 0 per impostor pair and
W = sum w, the threshold is the smallest impostor score t (among pairs of positive weight) with
sum{w : impostor > t} <= f * W. With every weight 1 it is the rule above, exactly.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facebce.errors import ConfigError, DataFormatError
from facebce.eval.calibration_file import (Calibration, ThresholdSpec, _clean, drift_markdown, load_calibration,
                                           resolve_threshold_spec, write_calibration)
PAIR_KINDS = ("pairs_bin", "pairs_list")
IJB_KIND = "ijb"  # IJB-B/C 1:1 template pairs: scored as `facebce eval` does, bootstrapped over subjects
FOLDER_KIND = "open_set_folder"  # a labelled folder: every pair of its images is scored
CI_LEVEL = 0.95
MIN_IMPOSTORS_PER_IDENTITY_FACTOR = 10  # per-identity FAR needs >= 10 / target impostor pairs of that identity


# ----------------------------------------------------------------------------- the exact threshold

def _finite_scores(scores, where: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise DataFormatError(f"{where}: no scores (empty set)")
    bad = int(np.sum(~np.isfinite(s)))
    if bad:
        raise DataFormatError(f"{where}: {bad} scores are NaN or Inf")
    return s


def check_target(target_far: float) -> float:
    try:
        f = float(target_far)
    except (TypeError, ValueError):
        raise ConfigError(f"target FAR {target_far!r}: expected a number in (0, 1), e.g. 1e-4") from None
    if not (0.0 < f < 1.0) or not math.isfinite(f):
        raise ConfigError(f"target FAR {target_far!r}: must lie strictly between 0 and 1, e.g. 1e-4")
    return f


def allowed_false_accepts(n_impostor: int, target_far: float) -> int:
    """k = floor(target * n), robust to the float product landing a hair below an integer."""
    k = math.floor(target_far * n_impostor)
    if (k + 1) <= target_far * n_impostor * (1 + 1e-12):
        k += 1
    return k


def impostors_needed(target_far: float, min_false_accepts: int = 1) -> int:
    """The fewest impostor pairs that resolve `target_far` (allow at least `min_false_accepts`)."""
    n = math.ceil(min_false_accepts / target_far)
    while allowed_false_accepts(n, target_far) < min_false_accepts:
        n += 1
    while n > 1 and allowed_false_accepts(n - 1, target_far) >= min_false_accepts:
        n -= 1
    return n


def threshold_at_far(impostor, target_far: float, *, where: str = "impostor scores",
                     min_false_accepts: int = 1) -> float:
    """The smallest t with #{impostor > t} / n <= target_far: the (k+1)-th highest impostor score,
    k = floor(target * n) (module docstring). Refuses when fewer than `min_false_accepts` false
    accepts would be allowed (the target is not resolved by this many impostors)."""
    f = check_target(target_far)
    s = _finite_scores(impostor, where)
    k = allowed_false_accepts(s.size, f)
    if k < min_false_accepts:
        need = impostors_needed(f, min_false_accepts)
        raise DataFormatError(f"{where}: {s.size} impostor pairs cannot resolve FAR {f:g} (at least {need} are "
                              f"needed for {min_false_accepts} allowed false accept(s))")
    return float(-np.partition(-s, k)[k])  # the (k+1)-th largest


def rates_at(scores, issame, threshold: float) -> tuple[float, float]:
    """(TAR, FAR) of pairs judged by score > threshold (NaN where a side is empty)."""
    scores = np.asarray(scores, np.float64)
    issame = np.asarray(issame, bool)
    accept = scores > threshold
    n_gen, n_imp = int(issame.sum()), int((~issame).sum())
    tar = float(np.sum(accept & issame) / n_gen) if n_gen else float("nan")
    far = float(np.sum(accept & ~issame) / n_imp) if n_imp else float("nan")
    return tar, far


def far_curve(impostor, thresholds) -> np.ndarray:
    """FAR(t) = #{impostor > t} / n at each t (one sort, then a search)."""
    s = np.sort(np.asarray(impostor, np.float64))
    return (s.size - np.searchsorted(s, np.asarray(thresholds, np.float64), side="right")) / s.size


# ----------------------------------------------------------------------------- scored sets

@dataclass
class ScoredSet:
    """One evaluation set as calibration sees it: a score and label per pair, and how to resample it.

    Pairs sets resample genuine and impostor pairs (stratified). Labelled folders score every pair of
    their images and resample identities (a pair of identities i != j enters with weight m_i * m_j,
    a genuine pair of i with m_i, m ~ Multinomial), so the interval reflects how many *people* were seen.
    IJB sets ("ijb") keep their 1:1 template pairs and resample subjects the same way (`bootstrap_subjects`):
    every template pair of one subject moves together, as they are correlated.
    """

    name: str
    protocol: str
    kind: str  # "pairs" | "folder" | "ijb"
    path: str
    digest: str
    scores: np.ndarray  # float64, one per pair
    issame: np.ndarray  # bool
    id_a: np.ndarray | None = None  # folder sets: identity of each pair's two images; ijb: subject codes
    id_b: np.ndarray | None = None
    n_identities: int | None = None
    labels: np.ndarray | None = None  # folder sets: identity of each image
    unit: str | None = None  # ijb: what id_a/id_b name, "subjects" (or "templates" without the 1:N files)

    @property
    def genuine(self) -> np.ndarray:
        return self.scores[self.issame]

    @property
    def impostor(self) -> np.ndarray:
        return self.scores[~self.issame]

    @property
    def n_genuine(self) -> int:
        return int(self.issame.sum())

    @property
    def n_impostor(self) -> int:
        return int((~self.issame).sum())


def scored_pairs(name: str, scores, issame, *, protocol: str = "custom", path: str = "", digest: str = "") -> ScoredSet:
    """A pairs set from scores and labels (checked: finite, same length, not empty)."""
    s = _finite_scores(scores, name)
    y = np.asarray(issame, bool).ravel()
    if y.shape != s.shape:
        raise DataFormatError(f"{name}: {s.size} scores but {y.size} labels")
    return ScoredSet(name, protocol, "pairs", str(path), digest, s, y)


def scored_folder(name: str, embeddings, labels, *, protocol: str = FOLDER_KIND, path: str = "",
                  digest: str = "") -> ScoredSet:
    """Every pair of a labelled folder's images: cosine of L2-normalised embeddings, i < j."""
    emb = np.asarray(embeddings, np.float32)
    labels = np.asarray(labels, np.int64).ravel()
    if emb.ndim != 2 or emb.shape[0] != labels.size or labels.size < 2:
        raise DataFormatError(f"{name}: {emb.shape} embeddings for {labels.size} labels (need >= 2 images)")
    if not np.isfinite(emb).all():
        raise DataFormatError(f"{name}: embeddings are NaN or Inf")
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float64)
    n = labels.size
    total = n * (n - 1) // 2
    scores = np.empty(total, np.float64)
    la, lb = np.empty(total, np.int32), np.empty(total, np.int32)
    at = 0
    for i0 in range(0, n - 1, 256):  # row blocks of the upper triangle, without n x n index arrays
        i1 = min(n - 1, i0 + 256)
        block = emb[i0:i1] @ emb.T
        for i in range(i0, i1):
            row = block[i - i0, i + 1:]
            scores[at:at + row.size] = row
            la[at:at + row.size] = labels[i]
            lb[at:at + row.size] = labels[i + 1:]
            at += row.size
    return ScoredSet(name, protocol, "folder", str(path), digest, scores, la == lb, la, lb,
                     int(labels.max()) + 1, labels)


def scored_ijb(name: str, scores, issame, id_a, id_b, n_units: int | None = None, *, unit: str = "subjects",
               protocol: str = IJB_KIND, path: str = "", digest: str = "") -> ScoredSet:
    """IJB-style template pairs: a score and label per pair and the subject code (0..n-1) of its two templates."""
    s = scored_pairs(name, scores, issame, protocol=protocol, path=path, digest=digest)
    a, b = np.asarray(id_a, np.int64).ravel(), np.asarray(id_b, np.int64).ravel()
    if a.shape != s.scores.shape or b.shape != s.scores.shape or (a.size and min(a.min(), b.min()) < 0):
        raise DataFormatError(f"{name}: {a.size}/{b.size} subject codes for {s.scores.size} pairs (need one >= 0 each)")
    n = int(max(a.max(), b.max()) + 1) if n_units is None else int(n_units)
    return ScoredSet(name, protocol, IJB_KIND, s.path, digest, s.scores, s.issame, a, b, n, unit=unit)


def score_sets(model, protocols: Sequence[tuple[str, str | os.PathLike]], *, flip: bool = True,
               cache_dir=None, model_name: str | None = None, protocol_paths: Sequence = (),
               progress: bool = True, align=None) -> list[ScoredSet]:
    """Score each (protocol name, path) with `facebce eval`'s machinery (EmbeddingSource and the image-set
    loaders: the same embeddings, cache and cosines); pairs sets, labelled folders and IJB 1:1 sets (their
    template-pair scores as `evaluate_ijb` computes them; `align` as `evaluate` takes it)."""
    from facebce.eval.protocols import get_protocol
    from facebce.eval.embedding_cache import EmbeddingSource
    from facebce.eval.image_sets import load_open_set_folder, load_pairs
    from facebce.eval.pair_sets import cosines

    if not protocols:
        raise ConfigError("calibrate: no sets given (add PROTOCOL=PATH, e.g. lfw=data/lfw.bin)")
    resolved, seen = [], set()
    for name, path in protocols:
        protocol = get_protocol(str(name), protocol_paths)
        if protocol.kind not in (*PAIR_KINDS, FOLDER_KIND, IJB_KIND):
            raise ConfigError(f"{protocol.name}: calibration takes pairs sets ({', '.join(PAIR_KINDS)}), labelled "
                              f"folders ({FOLDER_KIND}) and IJB 1:1 sets ({IJB_KIND}), not {protocol.kind}")
        if protocol.name in seen:
            raise ConfigError(f"{protocol.name}: given twice (set names must be unique)")
        seen.add(protocol.name)
        resolved.append((protocol, Path(path)))
    source = EmbeddingSource(model, flip=flip, cache_dir=cache_dir, model_name=model_name, progress=progress)
    out = []
    for protocol, path in resolved:
        if protocol.kind in PAIR_KINDS:
            pairs = load_pairs(protocol, path, progress=progress)
            cos = cosines(source.image_embeddings(protocol.name, pairs))  # what eval scores, bit for bit
            out.append(scored_pairs(protocol.name, cos, pairs.issame, protocol=protocol.name, path=str(path),
                                    digest=pairs.digest))
        elif protocol.kind == IJB_KIND:
            out.append(_scored_ijb(protocol, path, source, align, flip, progress))
        else:
            folder = load_open_set_folder(protocol, path)
            emb = source.image_embeddings(protocol.name, folder)
            out.append(scored_folder(protocol.name, emb, folder.labels, protocol=protocol.name, path=str(path),
                                     digest=folder.digest))
    return out


def _scored_ijb(protocol, path: Path, source, align, flip: bool, progress: bool) -> ScoredSet:
    """An IJB set's 1:1 scores with eval's options (runner._ijb_result) and each pair's subjects."""
    from facebce.eval.ijb import load_ijb, pair_subjects, template_pair_scores
    from facebce.eval.model_loading import file_digest

    meta = load_ijb(path, protocol)
    raw = source.ijb_features(meta, views=2 if flip else 1, align=align)
    options = protocol["template"]
    scores = template_pair_scores(meta, raw, flip=options["flip"] if flip else "none",
                                  image_l2norm=options["image_l2norm"], face_score_weight=options["face_score_weight"],
                                  progress=progress)
    digest = file_digest(meta.points_file)[:16]  # the crops (with the images) and, below, the pairs
    digest += file_digest(meta.root / protocol["meta_dir"] / protocol["files"]["pairs"])[:16]
    subjects = pair_subjects(meta)
    if subjects is None:  # no 1:N files naming each template's subject: the templates are the units
        _, codes = np.unique(meta.pairs, return_inverse=True)
        codes = codes.reshape(meta.pairs.shape)
        return scored_ijb(protocol.name, scores, meta.labels, codes[:, 0], codes[:, 1], unit="templates",
                          protocol=protocol.name, path=str(path), digest=digest)
    a, b, n = subjects
    return scored_ijb(protocol.name, scores, meta.labels, a, b, n, protocol=protocol.name, path=str(path),
                      digest=digest)


# ----------------------------------------------------------------------------- bootstrap

@dataclass(frozen=True)
class Bootstrap:
    replicates: int
    seed: int
    unit: str  # "pairs" (stratified: genuine and impostor apart) | "identities" | "subjects" | "templates"
    level: float
    threshold_ci: tuple[float, float]
    tar_ci: tuple[float, float]
    thresholds: np.ndarray = field(repr=False)  # per replicate
    tars: np.ndarray = field(repr=False)


def _percentile_ci(values: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(values, [a, 1 - a])
    return float(lo), float(hi)


def bootstrap_pairs(genuine, impostor, target_far: float, *, replicates: int = 1000, seed: int = 0,
                    level: float = CI_LEVEL, chunk: int = 64) -> Bootstrap:
    """Percentile bootstrap of the threshold at `target_far` and its TAR, resampling impostor and
    genuine pairs apart (their counts stay fixed, so k = floor(f * n) does too); vectorised per chunk."""
    f = check_target(target_far)
    gen = np.sort(_finite_scores(genuine, "genuine scores"))
    imp = _finite_scores(impostor, "impostor scores")
    threshold_at_far(imp, f)  # refuses an unresolved target before any work
    if replicates < 10:
        raise ConfigError(f"bootstrap replicates {replicates}: use at least 10 (1000 for a reported interval)")
    rng = np.random.default_rng(seed)
    k = allowed_false_accepts(imp.size, f)
    ts, tars = np.empty(replicates), np.empty(replicates)
    for start in range(0, replicates, chunk):
        b = min(chunk, replicates - start)
        sample = imp[rng.integers(0, imp.size, size=(b, imp.size))]
        t = -np.partition(-sample, k, axis=1)[:, k]
        g = gen[rng.integers(0, gen.size, size=(b, gen.size))]
        ts[start:start + b] = t
        tars[start:start + b] = np.mean(g > t[:, None], axis=1)
    return Bootstrap(replicates, seed, "pairs", level, _percentile_ci(ts, level), _percentile_ci(tars, level), ts, tars)


def bootstrap_identities(s: ScoredSet, target_far: float, *, replicates: int = 1000, seed: int = 0,
                         level: float = CI_LEVEL) -> Bootstrap:
    """Percentile bootstrap over identities of a labelled folder's all-pairs scores (ScoredSet docstring):
    per replicate the weighted threshold is the smallest t with weighted #{impostor > t} <= f * W."""
    f = check_target(target_far)
    if s.id_a is None:
        raise ConfigError(f"{s.name}: identity resampling needs a labelled folder set")
    if replicates < 10:
        raise ConfigError(f"bootstrap replicates {replicates}: use at least 10 (1000 for a reported interval)")
    threshold_at_far(s.impostor, f, where=s.name)
    rng = np.random.default_rng(seed)
    imp = ~s.issame
    order = np.argsort(-s.scores[imp], kind="stable")
    imp_scores = s.scores[imp][order]
    ia, ib = s.id_a[imp][order], s.id_b[imp][order]
    gen_scores, gen_id = s.scores[s.issame], s.id_a[s.issame]
    n_id = s.n_identities
    ts, tars = np.empty(replicates), np.empty(replicates)
    depth = min(imp_scores.size, max(4096, 64 * (allowed_false_accepts(imp_scores.size, f) + 1)))
    for r in range(replicates):
        m = rng.multinomial(n_id, np.full(n_id, 1.0 / n_id)).astype(np.float64)
        budget = f * _impostor_weight(s, m)
        d = depth
        while True:
            cum = np.cumsum(m[ia[:d]] * m[ib[:d]])
            j = int(np.searchsorted(cum, budget, side="right"))  # first index whose cum weight > budget
            if j < d or d == imp_scores.size:
                break
            d = min(imp_scores.size, 4 * d)
        t = float(imp_scores[min(j, imp_scores.size - 1)])
        ts[r] = t
        w = m[gen_id]
        tars[r] = float(np.sum(w * (gen_scores > t)) / np.sum(w)) if np.sum(w) else float("nan")
    return Bootstrap(replicates, seed, "identities", level, _percentile_ci(ts, level),
                     _percentile_ci(tars[np.isfinite(tars)], level), ts, tars)


def _tie_group_starts(desc: np.ndarray) -> np.ndarray:
    """For scores sorted descending: the first position of each position's group of equal scores."""
    new_group = np.r_[True, desc[1:] != desc[:-1]]
    return np.flatnonzero(new_group)[np.cumsum(new_group) - 1]


def _weighted_cut(w: np.ndarray, group_start: np.ndarray, budget: float, positions: np.ndarray) -> tuple[int, bool]:
    """The weighted rule on the top of a descending order with weights `w`: (position of the threshold, or
    -1 with no positive weight there; False when the cut may lie below the positions given)."""
    before = np.r_[0.0, np.cumsum(w)[:-1]]
    above = before[group_start]  # weight strictly above each position: what precedes its tie group
    j = int(np.searchsorted(above, budget, side="right"))  # positions 0..j-1 meet the budget
    return int(np.max(np.where(w[:j] > 0, positions[:j], -1))), j < w.size


def weighted_threshold_at_far(impostor, weights, target_far: float) -> float:
    """The weighted rule (module docstring): the smallest impostor score t of positive weight with
    sum{w : impostor > t} <= target * sum w. With integer weights it is `threshold_at_far` of the scores
    each repeated w times; with all weights 1 it is `threshold_at_far` itself (without its refusal)."""
    f = check_target(target_far)
    s = _finite_scores(impostor, "impostor scores")
    w = np.asarray(weights, np.float64).ravel()
    if w.shape != s.shape or np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise DataFormatError(f"weights: need one finite weight >= 0 per score ({w.size} for {s.size}), not all 0")
    order = np.argsort(-s, kind="stable")
    desc, w = s[order], w[order]
    last, _ = _weighted_cut(w, _tie_group_starts(desc), f * float(w.sum()) * (1 + 1e-12), np.arange(s.size))
    return float(desc[last])


def bootstrap_subjects(s: ScoredSet, target_far: float, *, replicates: int = 1000, seed: int = 0,
                       level: float = CI_LEVEL) -> Bootstrap:
    """Percentile bootstrap over the subjects of an IJB-style set (template pairs with subject codes id_a,
    id_b): each replicate draws the n subjects with replacement (counts c); a genuine pair of subject i
    weighs c_i, an impostor pair of subjects i != j weighs c_i * c_j. The threshold is the weighted rule
    (module docstring): the smallest impostor score t of positive weight with weighted #{impostor > t}
    <= f * W; TAR is the weighted genuine fraction > t. (Templates as units, without subject ids: a pair
    of two templates weighs the product of their counts.) Impostors are sorted once; per replicate only
    the top of that order is weighed (deepened when the cut lies below it)."""
    f = check_target(target_far)
    if s.id_a is None or s.kind != IJB_KIND:
        raise ConfigError(f"{s.name}: subject resampling needs an IJB set (template pairs with subject ids)")
    if replicates < 10:
        raise ConfigError(f"bootstrap replicates {replicates}: use at least 10 (1000 for a reported interval)")
    threshold_at_far(s.impostor, f, where=s.name)
    rng = np.random.default_rng(seed)
    n = int(s.n_identities)
    imp = ~s.issame
    order = np.argsort(-s.scores[imp], kind="stable")
    imp_scores = s.scores[imp][order]
    ia, ib = s.id_a[imp][order], s.id_b[imp][order]
    same = ia == ib  # only with templates as units would an impostor pair share one
    # ties: the weight strictly above position j is the cumulative weight before its tie group starts
    group_start = _tie_group_starts(imp_scores)
    codes, counts = np.unique(ia * n + ib, return_counts=True)  # W from the distinct unit pairs
    ua, ub = codes // n, codes % n
    gen_scores, ga, gb = s.scores[s.issame], s.id_a[s.issame], s.id_b[s.issame]
    gen_same = ga == gb
    ts, tars = np.empty(replicates), np.empty(replicates)
    positions = np.arange(imp_scores.size)
    depth = min(imp_scores.size, max(4096, 64 * (allowed_false_accepts(imp_scores.size, f) + 1)))
    for r in range(replicates):
        c = rng.multinomial(n, np.full(n, 1.0 / n)).astype(np.float64)
        pair_w = np.where(ua == ub, c[ua], c[ua] * c[ub])
        budget = f * float(np.sum(counts * pair_w)) * (1 + 1e-12)  # as allowed_false_accepts rounds
        d = depth
        while True:
            w = np.where(same[:d], c[ia[:d]], c[ia[:d]] * c[ib[:d]])
            last, complete = _weighted_cut(w, group_start[:d], budget, positions[:d])
            if complete or d == imp_scores.size:
                break
            d = min(imp_scores.size, 4 * d)
        t = float(imp_scores[last]) if last >= 0 else float("nan")  # nan: no impostor weight drawn at all
        ts[r] = t
        gw = np.where(gen_same, c[ga], c[ga] * c[gb])
        tars[r] = float(np.sum(gw * (gen_scores > t)) / np.sum(gw)) if np.sum(gw) else float("nan")
    return Bootstrap(replicates, seed, s.unit or "subjects", level, _percentile_ci(ts[np.isfinite(ts)], level),
                     _percentile_ci(tars[np.isfinite(tars)], level), ts, tars)


def _impostor_weight(s: ScoredSet, m: np.ndarray) -> float:
    """Total impostor weight sum_{pairs (a, b), id a != id b} m[id a] * m[id b] from image counts."""
    x = m * np.bincount(s.labels, minlength=s.n_identities).astype(np.float64)
    return float((x.sum() ** 2 - np.sum(x * x)) / 2)


# ----------------------------------------------------------------------------- consistency

def per_identity_far(s: ScoredSet, threshold: float, target_far: float) -> dict:
    """Spread of FAR over identities at `threshold` on a labelled folder: an identity's FAR counts the
    impostor pairs it takes part in; identities with fewer than 10 / target of them are left out."""
    imp = ~s.issame
    a, b = s.id_a[imp], s.id_b[imp]
    fa = s.scores[imp] > threshold
    n = np.bincount(a, minlength=s.n_identities) + np.bincount(b, minlength=s.n_identities)
    k = np.bincount(a, weights=fa, minlength=s.n_identities) + np.bincount(b, weights=fa, minlength=s.n_identities)
    need = math.ceil(MIN_IMPOSTORS_PER_IDENTITY_FACTOR / target_far)
    ok = n >= need
    out = {"min_impostor_pairs": need, "identities": int(ok.sum()), "left_out": int((~ok).sum())}
    if ok.any():
        far = k[ok] / n[ok]
        out.update(median=float(np.median(far)), p90=float(np.quantile(far, 0.9)), max=float(far.max()),
                   max_over_target=float(far.max() / target_far), zero=int(np.sum(far == 0)))
    return out


def opis(s: ScoredSet, *, far_range: tuple[float, float], beta: float = 1.0, grid: int = 101) -> dict:
    """OPIS (arXiv 2307.04047, docs/calibration.md): the mean over identities of the mean squared gap,
    over a uniform grid of thresholds spanning the calibration range, between each identity's utility
    U_i(t) = F_beta(TPR_i(t), TNR_i(t)) and the utility U(t) of all pairs together. The calibration range
    is the thresholds whose overall FAR lies in `far_range`. Identities without a genuine pair are left out."""
    lo_far, hi_far = sorted(far_range)
    imp_all = s.impostor
    t_hi = threshold_at_far(imp_all, lo_far, where=f"{s.name} (OPIS range)")
    t_lo = threshold_at_far(imp_all, hi_far, where=f"{s.name} (OPIS range)")
    ts = np.linspace(t_lo, t_hi, grid)
    b2 = beta * beta

    def utility(tpr, tnr):
        den = b2 * tpr + tnr
        return np.where(den > 0, (1 + b2) * tpr * tnr / np.where(den > 0, den, 1), 0.0)

    def rates(gen, imp):
        g, i = np.sort(gen), np.sort(imp)
        tpr = (g.size - np.searchsorted(g, ts, side="right")) / g.size
        tnr = np.searchsorted(i, ts, side="right") / i.size
        return tpr, tnr

    u_all = utility(*rates(s.genuine, imp_all))
    imp = ~s.issame
    imp_scores = np.concatenate([s.scores[imp], s.scores[imp]])
    imp_ids = np.concatenate([s.id_a[imp], s.id_b[imp]])  # an impostor pair counts for both its identities
    order = np.argsort(imp_ids, kind="stable")
    imp_scores, imp_bounds = imp_scores[order], np.searchsorted(imp_ids[order], np.arange(s.n_identities + 1))
    gen_ids = s.id_a[s.issame]
    order = np.argsort(gen_ids, kind="stable")
    gen_scores, gen_bounds = s.scores[s.issame][order], np.searchsorted(gen_ids[order], np.arange(s.n_identities + 1))
    gaps = []
    for i in range(s.n_identities):
        gen = gen_scores[gen_bounds[i]:gen_bounds[i + 1]]
        imp_i = imp_scores[imp_bounds[i]:imp_bounds[i + 1]]
        if gen.size == 0 or imp_i.size == 0:
            continue
        gaps.append(np.mean((utility(*rates(gen, imp_i)) - u_all) ** 2))
    return {"value": float(np.mean(gaps)) if gaps else float("nan"), "identities": len(gaps), "beta": beta,
            "far_range": [lo_far, hi_far], "threshold_range": [float(t_lo), float(t_hi)], "grid": grid}


# ----------------------------------------------------------------------------- calibration

def _own_threshold(s: ScoredSet, f: float) -> dict:
    try:
        t = threshold_at_far(s.impostor, f, where=s.name)
    except DataFormatError:
        return {"own_threshold": None, "own_tar": None,
                "own_note": f"unresolved: {s.n_impostor} impostor pairs, {impostors_needed(f)} needed"}
    tar, far = rates_at(s.scores, s.issame, t)
    return {"own_threshold": t, "own_tar": tar, "own_far": far}


def calibrate_scored(sets: Sequence[ScoredSet], target_far: float, *, on: str | None = None, pooled: bool = False,
                     replicates: int = 1000, seed: int = 0, model: Mapping | None = None,
                     consistency: bool = True, opis_far_range: tuple[float, float] | None = None,
                     opis_beta: float = 1.0) -> Calibration:
    """Calibrate on one set (`on`, default the first pairs set) or on every pairs set pooled, then read
    FAR, FAR drift and TAR at that threshold on every set, with each set's own threshold beside it."""
    f = check_target(target_far)
    if not sets:
        raise ConfigError("calibrate: no sets given")
    if pooled and on is not None:
        raise ConfigError("calibrate: give --pooled or --on SET, not both")
    by_name = {s.name: s for s in sets}
    if pooled:
        chosen = [s for s in sets if s.kind == "pairs"]
        if not chosen:
            raise ConfigError("calibrate --pooled: no pairs sets to pool "
                              "(labelled folders and IJB sets are never pooled)")
    else:
        name = on if on is not None else sets[0].name
        if name not in by_name:
            raise ConfigError(f"calibrate --on {name}: no such set in this run ({', '.join(by_name)})")
        chosen = [by_name[name]]
    scores = np.concatenate([s.scores for s in chosen])
    issame = np.concatenate([s.issame for s in chosen])
    where = " + ".join(s.name for s in chosen)
    impostor = scores[~issame]
    if impostor.size == 0:
        raise DataFormatError(f"{where}: no impostor pairs to calibrate on")
    if not issame.any():
        raise DataFormatError(f"{where}: no genuine pairs (the TAR at the threshold would be undefined)")
    t = threshold_at_far(impostor, f, where=where)
    tar, far = rates_at(scores, issame, t)
    boot = None
    if replicates:
        if len(chosen) == 1 and chosen[0].kind == "folder":
            b = bootstrap_identities(chosen[0], f, replicates=replicates, seed=seed)
        elif len(chosen) == 1 and chosen[0].kind == IJB_KIND:
            b = bootstrap_subjects(chosen[0], f, replicates=replicates, seed=seed)
        else:
            b = bootstrap_pairs(scores[issame], impostor, f, replicates=replicates, seed=seed)
        boot = {"replicates": b.replicates, "seed": b.seed, "unit": b.unit, "level": b.level,
                "threshold_ci": list(b.threshold_ci), "tar_ci": list(b.tar_ci)}
    rows = []
    for s in sets:
        s_tar, s_far = rates_at(s.scores, s.issame, t)
        row = {"name": s.name, "protocol": s.protocol, "kind": s.kind, "path": s.path, "digest": s.digest,
               "n_pairs": int(s.scores.size), "n_genuine": s.n_genuine, "n_impostor": s.n_impostor,
               "calibration_set": s in chosen, "far": s_far, "far_drift": s_far / f, "tar": s_tar,
               "false_accepts": int(np.sum(s.impostor > t)), **_own_threshold(s, f)}
        if consistency and s.kind == "folder":
            row["per_identity_far"] = per_identity_far(s, t, f)
            rng_far = opis_far_range or (f / 10, min(0.5, f * 10))
            try:
                row["opis"] = opis(s, far_range=rng_far, beta=opis_beta)
            except DataFormatError as e:
                row["opis"] = {"value": None, "note": str(e)}
        rows.append(row)
    return Calibration(model=dict(model or {}), target_far=f, calibrated_on=[s.name for s in chosen],
                       threshold=t, n_impostor=int(impostor.size), false_accepts_allowed=allowed_false_accepts(
                           impostor.size, f), far=far, tar=tar, bootstrap=boot, sets=_clean(rows))


def verified_threshold(value, model=None):
    """A "calibrated:CALIB.json" threshold option -> its verified ThresholdSpec, checked against `model`'s
    weights (a ModelSpec) when given; any other value is returned as it is (for the gallery's resolver)."""
    if value is None or not str(value).startswith("calibrated:"):
        return value
    return resolve_threshold_spec(value, model_digest=None if model is None else model_identity(model)["digest"])


def model_identity(model) -> dict:
    """{"path", "digest", "key"} of a ModelSpec (digest: sha256 of its weights file, as eval's cache key uses)."""
    from facebce.eval.model_loading import ModelSpec, file_digest

    if isinstance(model, ModelSpec):
        return {"path": model.path.name, "digest": file_digest(model.weights_file), "key": model.key}
    raise ConfigError("calibrate: give a ModelSpec, or model_digest= for precomputed embeddings")


def calibrate(model, protocols: Sequence[tuple[str, str | os.PathLike]], *, target_far: float,
              on: str | None = None, pooled: bool = False, replicates: int = 1000, seed: int = 0,
              flip: bool = True, cache_dir=None, model_name: str | None = None, model_digest: str | None = None,
              protocol_paths: Sequence = (), out: str | os.PathLike | None = None, progress: bool = True,
              opis_far_range: tuple[float, float] | None = None, opis_beta: float = 1.0, align=None) -> Calibration:
    """Score `protocols` with `model` (a ModelSpec, an embedder or a mapping set -> embeddings, as
    `evaluate` takes), calibrate (see `calibrate_scored`) and, with `out`, write calib.json and its
    drift report (`<stem>.md`, `<stem>.png`) beside it, atomically. `align` (IJB sets only): as `evaluate`
    takes it (None: insightface's `norm_crop`, facebce.data.align)."""
    check_target(target_far)  # before any embedding
    if pooled and on is not None:
        raise ConfigError("calibrate: give --pooled or --on SET, not both")
    from facebce.eval.model_loading import ModelSpec

    if isinstance(model, ModelSpec):
        identity = model_identity(model)
    elif model_digest:
        identity = {"path": model_name or getattr(model, "name", None) or type(model).__name__,
                    "digest": str(model_digest), "key": model_name}
    else:
        raise ConfigError("calibrate: a model that is not a file needs model_digest= (the calibration is tied to it)")
    sets = score_sets(model, protocols, flip=flip, cache_dir=cache_dir, model_name=model_name,
                      protocol_paths=protocol_paths, progress=progress, align=align)
    cal = calibrate_scored(sets, target_far, on=on, pooled=pooled, replicates=replicates, seed=seed,
                           model={**identity, "flip": flip}, opis_far_range=opis_far_range, opis_beta=opis_beta)
    if out is not None:
        write_calibration(cal, out, sets=sets)
    return cal


__all__ = ["Calibration", "ScoredSet", "ThresholdSpec", "calibrate", "calibrate_scored", "load_calibration",
           "resolve_threshold_spec", "threshold_at_far", "bootstrap_pairs", "bootstrap_identities",
           "bootstrap_subjects", "scored_ijb", "weighted_threshold_at_far",
           "per_identity_far", "opis", "score_sets", "write_calibration", "drift_markdown"]

"""`evaluate`: the evaluation the CLI runs — every classic number per set, and one global threshold for all.

For each pairs set (LFW-family .bin, or a listed pairs file) it embeds every image once (flip-sum,
L2-normalised), caches the embeddings as `.npy` keyed by model and set (so a set can be re-scored
without the model), and reports insightface's 10-fold accuracy and VAL@FAR, ROC TAR@FAR, the set's
own best single threshold, and — facebce's point — accuracy, TAR and FAR at ONE global threshold
shared by every set, chosen from a named source (facebce.eval.threshold: fit:union, fit:<set>,
fixed:<t>, bias).
IJB sets are scored with facebce.eval.ijb and get TAR/FAR (and 1:N TPIR/FPIR) at that threshold.
Open-set folder sets (a labelled folder split into gallery and probes with never-enrolled
identities, facebce.eval.open_set) are embedded and cached like the pairs sets and get CMC,
DIR@FPIR and DIR/FPIR at that threshold; like IJB sets they never take part in fitting it.
A classification folder set (a labelled val set of a training run's own classes) is embedded once
per image (no flip, raw embeddings, as the head saw its training crops), scored against the run's
class centres like its head's `scores()`, and fills the uniform-classification section.

This module only orchestrates; each concern has its own file: the result types (results.py), the
image sets and their loaders (image_sets.py), the embedding cache (embedding_cache.py), the global
threshold (threshold.py), the pairs-set numbers (pair_sets.py), the uniform section (uniform.py) and
the files written (report.py).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from facebce.errors import ConfigError
from facebce.eval.embedding_cache import EmbeddingSource
from facebce.eval.ijb import IjbResult, evaluate_ijb, load_ijb
from facebce.eval.image_sets import ImageSet, load_classification_folder, load_open_set_folder, load_pairs
from facebce.eval.model_loading import ModelSpec, file_digest, learned_bias
from facebce.eval.open_set import OpenSetSetResult, evaluate_open_set
from facebce.eval.pair_sets import cosines, pair_set_result
from facebce.eval.protocols import Protocol, get_protocol
from facebce.eval.report import check_out_dir, write_report
from facebce.eval.results import EvalReport, GlobalThreshold, PairSetResult
from facebce.eval.tenfold import check_fold_count
from facebce.eval.roc import DEFAULT_TAR_MODE, TAR_MODES
from facebce.eval.threshold import THRESHOLD_SOURCES, global_threshold, parse_threshold
from facebce.eval.uniform import UniformSection, uniform_section

# Names other code imported from here before the split; their homes are the modules above.
__all__ = ["CLASSIFICATION_KIND", "OPEN_SET_KIND", "PAIR_KINDS", "THRESHOLD_SOURCES", "EvalReport", "GlobalThreshold",
           "ImageSet", "PairSetResult", "UniformSection", "evaluate", "load_classification_folder",
           "load_open_set_folder", "load_pairs", "parse_threshold", "uniform_section"]

PAIR_KINDS = ("pairs_bin", "pairs_list")
OPEN_SET_KIND = "open_set_folder"
CLASSIFICATION_KIND = "classification_folder"


def evaluate(model, protocols: Sequence[tuple[str, str | os.PathLike]], *, flip: bool = True,
             threshold: str = "fit:union", bias: float | None = None, cache_dir: str | os.PathLike | None = None,
             out_dir: str | os.PathLike | None = None, far_targets: Sequence[float] | None = None,
             tar_mode: str = DEFAULT_TAR_MODE, model_name: str | None = None,
             protocol_paths: Sequence[str | os.PathLike] = (),
             align: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
             uniform: tuple[np.ndarray, np.ndarray] | None = None, progress: bool = True) -> EvalReport:
    """Evaluate `model` on `protocols` = [(protocol name, data path), ...] and return an EvalReport
    (written to `out_dir` when given, see facebce.eval.report).

    model: an embedder (`.embed(bgr_uint8) -> N x D`), a `ModelSpec` (loaded only if a set is not
    cached), a mapping set name -> embeddings (pairs set: 2P x D, image 2k/2k+1 = pair k; IJB set:
    rows x views x D raw features; open-set folder: N x D in folder order, identities and files
    sorted), or None to re-score from `cache_dir` under `model_name`.
    far_targets: None = each protocol's own (FAR_TARGETS for pairs sets). `align` (IJB only):
    `align(img_bgr, kps5x2) -> crop_bgr`; None: insightface's `norm_crop` (facebce.data.align).
    `uniform` = (score matrix, labels) of a classifier adds the uniform-classification section.

    Flip: an embedder with its own `flip` (OnnxEmbedder, TorchEmbedder) must agree with `flip` and
    does the flip-sum itself, on raw outputs as insightface does; any other embedder is mirrored here
    and its two outputs summed.
    """
    if tar_mode not in TAR_MODES:
        raise ConfigError(f"tar_mode={tar_mode!r}: expected one of {', '.join(TAR_MODES)}")
    bias = learned_bias(model, bias)  # a run folder's own b/γ when not given (threshold="bias", uniform gap)
    if out_dir is not None:
        check_out_dir(out_dir)  # refuse a bad --out before any embedding
    resolved = _resolve_protocols(protocols, protocol_paths)
    pair_sets = [(p, path) for p, path in resolved if p.kind in PAIR_KINDS]
    calibrated = str(threshold).strip().startswith("calibrated:") and isinstance(model, ModelSpec)
    parsed = parse_threshold(threshold, [p.name for p, _ in pair_sets], bias,  # .key: one-line errors first
                             model_digest=model.key and file_digest(model.weights_file) if calibrated else None)
    source = EmbeddingSource(model, flip=flip, cache_dir=cache_dir, model_name=model_name, progress=progress)
    folders = [(p, path, load_open_set_folder(p, path)) for p, path in resolved if p.kind == OPEN_SET_KIND]
    classify = _classification_set(resolved, model, uniform)

    scored = {}
    for protocol, path in pair_sets:
        pairs = load_pairs(protocol, path, progress=progress)
        if "ten_fold" in protocol.metrics:  # before any embedding: name the set and the size it needs
            check_fold_count(pairs.issame.size, protocol["folds"], f"{protocol.name} ({path})")
        emb = source.image_embeddings(protocol.name, pairs)
        scored[protocol.name] = (str(path), pairs.issame, emb)
    global_t = global_threshold(parsed, {n: (cosines(e), s) for n, (_, s, e) in scored.items()})
    sets = [pair_set_result(p, *scored[p.name], global_t.value, far_targets, tar_mode) for p, _ in pair_sets]
    ijb = [_ijb_result(p, path, source, align, global_t.value, far_targets, tar_mode, flip, progress)
           for p, path in resolved if p.kind == "ijb"]
    open_set = [_open_set_result(p, path, folder, source, global_t.value) for p, path, folder in folders]
    if classify is not None:
        section = _classification_result(*classify, source, bias)
    else:
        section = uniform_section(*uniform, bias=bias) if uniform is not None else None
    report = EvalReport(model=source.label, flip=flip, tar_mode=tar_mode, threshold=global_t, sets=sets, ijb=ijb,
                        open_set=open_set, bias=bias, uniform=section, inference=source.inference())
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def _resolve_protocols(protocols, protocol_paths) -> list[tuple[Protocol, Path]]:
    if not protocols:
        raise ConfigError("protocols: nothing to evaluate (give at least one (name, path))")
    out, seen = [], set()
    for item in protocols:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError(f"protocols: {item!r} is not a (protocol name, data path) pair")
        protocol = get_protocol(str(item[0]), protocol_paths)
        if protocol.name in seen:
            raise ConfigError(f"protocols: {protocol.name!r} given twice (set names must be unique)")
        seen.add(protocol.name)
        out.append((protocol, Path(item[1])))
    return out


def _ijb_result(protocol, path, source, align, t, far_targets, tar_mode, flip, progress) -> IjbResult:
    meta = load_ijb(path, protocol)
    raw = source.ijb_features(meta, views=2 if flip else 1, align=align)
    options = protocol["template"]
    return evaluate_ijb(meta, raw, flip=options["flip"] if flip else "none", image_l2norm=options["image_l2norm"],
                        face_score_weight=options["face_score_weight"],
                        far_targets=far_targets if far_targets is not None else protocol["far_targets"],
                        tar_mode=tar_mode, threshold=t, identification="identification" in protocol.metrics,
                        progress=progress)


def _open_set_result(protocol: Protocol, path: Path, folder: ImageSet, source: EmbeddingSource,
                     t: float) -> OpenSetSetResult:
    emb = source.image_embeddings(protocol.name, folder)
    return evaluate_open_set(emb, folder.labels, folder.split, threshold=t, fpir_targets=protocol["fpir_targets"],
                             ranks=protocol["ranks"], classes=folder.classes, name=protocol.name, path=str(path))


def _classification_set(resolved, model, uniform):
    """(protocol, path, images, classifier) of the one classification_folder set, or None; every
    problem (no run folder, no centres, class count) is a one-line error before anything is embedded."""
    chosen = [(p, path) for p, path in resolved if p.kind == CLASSIFICATION_KIND]
    if not chosen:
        return None
    if len(chosen) > 1:
        raise ConfigError(f"{CLASSIFICATION_KIND}: give one classification set, not {len(chosen)} "
                          "(the report has one uniform-classification section)")
    if uniform is not None:
        raise ConfigError(f"{CLASSIFICATION_KIND}: the uniform section comes from this set; do not also pass uniform=")
    protocol, path = chosen[0]
    if not isinstance(model, ModelSpec):
        raise ConfigError(f"{protocol.name}: closed-set classification needs a facebce training run folder as the "
                          "model (its class centres), not embeddings or a re-score from the cache")
    classifier = model.classifier()
    images = load_classification_folder(protocol, path)
    if len(images.classes) != classifier.num_classes:
        raise ConfigError(f"{protocol.name} on {path}: {len(images.classes)} identity folders, but the run "
                          f"{model.path} has {classifier.num_classes} classes (sorted folders must be its class ids)")
    return protocol, path, images, classifier


def _classification_result(protocol: Protocol, path: Path, images: ImageSet, classifier,
                           source: EmbeddingSource, bias: float | None) -> UniformSection:
    raw = source.raw_embeddings(protocol.name, images)
    scores = classifier.class_scores(raw)
    learned = classifier.threshold if classifier.threshold is not None else bias
    thresholds = None if classifier.class_thresholds is None else classifier.class_thresholds.numpy()
    return uniform_section(scores, images.labels, bias=learned, class_thresholds=thresholds, name=protocol.name,
                           path=str(path), n_samples=int(images.labels.size), num_classes=classifier.num_classes)

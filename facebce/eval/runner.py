"""`evaluate`: the evaluation the CLI runs — every classic number per set, and one global threshold for all.

For each pairs set (LFW-family .bin, or a listed pairs file) it embeds every image once (flip-sum,
L2-normalised), caches the embeddings as `.npy` keyed by model and set (so a set can be re-scored
without the model), and reports insightface's 10-fold accuracy and VAL@FAR, ROC TAR@FAR, the set's
own best single threshold, and — facebce's point — accuracy, TAR and FAR at ONE global threshold
shared by every set, chosen from a named source:
- `fit:union`  the best single threshold on all pairs sets pooled,
- `fit:<set>`  the best single threshold of one set (e.g. fit:lfw), applied to the others,
- `fixed:<t>`  a given cosine threshold,
- `bias`       the learned threshold of a -nu head (b/γ in cosine units), passed as `bias=`.
IJB sets are scored with facebce.eval.ijb and get TAR/FAR (and 1:N TPIR/FPIR) at that threshold.
Open-set folder sets (a labelled folder split into gallery and probes with never-enrolled
identities, facebce.eval.open_set) are embedded and cached like the pairs sets and get CMC,
DIR@FPIR and DIR/FPIR at that threshold; like IJB sets they never take part in fitting it.
A classification folder set (a labelled val set of a training run's own classes) is embedded once
per image (no flip, raw embeddings, as the head saw its training crops), scored against the run's
class centres like its head's `scores()`, and fills the uniform-classification section.
The 10-fold number refits its threshold per fold, so it is reported beside, never instead of, the
global-threshold accuracy.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from facebce import __version__
from facebce.data.image_folder import scan_image_folder
from facebce.data.verification_bin import distinct_indices, load_bin
from facebce.errors import ConfigError, DataFormatError, FacebceError
from facebce.eval.ijb import IjbResult, evaluate_ijb, embed_ijb, load_ijb
from facebce.eval.model_loading import ModelSpec, file_digest, learned_bias
from facebce.eval.open_set import GalleryProbeSplit, OpenSetSetResult, evaluate_open_set, split_gallery_probe
from facebce.eval.protocols import Protocol, get_protocol
from facebce.eval.roc import DEFAULT_TAR_MODE, FAR_TARGETS, TAR_MODES, Roc, TarAtFar
from facebce.eval.tenfold import TenFoldResult, check_fold_count, ten_fold
from facebce.eval.uniform import (UniformResult, bias_gap, class_wise_accuracy, class_wise_accuracy_opt,
                                  sample_wise_accuracy, uniform_accuracy)
from facebce.eval.verification import ThresholdResult, accuracy_at_threshold, best_threshold

PAIR_KINDS = ("pairs_bin", "pairs_list")
OPEN_SET_KIND = "open_set_folder"
CLASSIFICATION_KIND = "classification_folder"
THRESHOLD_SOURCES = "fit:union | fit:<set> | fixed:<t> | bias"
_CHUNK = 256  # images per embed call: a progress step, and a bound on the crops held at once
_TRUE = {"1", "true", "same", "yes", "genuine"}
_FALSE = {"0", "false", "diff", "different", "no", "impostor"}


@dataclass(frozen=True)
class GlobalThreshold:
    source: str  # as given: fit:union, fit:<set>, fixed:<t>, bias
    value: float  # cosine; a pair is accepted iff its score > value
    fitted_on: tuple[str, ...] = ()  # the sets a fit:* source was fitted on
    fitted_accuracy: float | None = None  # its accuracy on them


@dataclass(frozen=True)
class PairSetResult:
    name: str
    path: str
    n_pairs: int
    n_genuine: int
    embedding_size: int
    scores: np.ndarray  # cosine per pair (float64), kept for plots; not written to JSON
    issame: np.ndarray
    best: ThresholdResult  # the set's own best single threshold
    at_global: ThresholdResult  # the global threshold applied to this set
    ten_fold: TenFoldResult | None  # None when the protocol does not list it
    tar_at_far: TarAtFar | None  # None when not listed, or the set lacks genuine or impostor pairs


@dataclass(frozen=True)
class UniformSection:
    """Uniform classification (BCE paper, metrics.md §1) of a classifier's bias-free score matrix."""

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


@dataclass
class EvalReport:
    model: str
    flip: bool
    tar_mode: str
    threshold: GlobalThreshold
    sets: list[PairSetResult] = field(default_factory=list)
    ijb: list[IjbResult] = field(default_factory=list)
    open_set: list[OpenSetSetResult] = field(default_factory=list)
    uniform: UniformSection | None = None
    bias: float | None = None
    facebce_version: str = __version__
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"))

    def set(self, name: str) -> PairSetResult:
        for s in self.sets:
            if s.name == name:
                return s
        raise KeyError(name)


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
    `align(img_bgr, kps5x2) -> crop_bgr`, e.g. facebce.deploy.align.norm_crop.
    `uniform` = (score matrix, labels) of a classifier adds the uniform-classification section.

    Flip: an embedder with its own `flip` (OnnxEmbedder, TorchEmbedder) must agree with `flip` and
    does the flip-sum itself, on raw outputs as insightface does; any other embedder is mirrored here
    and its two outputs summed.
    """
    if tar_mode not in TAR_MODES:
        raise ConfigError(f"tar_mode={tar_mode!r}: expected one of {', '.join(TAR_MODES)}")
    bias = learned_bias(model, bias)  # a run folder's own b/γ when not given (threshold="bias", uniform gap)
    if out_dir is not None:
        from facebce.eval.report import check_out_dir
        check_out_dir(out_dir)  # refuse a bad --out before any embedding
    resolved = _resolve_protocols(protocols, protocol_paths)
    pair_sets = [(p, path) for p, path in resolved if p.kind in PAIR_KINDS]
    parsed = parse_threshold(threshold, [p.name for p, _ in pair_sets], bias)
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
    global_t = _global_threshold(parsed, {n: (_cosines(e), s) for n, (_, s, e) in scored.items()})
    sets = [_pair_set_result(p, *scored[p.name], global_t.value, far_targets, tar_mode) for p, _ in pair_sets]
    ijb = [_ijb_result(p, path, source, align, global_t.value, far_targets, tar_mode, flip, progress)
           for p, path in resolved if p.kind == "ijb"]
    open_set = [_open_set_result(p, path, folder, source, global_t.value) for p, path, folder in folders]
    if classify is not None:
        section = _classification_result(*classify, source, bias)
    else:
        section = uniform_section(*uniform, bias=bias) if uniform is not None else None
    report = EvalReport(model=source.label, flip=flip, tar_mode=tar_mode, threshold=global_t, sets=sets, ijb=ijb,
                        open_set=open_set, bias=bias, uniform=section)
    if out_dir is not None:
        from facebce.eval.report import write_report
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


# ----------------------------------------------------------------------------- global threshold

def parse_threshold(spec: str, pair_set_names: Sequence[str], bias: float | None) -> tuple[str, str | float | None]:
    """('union', None) | ('set', name) | ('fixed', t) | ('bias', b); a ConfigError before any embedding."""
    spec = str(spec).strip()
    if spec == "bias":
        if bias is None or not np.isfinite(bias):
            raise ConfigError(f"threshold 'bias' needs the learned threshold: pass bias=<b/γ> (got {bias!r})")
        return "bias", float(bias)
    kind, _, arg = spec.partition(":")
    if kind == "fixed":
        try:
            value = float(arg)
        except ValueError:
            value = float("nan")
        if not np.isfinite(value):
            raise ConfigError(f"threshold {spec!r}: fixed:<t> needs a finite number, e.g. fixed:0.3")
        return "fixed", value
    if kind == "fit" and arg:
        if not pair_set_names:
            raise ConfigError(f"threshold {spec!r} needs a pairs set to fit on (IJB and open-set sets are never "
                              "fitted on); add one, or use fixed:<t> or bias")
        if arg == "union":
            return "union", None
        if arg not in pair_set_names:
            raise ConfigError(f"threshold {spec!r}: no pairs set {arg!r} in this run ({', '.join(pair_set_names)})")
        return "set", arg
    raise ConfigError(f"threshold {spec!r}: expected {THRESHOLD_SOURCES}")


def _global_threshold(parsed, scored: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> GlobalThreshold:
    kind, arg = parsed
    if kind == "fixed":
        return GlobalThreshold(f"fixed:{arg:g}", arg)
    if kind == "bias":
        return GlobalThreshold("bias", arg)
    names = tuple(scored) if kind == "union" else (arg,)
    fit = best_threshold(np.concatenate([scored[n][0] for n in names]), np.concatenate([scored[n][1] for n in names]))
    return GlobalThreshold(f"fit:{'union' if kind == 'union' else arg}", fit.threshold, names, fit.accuracy)


# ----------------------------------------------------------------------------- pairs sets

@dataclass(frozen=True)
class PairImages:
    """A pairs set before embedding: pair k is images 2k and 2k+1; equal images are embedded once."""

    issame: np.ndarray
    first: np.ndarray  # image index of each distinct image
    inverse: np.ndarray  # per image: its row in `first`
    read: Callable[[np.ndarray], np.ndarray]  # image indices -> uint8 BGR batch
    digest: str  # of the set's files, for the cache key


def load_pairs(protocol: Protocol, path: str | os.PathLike, *, progress: bool = True) -> PairImages:
    """Read a pairs set of kind pairs_bin or pairs_list (images are decoded only when embedded)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such {protocol.name} file (protocol file name: {protocol['file']})")
    pairs = (_load_bin_pairs(path, protocol, progress) if protocol.kind == "pairs_bin"
             else _load_list_pairs(path, protocol))
    expected = protocol["pairs"]
    if expected is not None and expected != pairs.issame.size:
        warnings.warn(f"{path}: {pairs.issame.size} pairs, but protocol {protocol.name} has {expected}", stacklevel=3)
    return pairs


def _load_bin_pairs(path: Path, protocol: Protocol, progress: bool) -> PairImages:
    vs = load_bin(path)
    first, inverse = vs.distinct()
    decoded: list[np.ndarray] = []

    def read(index: np.ndarray) -> np.ndarray:
        if not decoded:  # decode once, on the first batch: a cached set never decodes
            decoded.append(vs.decode(image_size=protocol["image_size"], progress=progress))
        return np.ascontiguousarray(decoded[0][index][..., ::-1])  # RGB -> BGR, what embedders take

    return PairImages(vs.issame, first, inverse, read, file_digest(path))


def _load_list_pairs(path: Path, protocol: Protocol) -> PairImages:
    """`path1 path2 label` lines (whitespace or comma separated), images relative to `root`."""
    root = (path.parent / protocol["root"]).resolve()
    try:
        text = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: pairs list is not UTF-8 text (byte {e.start})") from None
    lines = [(i + 1, line) for i, line in enumerate(text) if line.strip() and not line.lstrip().startswith("#")]
    if protocol["header"]:
        lines = lines[1:]
    if not lines:
        raise DataFormatError(f"{path}: no pairs")
    comma = protocol["delimiter"] == "comma" or (protocol["delimiter"] == "auto" and "," in lines[0][1])
    images, issame = [], []
    for number, line in lines:
        fields = [f.strip() for f in line.split(",")] if comma else line.split()
        if len(fields) != 3:
            raise DataFormatError(f"{path}: line {number} has {len(fields)} fields, expected 'path1 path2 label'")
        label = fields[2].lower()
        if label not in _TRUE | _FALSE:
            raise DataFormatError(f"{path}: line {number} label {fields[2]!r}, expected 1/0, true/false or same/diff")
        images += [str(root / fields[0]), str(root / fields[1])]
        issame.append(label in _TRUE)
    first, inverse = distinct_indices(images)
    size = protocol["image_size"]

    def read(index: np.ndarray) -> np.ndarray:
        return np.stack([_read_crop(images[i], size, f"{path}: pair {i // 2 + 1}") for i in index])

    digest = hashlib.sha256(path.read_bytes() + str(root).encode()).hexdigest()
    return PairImages(np.array(issame), first, inverse, read, digest)


def _read_crop(image: str, size: int, where: str) -> np.ndarray:
    img = cv2.imread(image, cv2.IMREAD_COLOR)
    if img is None:
        raise DataFormatError(f"{where}: image {image} is missing or not decodable")
    if img.shape[:2] != (size, size):
        raise DataFormatError(f"{where}: image {image} is {img.shape[0]}x{img.shape[1]}, "
                              f"expected an aligned {size}x{size} crop")
    return img


def _cosines(emb: np.ndarray) -> np.ndarray:
    """Cosine of each pair (rows 2k, 2k+1 of L2-normalised embeddings), in float64."""
    e = emb.astype(np.float64)
    return np.sum(e[0::2] * e[1::2], axis=1)


def _pair_set_result(protocol: Protocol, path: str, issame: np.ndarray, emb: np.ndarray, t: float,
                     far_targets, tar_mode: str) -> PairSetResult:
    scores = _cosines(emb)
    tenfold = ten_fold(emb[0::2], emb[1::2], issame, n_folds=protocol["folds"]) \
        if "ten_fold" in protocol.metrics else None
    tar = None
    if "tar_at_far" in protocol.metrics and 0 < issame.sum() < issame.size:
        tar = Roc.from_labels(scores, issame).tar_at_far(far_targets if far_targets is not None else FAR_TARGETS,
                                                          tar_mode)
    return PairSetResult(name=protocol.name, path=path, n_pairs=int(issame.size), n_genuine=int(issame.sum()),
                         embedding_size=int(emb.shape[1]), scores=scores, issame=issame,
                         best=best_threshold(scores, issame), at_global=accuracy_at_threshold(scores, issame, t),
                         ten_fold=tenfold, tar_at_far=tar)


def _ijb_result(protocol, path, source, align, t, far_targets, tar_mode, flip, progress) -> IjbResult:
    meta = load_ijb(path, protocol)
    raw = source.ijb_features(meta, views=2 if flip else 1, align=align)
    options = protocol["template"]
    return evaluate_ijb(meta, raw, flip=options["flip"] if flip else "none", image_l2norm=options["image_l2norm"],
                        face_score_weight=options["face_score_weight"],
                        far_targets=far_targets if far_targets is not None else protocol["far_targets"],
                        tar_mode=tar_mode, threshold=t, identification="identification" in protocol.metrics,
                        progress=progress)


# ----------------------------------------------------------------------------- open-set folder sets

@dataclass(frozen=True)
class FolderImages:
    """A labelled folder before embedding (images in scan_image_folder order), and its split."""

    classes: list[str]
    paths: list[Path]
    labels: np.ndarray  # int64 per image: index into classes
    split: GalleryProbeSplit
    read: Callable[[np.ndarray], np.ndarray]
    digest: str  # of every image's relative path and bytes, for the cache key

    @property
    def first(self) -> np.ndarray:  # every image is distinct
        return np.arange(self.labels.size)

    @property
    def inverse(self) -> np.ndarray:
        return self.first


def _folder_reader(protocol: Protocol, root: Path, paths: list[Path]):
    """(read(indices) -> crops, digest of every file's relative path and bytes: the cache key)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    size = protocol["image_size"]

    def read(index: np.ndarray) -> np.ndarray:
        return np.stack([_read_crop(str(paths[i]), size, protocol.name) for i in index])

    return read, h.hexdigest()


def load_open_set_folder(protocol: Protocol, path: str | os.PathLike) -> FolderImages:
    """Scan ROOT/<identity>/*.jpg and split it with the protocol's settings (images are read only
    when embedded; the digest reads their bytes so a changed folder never hits a stale cache)."""
    path = Path(path)
    if not path.is_dir():
        raise DataFormatError(f"{path}: no such {protocol.name} folder (expected ROOT/<identity>/*.jpg)")
    classes, paths, labels = scan_image_folder(path)
    try:
        split = split_gallery_probe(labels, enrol_per_identity=protocol["enrol_per_identity"],
                                    unknown_fraction=protocol["unknown_fraction"], seed=protocol["seed"])
    except ConfigError as e:
        raise ConfigError(f"{protocol.name} ({protocol.source}) on {path}: {e}") from None
    return FolderImages(classes, paths, labels, split, *_folder_reader(protocol, path, paths))


def _open_set_result(protocol: Protocol, path: Path, folder: FolderImages, source: EmbeddingSource,
                     t: float) -> OpenSetSetResult:
    emb = source.image_embeddings(protocol.name, folder)
    return evaluate_open_set(emb, folder.labels, folder.split, threshold=t, fpir_targets=protocol["fpir_targets"],
                             ranks=protocol["ranks"], classes=folder.classes, name=protocol.name, path=str(path))


def uniform_section(scores, labels, *, bias: float | None = None, class_thresholds=None,
                    **where) -> UniformSection:
    """SW accuracy, Acc_Uni with t*, Acc_CW_opt (and Acc_CW at learned per-class thresholds when
    given), and the gap between a learned bias and t* (metrics.md §1). `where`: name, path, ... ."""
    result = uniform_accuracy(scores, labels)
    gap = bias_gap(bias, result.threshold) if bias is not None else None
    learned = class_wise_accuracy(scores, labels, class_thresholds).accuracy if class_thresholds is not None else None
    return UniformSection(sample_wise_accuracy(scores, labels), result, bias, gap,
                          class_wise_opt=class_wise_accuracy_opt(scores, labels).accuracy,
                          class_wise_learned=learned, **where)


# ----------------------------------------------------------------------------- classification folder sets

@dataclass(frozen=True)
class LabelledImages:
    """A labelled val set before embedding: every image distinct, labels = training class ids."""

    classes: list[str]
    labels: np.ndarray
    read: Callable[[np.ndarray], np.ndarray]
    digest: str

    @property
    def first(self) -> np.ndarray:
        return np.arange(self.labels.size)

    @property
    def inverse(self) -> np.ndarray:
        return self.first


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


def load_classification_folder(protocol: Protocol, path: str | os.PathLike) -> LabelledImages:
    """ROOT/<identity>/*.jpg with sorted identities as class ids 0..N-1 (at most `max_per_class`
    images each, the first in sorted order); the digest covers every used image's path and bytes."""
    path = Path(path)
    if not path.is_dir():
        raise DataFormatError(f"{path}: no such {protocol.name} folder (expected ROOT/<identity>/*.jpg)")
    classes, paths, labels = scan_image_folder(path)
    if protocol["max_per_class"] is not None:
        rank = np.arange(labels.size) - np.searchsorted(labels, labels, side="left")  # labels are sorted
        keep = np.flatnonzero(rank < protocol["max_per_class"])
        paths, labels = [paths[i] for i in keep], labels[keep]
    return LabelledImages(classes, labels, *_folder_reader(protocol, path, paths))


def _classification_result(protocol: Protocol, path: Path, images: LabelledImages, classifier,
                           source: "EmbeddingSource", bias: float | None) -> UniformSection:
    raw = source.raw_embeddings(protocol.name, images)
    scores = classifier.class_scores(raw)
    learned = classifier.threshold if classifier.threshold is not None else bias
    thresholds = None if classifier.class_thresholds is None else classifier.class_thresholds.numpy()
    return uniform_section(scores, images.labels, bias=learned, class_thresholds=thresholds, name=protocol.name,
                           path=str(path), n_samples=int(images.labels.size), num_classes=classifier.num_classes)


# ----------------------------------------------------------------------------- embeddings and their cache

class EmbeddingSource:
    """Where embeddings come from: the cache first, then the model (built once, only when needed)."""

    def __init__(self, model, *, flip: bool, cache_dir=None, model_name: str | None = None, progress: bool = True):
        self.model, self.flip, self.progress = model, flip, progress
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._built: dict[str, object] = {}
        if isinstance(model, ModelSpec):
            self.key = model_name or model.key
            self.label = model.describe()
        else:
            self.key = model_name
            self.label = model_name or getattr(model, "name", None) or type(model).__name__
        if model is None and (self.cache_dir is None or model_name is None):
            raise ConfigError("model=None re-scores cached embeddings: give cache_dir and model_name")
        if self.cache_dir is not None and self.key is None and not isinstance(model, Mapping):
            raise ConfigError("cache_dir needs a model_name to key the cache (or pass a ModelSpec)")
        if hasattr(model, "embed") and getattr(model, "flip", False) and not flip:
            raise ConfigError("evaluate(flip=False) but the embedder flips (its flip=True); make them agree")

    def image_embeddings(self, name: str, images: PairImages | FolderImages) -> np.ndarray:
        """L2-normalised float32 embeddings of every image of a pairs set (2P x D) or an open-set
        folder (N x D); the cache holds them as the model gave them (flip-summed), one row per image."""
        n_images = images.inverse.size
        if isinstance(self.model, Mapping):
            if name not in self.model:
                raise ConfigError(f"embeddings: none given for set {name!r} (have {', '.join(self.model)})")
            return _normalised(self.model[name], name, n_images)
        cache = self._cache_path(f"{name}-{images.digest[:16]}-{'flip' if self.flip else 'noflip'}")
        if cache is not None and cache.is_file():
            return _normalised(_load_npy(cache), f"{name} (cache {cache})", n_images)
        if self.model is None:
            raise ConfigError(f"{name}: no cached embeddings at {cache} and no model to compute them")
        raw = self._embed_distinct(self._embedder("crops"), images, name)[images.inverse]
        emb = _normalised(raw, name, n_images)
        if cache is not None:  # as computed, before normalising: a cache hit then gives the same bits
            _save_npy(cache, raw)
        return emb

    def raw_embeddings(self, name: str, images: LabelledImages) -> np.ndarray:
        """Raw float32 embeddings (no flip, not normalised: what a head scores in training) of every
        image of a classification set, cached apart from the flip-summed ones."""
        n_images = images.inverse.size
        cache = self._cache_path(f"{name}-{images.digest[:16]}-raw")
        if cache is not None and cache.is_file():
            raw = _load_npy(cache)
        else:
            raw = self._embed_distinct(self._embedder("classify"), images, name, mirror=False)
            if cache is not None:
                _save_npy(cache, raw)
        raw = np.asarray(raw, np.float32)
        if raw.ndim != 2 or raw.shape[0] != n_images or not np.isfinite(raw).all():
            raise DataFormatError(f"{name}: raw embeddings of shape {raw.shape} (expected {n_images} x D, finite)")
        return raw

    def ijb_features(self, meta, *, views: int, align) -> np.ndarray:
        """Raw per-image features (rows x views x D) of an IJB set, cached like the pairs sets."""
        if isinstance(self.model, Mapping):
            return _checked_raw(self.model[meta.name], meta.name, meta.templates.size, views)
        cache = self._cache_path(f"{meta.name}-{file_digest(meta.points_file)[:16]}-views{views}")
        if cache is not None and cache.is_file():
            return _checked_raw(_load_npy(cache), f"{meta.name} (cache {cache})", meta.templates.size, views)
        if self.model is None:
            raise ConfigError(f"{meta.name}: no cached features at {cache} and no model to compute them")
        if align is None:
            raise ConfigError(f"{meta.name}: IJB needs an align function (align=facebce.deploy.align.norm_crop)")
        embedder = self._embedder("ijb")
        if getattr(embedder, "flip", False):
            raise ConfigError(f"{meta.name}: the embedder flips; IJB needs the two views apart (flip=False)")
        if getattr(embedder, "normalize", False):
            warnings.warn(f"{meta.name}: the embedder L2-normalises, so image feature norms (eval_ijbc.py's "
                          "quality weight) are lost; build it with normalize=False", stacklevel=3)
        raw = _checked_raw(embed_ijb(meta, embedder, align, flip=views == 2, progress=self.progress),
                           meta.name, meta.templates.size, views)
        if cache is not None:
            _save_npy(cache, raw)
        return raw

    def _embedder(self, purpose: str):
        """The embedder; a ModelSpec is built with the flip/normalise each purpose needs."""
        if not isinstance(self.model, ModelSpec):
            return self.model
        if purpose not in self._built:
            crops = purpose == "crops"  # aligned crops, flip-summed and normalised; IJB wants the views apart;
            # "classify": single unflipped raw embeddings, as the head saw them in training
            self._built[purpose] = self.model.build(flip=self.flip and crops, normalize=crops)
        return self._built[purpose]

    def _embed_distinct(self, embedder, images, name: str, *, mirror: bool | None = None) -> np.ndarray:
        """Embeddings of the distinct images; the runner mirrors only embedders that do not flip themselves."""
        if mirror is None:
            mirror = self.flip and not getattr(embedder, "flip", False)
        out = []
        first = images.first
        for start in tqdm(range(0, first.size, _CHUNK), desc=f"embed {name}", unit="chunk",
                          disable=not self.progress):
            crops = images.read(first[start:start + _CHUNK])
            try:
                emb = np.asarray(embedder.embed(crops), np.float32)
                if mirror:
                    emb = emb + np.asarray(embedder.embed(np.ascontiguousarray(crops[:, :, ::-1])), np.float32)
            except FacebceError as e:
                raise type(e)(f"{name}: {e}") from None
            out.append(emb)
        return np.concatenate(out)

    def _cache_path(self, stem: str) -> Path | None:
        if self.cache_dir is None or self.key is None:
            return None
        return self.cache_dir / re.sub(r"[^\w.+-]", "_", self.key) / f"{stem}.npy"


def _normalised(emb, where: str, n_images: int) -> np.ndarray:
    """Check shape, NaN/Inf and zero norms (errors name the set), then L2-normalise in float32
    (embeddings already of unit length are returned as they are)."""
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] != n_images:
        raise DataFormatError(f"{where}: embeddings of shape {emb.shape}, expected {n_images} x D (one row per image)")
    emb = emb.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        raise DataFormatError(f"{where}: {bad.size} embeddings are NaN or Inf (first: image {bad[0]})")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise DataFormatError(f"{where}: {zero.size} embeddings have zero norm (first: image {zero[0]})")
    if np.all(np.abs(norms - 1) <= 1e-6):  # already unit length: keep the caller's bits
        return emb
    return emb / norms


def _checked_raw(raw, where: str, n_rows: int, views: int) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim != 3 or raw.shape[0] != n_rows or raw.shape[1] < views:
        raise DataFormatError(f"{where}: features of shape {raw.shape}, expected {n_rows} x {views} x D")
    bad = np.flatnonzero(~np.isfinite(raw).all(axis=(1, 2)))
    if bad.size:
        raise DataFormatError(f"{where}: {bad.size} images have NaN or Inf features (first: row {bad[0] + 1})")
    return raw[:, :views]


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{path}: unreadable cached embeddings ({e}); delete it to recompute") from None


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write beside `path` and rename over it: a reader never sees half an array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

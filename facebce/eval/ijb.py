"""IJB-B / IJB-C: template verification (1:1) and open-set identification (1:N), docs/metrics.md §5-6.

The pipeline is eval_ijbc.py's, split so each step can be cached and checked on its own:
`load_ijb` reads and cross-checks the meta files; `embed_ijb` aligns every loose crop with its five
points and embeds it and its mirror image; `image_features` applies the flip / norm / detector-score
options; `template_features` pools media then templates; `pair_scores` scores the template pairs;
`evaluate_ijb` reads ROC, TAR@FAR, 1:N and the operating point at a global threshold.

Alignment is a parameter (`align(img_bgr, kps5x2) -> crop_bgr`); the evaluation runner's default is
insightface's `norm_crop` (facebce.data.align, the geometry facebce.deploy's aligner uses too).

Pooling reproduces eval_ijbc.py's float32 arithmetic (rows summed in file order, media in ascending
id order) with `np.add.reduceat` instead of a Python loop per template, so template features are
bit-identical. Pair scores are a gather from the template Gram matrix, computed by BLAS in blocks
of rows (memory bounded) instead of gathering two 512-vectors per pair: IJB-C's 15.7M pairs cost
~23k x 23k / 2 dot products at BLAS speed, in float32 by default (same TAR@FAR table as
eval_ijbc.py's float64 scores on IJB-C-sized data; `precision="float64"` for scores within 1e-12).
The module runs over 450 lines because reading, validating, embedding, pooling and scoring are one
pipeline around the IjbMeta record; split, each part would need the others' private checks.
"""
from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facebce.errors import ConfigError, DataFormatError
from facebce.eval.identification import FPIR_TARGETS, OpenSetResult, ijb_evals_mean, open_set_identification
from facebce.eval.identification import operating_point
from facebce.eval.protocols import Protocol, get_protocol
from facebce.eval.roc import DEFAULT_TAR_MODE, FAR_TARGETS, Roc, TarAtFar
from facebce.eval.verification import ThresholdResult, accuracy_at_threshold
from facebce.fileio import read_bgr

FLIP_MODES = ("sum", "concat", "none")
PARITY_TAR_MODE = "insightface"  # eval_ijbc.py's reading, always reported beside the chosen mode
_POINTS_FIELDS = 12  # name, 5 x (x, y), detector score


@dataclass(frozen=True)
class IjbMeta:
    """The meta files of one IJB set, joined and validated; rows are face images in file order."""

    name: str
    root: Path  # folder holding meta/ and loose_crop/
    image_dir: Path
    points_file: Path  # the five-point file: with the images it fixes every crop (the feature cache key)
    image_names: np.ndarray  # str, per row
    templates: np.ndarray  # int64 template id per row
    medias: np.ndarray  # int64 media id per row
    landmarks: np.ndarray  # float32 (rows, 5, 2), arcface_dst order
    face_scores: np.ndarray  # float32 detector score per row
    pairs: np.ndarray  # int64 (P, 2) template ids
    labels: np.ndarray  # bool (P,), True = genuine
    galleries: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (tids, sids)
    probes: tuple[np.ndarray, np.ndarray] | None = None  # (template ids, subject ids)


@dataclass(frozen=True)
class IjbIdentification:
    galleries: Mapping[str, OpenSetResult]
    cmc: dict[int, float]  # ijb_evals' combination over the galleries (summed top-k over all probes)
    tpir: np.ndarray  # mean over galleries, at `fpir_targets`
    fpir_targets: np.ndarray
    at_threshold: Mapping[str, tuple[float, float]] | None = None  # gallery -> (TPIR, FPIR) at the global t


@dataclass(frozen=True)
class IjbResult:
    name: str
    options: dict  # flip, image_l2norm, face_score_weight
    n_images: int
    n_templates: int
    n_pairs: int
    n_genuine: int
    scores: np.ndarray  # pair scores, float32 or float64 by `precision` (not in JSON)
    labels: np.ndarray
    tar_at_far: TarAtFar  # in the requested mode (default conservative)
    tar_at_far_parity: TarAtFar  # eval_ijbc.py's reading, mode "insightface"
    at_threshold: ThresholdResult | None  # TAR/FAR at the global threshold (accept iff score > t)
    identification: IjbIdentification | None


# ----------------------------------------------------------------------------- reading the meta files

def resolve_root(path: str | os.PathLike, protocol: Protocol) -> Path:
    """The set's folder: `path` itself when it holds the meta folder, else `path/<folder>` (IJBC/)."""
    path = Path(path)
    for candidate in (path, path / protocol["folder"]):
        if (candidate / protocol["meta_dir"]).is_dir():
            return candidate
    raise DataFormatError(f"{path}: no {protocol['meta_dir']}/ folder here or in {path / protocol['folder']} "
                          f"({protocol.name} needs {protocol['folder']}/{protocol['meta_dir']} and "
                          f"{protocol['folder']}/{protocol['image_dir']})")


def load_ijb(path: str | os.PathLike, protocol: str | Protocol = "ijbc", *, check_sizes: bool = True) -> IjbMeta:
    """Read an IJB folder's meta files (docs/formats.md §6) and check that they fit together.

    Rows of the template/media file and the five-point file are joined by order, as eval_ijbc.py
    does; a differing image name on any row is an error rather than a silently wrong join.
    `check_sizes` warns when the counts differ from the protocol's `expected` sizes.
    """
    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
    if protocol.kind != "ijb":
        raise ConfigError(f"protocol {protocol.name!r} is of kind {protocol.kind!r}, not ijb")
    root = resolve_root(path, protocol)
    meta, files = root / protocol["meta_dir"], protocol["files"]
    names, templates, medias = _read_tid_mid(_need(meta / files["tid_mid"]))
    points_names, landmarks, scores = _read_five_points(_need(meta / files["five_points"]))
    _check_join(meta / files["tid_mid"], names, meta / files["five_points"], points_names)
    pairs, labels = _read_pairs(_need(meta / files["pairs"]))
    known = np.unique(templates)
    _check_known(pairs.ravel(), known, meta / files["pairs"])
    galleries, probes = {}, None
    one_to_n = [*files["galleries"], files["probes"]] if files["galleries"] else []
    missing = [f for f in one_to_n if f and not (meta / f).is_file()]
    if missing:  # eval_ijbc.py needs only the three 1:1 files: run 1:1, skip 1:N with a note
        warnings.warn(f"{meta}: {protocol.name} 1:N identification skipped (no {', '.join(missing)}); "
                      "1:1 verification runs", stacklevel=2)
        one_to_n = []
    if one_to_n:
        for g in files["galleries"]:
            name = Path(g).stem.rsplit("_", 1)[-1]  # ijbc_1N_gallery_G1.csv -> G1
            galleries[name] = _read_1n_csv(_need(meta / g))
            _check_known(galleries[name][0], known, meta / g)
        probes = _read_1n_csv(_need(meta / files["probes"]))
        _check_known(probes[0], known, meta / files["probes"])
    ijb = IjbMeta(protocol.name, root, root / protocol["image_dir"], meta / files["five_points"], names, templates,
                  medias, landmarks, scores, pairs, labels, galleries, probes)
    if check_sizes:
        _warn_sizes(ijb, known.size, protocol)
    return ijb


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataFormatError(f"{path}: IJB meta file is missing")
    return path


def _lines(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8") as f:
        return [line.split() for line in f if line.strip()]


def _read_tid_mid(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`image_name template_id media_id` per line."""
    rows = _lines(path)
    for i, row in enumerate(rows):
        if len(row) != 3:
            raise DataFormatError(f"{path}: line {i + 1} has {len(row)} fields, expected 3 (image tid mid)")
    if not rows:
        raise DataFormatError(f"{path}: no rows")
    names = np.array([r[0] for r in rows])
    ints = _ints([r[1:] for r in rows], path)
    return names, ints[:, 0], ints[:, 1]


def _read_five_points(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`image_name x1 y1 ... x5 y5 score` per line: 5 landmarks in arcface_dst order and a detector score."""
    rows = _lines(path)
    for i, row in enumerate(rows):
        if len(row) != _POINTS_FIELDS:
            raise DataFormatError(f"{path}: line {i + 1} has {len(row)} fields, expected {_POINTS_FIELDS} "
                                  "(image, 5 x/y points, score)")
    try:
        values = np.array([r[1:] for r in rows], dtype=np.float32)
    except ValueError as e:
        raise DataFormatError(f"{path}: non-numeric landmark or score ({e})") from None
    names = np.array([r[0] for r in rows])
    return names, values[:, :10].reshape(-1, 5, 2), values[:, 10]


def _ints(rows: list[list[str]], path: Path) -> np.ndarray:
    try:
        return np.array(rows, dtype=np.int64)
    except ValueError as e:
        raise DataFormatError(f"{path}: non-integer id ({e})") from None


def _check_join(tid_path: Path, names: np.ndarray, points_path: Path, points_names: np.ndarray) -> None:
    if names.size != points_names.size:
        raise DataFormatError(f"{points_path}: {points_names.size} rows but {tid_path.name} has {names.size} "
                              "(rows are joined by order)")
    bad = np.flatnonzero(names != points_names)
    if bad.size:
        i = int(bad[0])
        raise DataFormatError(f"{points_path}: row {i + 1} names {points_names[i]} but {tid_path.name} row {i + 1} "
                              f"names {names[i]} (rows are joined by order; {bad.size} rows differ)")


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`tid1 tid2 label` per line; parsed in C (IJB-C has 15.7M lines), checked line by line only when
    the count of numbers does not fit the count of lines."""
    data = path.read_bytes()
    try:
        values = np.fromstring(data, dtype=np.int64, sep=" ")
    except ValueError:
        values = None
    if values is None or values.size != 3 * (data.count(b"\n") + (not data.endswith(b"\n"))):
        _check_table(path, 3)  # names the first malformed line; passes when only blank lines differ
    if values is None or values.size % 3:
        raise DataFormatError(f"{path}: could not be parsed as 3 integers per line")
    values = values.reshape(-1, 3)
    if values.size == 0:
        raise DataFormatError(f"{path}: no template pairs")
    bad = np.flatnonzero((values[:, 2] != 0) & (values[:, 2] != 1))
    if bad.size:
        _check_table(path, 3)  # a line of 2 and one of 4 fields keep the count: name such a line first
        raise DataFormatError(f"{path}: pair {bad[0] + 1} has label {values[bad[0], 2]}, expected 0 or 1")
    return values[:, :2].copy(), values[:, 2] == 1


def _check_table(path: Path, columns: int) -> None:
    """Raise naming the first line that is not `columns` integers."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != columns:
                raise DataFormatError(f"{path}: line {i + 1} has {len(fields)} fields, expected {columns}")
            try:
                [int(x) for x in fields]
            except ValueError:
                raise DataFormatError(f"{path}: line {i + 1} has a non-integer field: {line.strip()!r}") from None


def _read_1n_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """1:N gallery/probe CSV: a header row, TEMPLATE_ID and SUBJECT_ID in the first two columns, one row
    per image; deduplicated by template keeping its first subject id (docs/formats.md §6)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise DataFormatError(f"{path}: no rows after the header")
    for i, r in enumerate(rows):
        if len(r) < 2:
            raise DataFormatError(f"{path}: line {i + 2} has {len(r)} columns, expected TEMPLATE_ID,SUBJECT_ID,...")
    ids = _ints([[r[0].strip(), r[1].strip()] for r in rows], path)
    _, first = np.unique(ids[:, 0], return_index=True)
    first = np.sort(first)  # keep file order of first appearance
    return ids[first, 0], ids[first, 1]


def _check_known(template_ids: np.ndarray, known: np.ndarray, path: Path) -> None:
    at = np.minimum(np.searchsorted(known, template_ids), known.size - 1)
    missing = template_ids[known[at] != template_ids]
    if missing.size:
        raise DataFormatError(f"{path}: template {missing[0]} has no image in the template/media file "
                              f"({np.unique(missing).size} unknown templates)")


def _warn_sizes(ijb: IjbMeta, n_templates: int, protocol: Protocol) -> None:
    found = {"rows": ijb.templates.size, "templates": n_templates, "pairs": len(ijb.pairs),
             "genuine": int(ijb.labels.sum())}
    off = [f"{k} {found[k]} (expected {v})" for k, v in protocol["expected"].items() if found[k] != v]
    if off:
        warnings.warn(f"{ijb.root}: {protocol.name} sizes differ from the published ones: {', '.join(off)}",
                      stacklevel=3)


# ----------------------------------------------------------------------------- embedding

def embed_ijb(meta: IjbMeta, embedder, align: Callable[[np.ndarray, np.ndarray], np.ndarray], *,
              flip: bool = True, chunk: int = 256, progress: bool = True) -> np.ndarray:
    """Per-image raw features, float32 (rows, views, D): view 0 the aligned crop, view 1 its mirror
    (when `flip`). eval_ijbc.py keeps the two views side by side the same way; `image_features` combines them.

    `embedder.embed` takes BGR uint8 crops; build it with `normalize=False` to keep the feature norm
    that eval_ijbc.py uses as a quality weight (a normalising embedder loses it).
    """
    n = meta.image_names.size
    out = None
    for start in tqdm(range(0, n, chunk), desc=f"embed {meta.name}", unit="chunk", disable=not progress):
        rows = range(start, min(start + chunk, n))
        crops = np.stack([_aligned(meta, i, align) for i in rows])
        views = [embedder.embed(crops)]
        if flip:
            views.append(embedder.embed(np.ascontiguousarray(crops[:, :, ::-1])))
        feats = np.stack([np.asarray(v, dtype=np.float32) for v in views], axis=1)
        if out is None:
            out = np.empty((n, *feats.shape[1:]), np.float32)
        out[rows.start:rows.stop] = feats
    return out


def _aligned(meta: IjbMeta, i: int, align) -> np.ndarray:
    path = meta.image_dir / str(meta.image_names[i])
    img = read_bgr(path)  # one-line DataFormatError naming the file when it is missing or not an image
    crop = np.asarray(align(img, meta.landmarks[i]))
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
        raise ConfigError(f"align returned {crop.dtype} {crop.shape} for {path}, expected a uint8 HxWx3 BGR crop")
    return crop


# ----------------------------------------------------------------------------- features and scores

def image_features(raw: np.ndarray, face_scores: np.ndarray | None = None, *, flip: str = "sum",
                   image_l2norm: bool = False, face_score_weight: bool = True) -> np.ndarray:
    """Per-image features for pooling (docs/metrics.md §5.2), float32 as in eval_ijbc.py.

    flip: "sum" = view 0 + view 1 ("F2", the default), "concat" = both side by side ("F1"),
    "none" = view 0 only. `image_l2norm` normalises each image (ijb_evals' use_norm_score=True);
    the default keeps the norm as a quality weight. `face_score_weight` multiplies by the detector score.
    """
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim != 3:
        raise DataFormatError(f"IJB features: need (images, views, D) from embed_ijb, got shape {raw.shape}")
    if flip not in FLIP_MODES:
        raise ConfigError(f"flip={flip!r}: expected one of {', '.join(FLIP_MODES)}")
    if flip != "none" and raw.shape[1] < 2:
        raise ConfigError(f"flip={flip!r} needs the mirrored view; these features have only one (embed with flip)")
    if face_score_weight and face_scores is None:
        raise ConfigError("face_score_weight=True needs the detector scores (IjbMeta.face_scores)")
    if flip == "sum":
        feats = raw[:, 0] + raw[:, 1]
    elif flip == "concat":
        feats = raw[:, :2].reshape(raw.shape[0], -1).copy()  # a fresh array: scaled in place below
    else:
        feats = raw[:, 0].copy()
    suspect = np.flatnonzero(~np.isfinite(feats.sum(axis=1)))  # one pass; a NaN/Inf makes its row sum one
    if suspect.size and not np.all(np.isfinite(feats[suspect])):
        raise DataFormatError(f"IJB features: {int(np.sum(~np.isfinite(feats[suspect]).all(1)))} images have "
                              "NaN/Inf features")
    if image_l2norm:
        feats /= np.sqrt(np.sum(feats ** 2, -1, keepdims=True))
    if face_score_weight:
        feats *= np.asarray(face_scores, dtype=np.float32)[:, None]  # in place: the same float32 product
    return feats


def template_features(img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(sorted template ids, L2-normalised float64 template features), docs/metrics.md §5.3.

    Images of one media are averaged, a template is the sum of its media, then L2-normalised;
    same float32 summation order as eval_ijbc.py's loops, so the features are bit-identical.
    """
    from sklearn.preprocessing import normalize  # eval_ijbc.py's normaliser, for bit parity

    feats = np.asarray(img_feats, dtype=np.float32)
    templates, medias = np.asarray(templates, np.int64), np.asarray(medias, np.int64)
    if not (feats.ndim == 2 and feats.shape[0] == templates.size == medias.size):
        raise DataFormatError(f"IJB features: {feats.shape} features for {templates.size} template rows")
    order = np.lexsort((medias, templates))  # stable: rows of one media keep their file order
    t, m = templates[order], medias[order]
    media_start = np.flatnonzero(np.r_[True, (t[1:] != t[:-1]) | (m[1:] != m[:-1])])
    media, media_size = _sequential_sums(feats, media_start, order)  # rows read through `order`: no sorted copy
    media /= media_size[:, None].astype(np.float32)  # x / 1 == x: single-image media pass through
    media_template = t[media_start]
    template_start = np.flatnonzero(np.r_[True, media_template[1:] != media_template[:-1]])
    pooled, _ = _sequential_sums(media, template_start)
    return media_template[template_start], normalize(pooled.astype(np.float64))


def _sequential_sums(rows: np.ndarray, start: np.ndarray, order: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Sum of each segment of rows[order][start[i]:start[i+1]], adding its rows one after another
    (the order np.sum(axis=0) uses; np.add.reduceat rounds differently), and the segment sizes.

    One vectorised step per row position: step k adds the k-th row of every segment longer than k.
    """
    n = len(rows) if order is None else len(order)
    size = np.diff(np.r_[start, n])
    by_size = np.argsort(-size, kind="stable")  # longest first: the live segments are a prefix
    first, ordered_size = start[by_size], size[by_size]
    if order is not None:
        first_row = order[first]
    else:
        first_row = first
    total = rows[first_row]
    live = np.searchsorted(-ordered_size, -np.arange(1, ordered_size[0]), side="left")  # segments longer than k
    for k, n_live in enumerate(live, start=1):
        at = first[:n_live] + k
        total[:n_live] += rows[at if order is None else order[at]]
    out = np.empty_like(total)
    out[by_size] = total
    return out, size


PRECISIONS = ("float32", "float64")
GRAM_BYTES = 256 << 20  # the largest block of the Gram matrix pair_scores holds at once


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray, *,
                precision: str = "float32", max_bytes: int = GRAM_BYTES, block: int | None = None,
                progress: bool = True) -> np.ndarray:
    """Cosine score of each template pair (dot of L2-normalised template features), a gather from
    the template Gram matrix.

    Of the Gram matrix only the part the pairs read is computed, whichever is smaller:
    - the rectangle of the templates in the pairs' first column against those in their second,
      when no template is in both columns (IJB-B/C's 1:1 protocols pair enrolment templates with
      verification templates: 3,531 x 19,593 for IJB-C, a quarter of the triangle), or
    - the upper triangle of all templates, pairs grouped by their lower template index (for pairs
      in no such layout).
    Either way the rows come in blocks of `block` templates (default: as many as fit in
    `max_bytes`; all of them for small sets), each one BLAS matrix product into one reused buffer
    whose entries the block's pairs read, so memory stays bounded at any size. Never one gathered
    dot product per pair. A pair and its reverse read the same value.

    precision "float32" (the default: twice BLAS's float64 speed, half the memory) returns float32
    scores within ~1e-6 of eval_ijbc.py's float64 ones; "float64" returns float64 scores within
    1e-12 of them.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    dtype = np.dtype(precision)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    index = _template_index(template_ids, pairs.ravel()).reshape(-1, 2)
    feats = np.ascontiguousarray(template_feats, dtype=dtype)
    n = len(feats)
    rows_at, rows = _dense_rank(index[:, 0], n)
    cols_at, cols = _dense_rank(index[:, 1], n)
    if len(rows) * len(cols) < n * (n + 1) // 2 and not np.intersect1d(rows, cols, assume_unique=True).size:
        return _gram_gather(feats[rows], np.ascontiguousarray(feats[cols]), rows_at, cols_at, dtype,
                            max_bytes, block, progress)
    lo, hi = index.min(axis=1), index.max(axis=1)
    return _gram_gather(feats, feats, lo, hi, dtype, max_bytes, block, progress, triangle=True)


def _dense_rank(values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rank of each value among the distinct ones, the distinct values ascending) for values in
    [0, n): a table lookup, no sort of the values."""
    present = np.zeros(n, bool)
    present[values] = True
    distinct = np.flatnonzero(present)
    rank = np.cumsum(present, dtype=np.int64) - 1
    return rank[values], distinct


def _gram_gather(left: np.ndarray, right: np.ndarray, i: np.ndarray, j: np.ndarray, dtype, max_bytes: int,
                 block: int | None, progress: bool, triangle: bool = False) -> np.ndarray:
    """out[p] = left[i[p]] . right[j[p]], from row blocks of left @ right.T. With `triangle` (left
    is right, i <= j) a block starting at row r multiplies right[r:] only."""
    n_right = len(right)
    if block is None:
        block = max(1, min(len(left), int(max_bytes) // max(1, n_right * dtype.itemsize)))
    group = i // block
    n_groups = int(group.max(initial=0)) + 1
    order = np.argsort(group.astype(np.uint16 if n_groups <= 1 << 16 else np.int64), kind="stable")
    bounds = np.searchsorted(group[order], np.arange(n_groups + 1))
    scores = np.empty(len(i), dtype)
    buffer = np.empty(min(block, len(left)) * n_right, dtype)  # one buffer for every block: no fresh pages
    for g in tqdm(range(n_groups), desc="pair scores", unit="block", disable=not progress):
        sel = order[bounds[g]:bounds[g + 1]]
        if sel.size == 0:
            continue
        first = g * block
        start = first if triangle else 0
        rows = left[first:first + block]
        width = n_right - start
        sims = buffer[:len(rows) * width].reshape(len(rows), width)
        np.matmul(rows, right[start:].T, out=sims)
        scores[sel] = sims.ravel()[(i[sel] - first) * width + (j[sel] - start)]
    return scores


def _template_index(template_ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Position of each queried id in the sorted `template_ids` (a table lookup when the ids are
    small integers, as in the IJB files; else a binary search); an unknown id is a DataFormatError."""
    if template_ids.size and 0 <= template_ids[0] and template_ids[-1] < 64 * template_ids.size + (1 << 20):
        table = np.full(int(template_ids[-1]) + 1, -1, np.int64)
        table[template_ids] = np.arange(template_ids.size)
        inside = (query >= 0) & (query < table.size)
        at = np.where(inside, table[np.where(inside, query, 0)], -1)
        bad = at < 0
    else:
        at = np.minimum(np.searchsorted(template_ids, query), template_ids.size - 1)
        bad = template_ids[at] != query
    if bad.any():
        raise DataFormatError(f"template {query[bad][0]} has no features ({np.unique(query[bad]).size} unknown)")
    return at


# ----------------------------------------------------------------------------- metrics

def identify(template_ids: np.ndarray, template_feats: np.ndarray, galleries, probes, *,
             fpir_targets=FPIR_TARGETS, threshold: float | None = None) -> IjbIdentification:
    """Open-set 1:N per gallery (docs/metrics.md §6, ijb_evals' conventions) and their G1/G2 combination."""
    probe_tids, probe_sids = probes
    probe_feats = template_feats[_template_index(template_ids, probe_tids)]
    results, at_t = {}, {}
    for name, (tids, sids) in galleries.items():
        sim = probe_feats @ template_feats[_template_index(template_ids, tids)].T
        results[name] = open_set_identification(sim, probe_sids, sids, fpir_targets)
        if threshold is not None:
            p = operating_point(sim, probe_sids, sids, threshold)
            at_t[name] = (p.tpir, p.fpir)
    cmc, tpir = ijb_evals_mean(list(results.values()))
    return IjbIdentification(results, cmc, tpir, np.asarray(fpir_targets, np.float64),
                             at_t if threshold is not None else None)


def evaluate_ijb(meta: IjbMeta, raw: np.ndarray, *, flip: str = "sum", image_l2norm: bool = False,
                 face_score_weight: bool = True, far_targets=None, tar_mode: str = DEFAULT_TAR_MODE,
                 threshold: float | None = None, identification: bool = True, precision: str = "float32",
                 progress: bool = True) -> IjbResult:
    """1:1 TAR@FAR (in `tar_mode` and in eval_ijbc.py's mode for parity) and 1:N, from `embed_ijb` features.

    `threshold` (a global threshold from elsewhere, accept iff score > t) adds TAR/FAR there and
    TPIR/FPIR per gallery there. `precision`: the pair scores' arithmetic (see `pair_scores`).
    """
    if raw.shape[0] != meta.templates.size:
        raise DataFormatError(f"{meta.root}: {raw.shape[0]} feature rows for {meta.templates.size} meta rows")
    tids, tfeats = _template_feats(meta, raw, flip, image_l2norm, face_score_weight)
    scores = pair_scores(tids, tfeats, meta.pairs, precision=precision, progress=progress)
    targets = np.asarray(far_targets if far_targets is not None else FAR_TARGETS, dtype=np.float64)
    roc = Roc.from_labels(scores, meta.labels)
    ident = (identify(tids, tfeats, meta.galleries, meta.probes, threshold=threshold)
             if identification and meta.galleries and meta.probes is not None else None)
    return IjbResult(
        name=meta.name, options={"flip": flip, "image_l2norm": image_l2norm, "face_score_weight": face_score_weight},
        n_images=int(meta.templates.size), n_templates=int(tids.size), n_pairs=int(scores.size),
        n_genuine=int(meta.labels.sum()), scores=scores, labels=meta.labels,
        tar_at_far=roc.tar_at_far(targets, tar_mode), tar_at_far_parity=roc.tar_at_far(targets, PARITY_TAR_MODE),
        at_threshold=accuracy_at_threshold(scores, meta.labels, threshold) if threshold is not None else None,
        identification=ident,
    )


def _template_feats(meta: IjbMeta, raw: np.ndarray, flip: str, image_l2norm: bool, face_score_weight: bool):
    feats = image_features(raw, meta.face_scores, flip=flip, image_l2norm=image_l2norm,
                           face_score_weight=face_score_weight)
    return template_features(feats, meta.templates, meta.medias)


def template_pair_scores(meta: IjbMeta, raw: np.ndarray, *, flip: str = "sum", image_l2norm: bool = False,
                         face_score_weight: bool = True, precision: str = "float32", progress: bool = True
                         ) -> np.ndarray:
    """The 1:1 pair scores exactly as `evaluate_ijb` computes them (same options, same arithmetic)."""
    if raw.shape[0] != meta.templates.size:
        raise DataFormatError(f"{meta.root}: {raw.shape[0]} feature rows for {meta.templates.size} meta rows")
    tids, tfeats = _template_feats(meta, raw, flip, image_l2norm, face_score_weight)
    return pair_scores(tids, tfeats, meta.pairs, precision=precision, progress=progress)


def pair_subjects(meta: IjbMeta) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Subject codes (0..n-1) of each 1:1 pair's two templates, from the 1:N gallery/probe files, and n;
    None when those files are absent or leave a pair's template without a subject. A template given two
    subjects, or a pair whose label disagrees with its templates' subjects, is a one-line error."""
    known = [meta.probes, *meta.galleries.values()] if meta.probes is not None else []
    if not known:
        return None
    tids = np.concatenate([t for t, _ in known])
    sids = np.concatenate([s for _, s in known])
    tids, first, inverse = np.unique(tids, return_index=True, return_inverse=True)
    clash = sids != sids[first][inverse]
    if clash.any():
        raise DataFormatError(f"{meta.root}: template {np.concatenate([t for t, _ in known])[clash][0]} has two "
                              "subject ids in the 1:N gallery/probe files")
    sids = sids[first]
    at = np.minimum(np.searchsorted(tids, meta.pairs), tids.size - 1)
    if np.any(tids[at] != meta.pairs):
        return None
    subjects, codes = np.unique(sids[at], return_inverse=True)
    codes = codes.reshape(meta.pairs.shape)
    wrong = (codes[:, 0] == codes[:, 1]) != meta.labels
    if wrong.any():
        i = int(np.argmax(wrong))
        raise DataFormatError(f"{meta.root}: pair {meta.pairs[i, 0]} {meta.pairs[i, 1]} is labelled "
                              f"{int(meta.labels[i])} but its templates' subjects say otherwise (1:N files)")
    return codes[:, 0].astype(np.int64), codes[:, 1].astype(np.int64), int(subjects.size)

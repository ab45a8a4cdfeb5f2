"""Evaluation image sets before embedding: what to read, which images are the same, and a digest for the cache.

One type, `ImageSet`, for every kind of set read from files:
- pairs sets (`pairs_bin` .bin files, `pairs_list` text files): pair k is images 2k and 2k+1,
  `issame` per pair; equal images are embedded once (`first`, `inverse`);
- open-set folders (`open_set_folder`): ROOT/<identity>/*.jpg, `labels` per image and the
  gallery/probe `split`;
- classification folders (`classification_folder`): ROOT/<identity>/*.jpg with sorted identities
  as a training run's class ids, at most `max_per_class` images each.
Images are decoded only when embedded (`read`), so a set whose embeddings are cached is never decoded.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facebce.data.image_folder import scan_image_folder
from facebce.data.verification_bin import distinct_indices, load_bin
from facebce.errors import ConfigError, DataFormatError
from facebce.eval.model_loading import file_digest
from facebce.eval.open_set import GalleryProbeSplit, split_gallery_probe
from facebce.eval.protocols import Protocol
from facebce.fileio import read_bgr

_TRUE = {"1", "true", "same", "yes", "genuine"}
_FALSE = {"0", "false", "diff", "different", "no", "impostor"}


@dataclass(frozen=True)
class ImageSet:
    """A set before embedding. `first`: image index of each distinct image; `inverse`: per image, its
    row in `first` (for folders every image is distinct: both are 0..N-1)."""

    read: Callable[[np.ndarray], np.ndarray]  # image indices -> uint8 BGR batch
    digest: str  # of the set's files (paths and bytes), for the cache key
    first: np.ndarray
    inverse: np.ndarray
    issame: np.ndarray | None = None  # pairs sets: bool per pair
    classes: list[str] | None = None  # folder sets: identity folder names, sorted
    labels: np.ndarray | None = None  # folder sets: int64 per image, index into classes
    split: GalleryProbeSplit | None = None  # open-set folders: gallery and probes

    @property
    def n_images(self) -> int:
        return int(self.inverse.size)


def load_pairs(protocol: Protocol, path: str | os.PathLike, *, progress: bool = True) -> ImageSet:
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


def _load_bin_pairs(path: Path, protocol: Protocol, progress: bool) -> ImageSet:
    vs = load_bin(path)
    first, inverse = vs.distinct()
    decoded: list[np.ndarray] = []

    def read(index: np.ndarray) -> np.ndarray:
        if not decoded:  # decode once, on the first batch: a cached set never decodes
            decoded.append(vs.decode(image_size=protocol["image_size"], progress=progress))
        return np.ascontiguousarray(decoded[0][index][..., ::-1])  # RGB -> BGR, what embedders take

    return ImageSet(read, file_digest(path), first, inverse, issame=vs.issame)


def _load_list_pairs(path: Path, protocol: Protocol) -> ImageSet:
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
    return ImageSet(read, digest, first, inverse, issame=np.array(issame))


def _read_crop(image: str, size: int, where: str) -> np.ndarray:
    try:
        img = read_bgr(image)
    except DataFormatError as e:
        raise DataFormatError(f"{where}: image {e}") from None
    if img.shape[:2] != (size, size):
        raise DataFormatError(f"{where}: image {image} is {img.shape[0]}x{img.shape[1]}, "
                              f"expected an aligned {size}x{size} crop")
    return img


def _folder_set(protocol: Protocol, root: Path, classes: list[str], paths: list[Path], labels: np.ndarray,
                split: GalleryProbeSplit | None = None) -> ImageSet:
    """A folder set of distinct images; its digest covers every file's relative path and bytes, so a
    changed folder never hits a stale cache."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    size = protocol["image_size"]

    def read(index: np.ndarray) -> np.ndarray:
        return np.stack([_read_crop(str(paths[i]), size, protocol.name) for i in index])

    every = np.arange(labels.size)
    return ImageSet(read, h.hexdigest(), every, every, classes=classes, labels=labels, split=split)


def load_open_set_folder(protocol: Protocol, path: str | os.PathLike) -> ImageSet:
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
    return _folder_set(protocol, path, classes, paths, labels, split)


def load_classification_folder(protocol: Protocol, path: str | os.PathLike) -> ImageSet:
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
    return _folder_set(protocol, path, classes, paths, labels)

"""MS1M-style RecordIO training sets (train.rec / train.idx / property), as insightface packs them.

Record layout and header detection follow docs/formats.md §3; samples match ImageFolderDataset's.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from facebce.data.recordio import (FLOAT32_EXACT_MAX, IndexedRecordReader, IRHeader, class_of,
                                   unpack_image_record)
from facebce.data.transforms import decode_image, eval_transform, train_transform
from facebce.errors import DataFormatError


def read_property(path: str | os.PathLike) -> tuple[int, tuple[int, int]]:
    """(num_classes, (H, W)) from the first line of a `property` file ('85742,112,112')."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: property file not found (an MS1M-style pack needs "
                              f"'<num_classes>,<H>,<W>' beside train.rec)")
    try:
        first = path.read_bytes()[:4096].decode("utf-8").partition("\n")[0].strip()
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        if e.start < 4090:  # not a multi-byte character cut by the 4 KiB read
            raise DataFormatError(f"{path}: property file is not UTF-8 text (byte {e.start}); expected "
                                  f"'<num_classes>,<H>,<W>'") from None
        first = path.read_bytes()[:e.start].decode("utf-8").partition("\n")[0].strip()
    try:
        num_classes, h, w = (int(v) for v in first.split(","))
    except ValueError:
        raise DataFormatError(f"{path}: line 1: expected '<num_classes>,<H>,<W>', got {first[:80]!r}") from None
    if min(num_classes, h, w) < 1:
        raise DataFormatError(f"{path}: line 1: values must be positive, got {first!r}")
    return num_classes, (h, w)


def rec_path_of(root_or_rec_path: str | os.PathLike) -> Path:
    """The train.rec of a pack given as its folder or its .rec; a missing folder, a file that is not
    a .rec (a verification .bin, say) or a folder without train.rec is one line naming it."""
    path = Path(root_or_rec_path)
    if path.is_dir():
        rec = path / "train.rec"
        if not rec.is_file():
            raise DataFormatError(f"{path}: no train.rec in this folder (an MS1M-style pack is a folder with "
                                  f"train.rec, train.idx and property)")
        return rec
    if not path.exists():
        raise DataFormatError(f"{path}: no such pack folder or .rec file")
    if path.suffix.lower() == ".bin" or _looks_like_pickle(path):
        raise DataFormatError(f"{path}: is a verification .bin (pairs for evaluation), not a training pack; "
                              f"give the pack's folder (train.rec, train.idx, property)")
    if path.suffix.lower() != ".rec":
        raise DataFormatError(f"{path}: not a .rec file or a pack folder (train.rec, train.idx, property)")
    return path


def _looks_like_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"  # pickle protocol 2+ opcode; a .rec starts with the magic word
    except OSError:
        return False


class RecDataset(Dataset):
    """Face crops from an MS1M-style pack; samples are (FloatTensor[3,H,W] normalised, int label).

    `root_or_rec_path` is the pack directory or its .rec file (the .idx and `property` sit beside
    it). Labels are known without decoding images: from the identity records when the pack has a
    face2rec2 header, otherwise from each record's IRHeader (one read pass at construction).
    """

    def __init__(self, root_or_rec_path: str | os.PathLike, train: bool = True,
                 transform: Callable[[np.ndarray], torch.Tensor] | None = None):
        self.rec_path = rec_path_of(root_or_rec_path)
        self.num_classes, self.image_size = read_property(self.rec_path.parent / "property")
        self._reader = IndexedRecordReader(self.rec_path, self.rec_path.with_suffix(".idx"))
        self.transform = transform or (train_transform if train else eval_transform)
        self._own_transform = transform is None  # ours take RGB views of the decoded BGR buffer
        self._identities: tuple[int, int] | None = None  # [a, b) of the identity records, when there are some
        self.keys, labels = self._index()
        self.labels = self._checked_labels(labels)
        self._check_class_count()

    def __len__(self) -> int:
        return len(self.keys)

    def raw(self, i: int) -> tuple[bytes, int]:
        """The record's image bytes, undecoded, and its label."""
        return self._image_bytes(int(self.keys[i])), int(self.labels[i])

    def decoded(self, i: int) -> tuple[np.ndarray, int]:
        """(the decoded RGB uint8 image, label) before the transform; a view of OpenCV's BGR buffer
        when the transform is facebce's own (which reads views), else a contiguous array."""
        key = int(self.keys[i])
        img = decode_image(self._image_bytes(key), where=self._reader.place(key), size=self.image_size,
                           contiguous=not self._own_transform)
        return img, int(self.labels[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.decoded(i)
        return self.transform(img), label

    def _record(self, key: int) -> tuple[IRHeader, float | np.ndarray, bytes]:
        return unpack_image_record(self._reader.read(key), where=self._reader.place(key))

    def _image_bytes(self, key: int) -> bytes:
        return self._record(key)[2]

    # ------------------------------------------------------------ indexing

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """(record keys, float labels) of the image records, per the layout docs/formats.md §3 describes."""
        header = self._header_range()
        if header is None:  # RecBuilder-style: every record is an image
            keys = np.asarray(self._reader.keys, dtype=np.int64)
            return keys, self._labels_from_records(keys)
        a, b = header
        if b > FLOAT32_EXACT_MAX:
            warnings.warn(f"{self._reader.where(0)}: header range [{a}, {b}) exceeds float32's exact "
                          f"integers (2^24); using the .idx keys and per-record labels instead", stacklevel=3)
            return self._scan_image_records()
        keys = np.arange(1, a, dtype=np.int64)
        self._require_keys(range(1, b), f"header [{a}, {b}) names record keys 1..{b - 1}")
        if a == b:  # header but no identity records
            return keys, self._labels_from_records(keys)
        self._identities = (a, b)
        return keys, self._labels_from_identities(a, b)

    def _header_range(self) -> tuple[int, int] | None:
        """[a, b) from a face2rec2 header record 0, or None if record 0 is an ordinary image record.

        flag > 0 alone (arcface_torch's test) would misread an image record with an array label.
        """
        if 0 not in self._reader:
            return None
        header, label, img = self._record(0)
        if header.flag < 2 or img:
            return None
        a, b = float(label[0]), float(label[1])
        return (int(a), int(b)) if 1 <= a <= b and math.isfinite(b) else None

    def _require_keys(self, keys: range, why: str) -> None:
        missing = next((k for k in keys if k not in self._reader), None)
        if missing is not None:
            raise DataFormatError(f"{self._reader.idx_path}: record {missing}: missing from the .idx, "
                                  f"but the {why}")

    def _labels_from_records(self, keys: np.ndarray) -> np.ndarray:
        return np.array([class_of(self._record(int(k))[1]) for k in keys], dtype=np.float64)

    def _scan_image_records(self) -> tuple[np.ndarray, np.ndarray]:
        """Every record with image bytes, skipping the header and identity records (which have none)."""
        keys, labels = [], []
        for key in self._reader.keys:
            _, label, img = self._record(key)
            if img:
                keys.append(key)
                labels.append(class_of(label))
        return np.asarray(keys, dtype=np.int64), np.asarray(labels, dtype=np.float64)

    def _labels_from_identities(self, a: int, b: int) -> np.ndarray:
        """Labels from identity records a..b-1: class k owns image keys [start, end) of record a+k.

        The ranges must tile keys 1..a-1 in order; the first and last image of every class are
        read to confirm their own labels agree, which catches shifted or reordered identities.
        """
        labels = np.empty(a - 1, dtype=np.float64)
        next_start = 1
        for cls, key in enumerate(range(a, b)):
            where = self._reader.where(key)
            header, label, img = self._record(key)
            if header.flag < 2 or img:
                raise DataFormatError(f"{where}: identity record needs a [start, end) label and no image "
                                      f"bytes (flag {header.flag}, {len(img)} image bytes)")
            if not np.isfinite(label[:2]).all():
                raise DataFormatError(f"{where}: identity {cls} has range {label[:2].tolist()}, expected record keys")
            start, end = int(label[0]), int(label[1])
            if start != next_start or end < start or end > a:
                raise DataFormatError(f"{where}: identity {cls} covers keys [{start}, {end}), expected a "
                                      f"range starting at {next_start} (ranges must tile keys 1..{a - 1})")
            labels[start - 1:end - 1] = cls
            self._check_identity_ends(key, cls, start, end)
            next_start = end
        if next_start != a:
            raise DataFormatError(f"{self._reader.where(b - 1)}: identity ranges end at key {next_start - 1}, "
                                  f"but the images are keys 1..{a - 1}")
        return labels

    def _check_identity_ends(self, identity_key: int, cls: int, start: int, end: int) -> None:
        for key in sorted({start, end - 1}) if end > start else ():
            found = class_of(self._record(key)[1])
            if found != cls:
                raise DataFormatError(f"{self._reader.where(key)}: label {found:g}, but identity record "
                                      f"{identity_key} places it in class {cls}")

    def _check_class_count(self) -> None:
        """`property` must declare as many classes as the pack has identity records: a count that
        disagrees would train a head with classes no image teaches (or fail on the first label)."""
        if self._identities is None:
            return
        a, b = self._identities
        if b - a != self.num_classes:
            raise DataFormatError(f"{self.rec_path.parent / 'property'}: declares {self.num_classes} classes, but "
                                  f"{self.rec_path} has {b - a} identity records (header [{a}, {b})); the first "
                                  f"number in property must be the number of identities")

    def _checked_labels(self, labels: np.ndarray) -> np.ndarray:
        """int64 labels, each an integer in [0, num_classes) as `property` declares."""
        bad = (labels < 0) | (labels >= self.num_classes) | (labels != np.floor(labels))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataFormatError(f"{self._reader.where(int(self.keys[i]))}: label {labels[i]:g} is not a "
                                  f"class id in [0, {self.num_classes}) (num_classes from property)")
        return labels.astype(np.int64)

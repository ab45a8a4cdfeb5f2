"""Image-folder face datasets: `root/<identity>/*.jpg|png`, one sorted subfolder per class.

The same layout feeds `pack_image_folder`, so a folder and its packed .rec give the same samples
in the same order.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from facebce.data.transforms import decode_image, eval_transform, train_transform
from facebce.errors import DataFormatError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[Path], np.ndarray]:
    """(identity names, image paths, int64 labels): identities sorted, files sorted within each.

    Hidden entries and files without an image suffix are ignored; an identity without images
    is an error because it would become a class no sample can teach.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(f"{root}: not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataFormatError(f"{root}: no identity subfolders")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir()
                       if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file())
        if not files:
            raise DataFormatError(f"{root / name}: identity folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        paths += files
        labels += [label] * len(files)
    return classes, paths, np.asarray(labels, dtype=np.int64)


class ImageFolderDataset(Dataset):
    """Face crops from an image folder; samples are (FloatTensor[3,H,W] normalised, int label).

    Every image must decode to `image_size` = (H, W); the check happens when a sample is read.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True,
                 transform: Callable[[np.ndarray], torch.Tensor] | None = None,
                 image_size: tuple[int, int] = (112, 112)):
        self.root = Path(root)
        self.classes, self.paths, self.labels = scan_image_folder(self.root)
        self.num_classes = len(self.classes)
        self.image_size = tuple(image_size)
        self.transform = transform or (train_transform if train else eval_transform)
        self._own_transform = transform is None  # ours take RGB views of the decoded BGR buffer

    def __len__(self) -> int:
        return len(self.paths)

    def raw(self, i: int) -> tuple[bytes, int]:
        """The file's bytes, undecoded, and its label."""
        try:
            return self.paths[i].read_bytes(), int(self.labels[i])
        except OSError as e:
            raise DataFormatError(f"{self.paths[i]}: cannot read ({e.strerror or e})") from None

    def decoded(self, i: int) -> tuple[np.ndarray, int]:
        """(the decoded RGB uint8 image, label) before the transform (a view when the transform is ours)."""
        data, label = self.raw(i)
        img = decode_image(data, where=str(self.paths[i]), size=self.image_size,
                           contiguous=not self._own_transform)
        return img, label

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.decoded(i)
        return self.transform(img), label

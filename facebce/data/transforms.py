"""Decoding and the arcface_torch training pipeline: decode RGB -> random flip -> (x-127.5)/127.5, CHW float.

OpenCV decodes (no torchvision); augmentation uses torch's RNG so that DataLoader worker seeding
and `torch.manual_seed` make it reproducible.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from facebce.errors import DataFormatError

# cv2 threads fight DataLoader workers for the same cores; decoding one small image needs none.
cv2.setNumThreads(1)

INPUT_MEAN = 127.5
INPUT_STD = 127.5


def decode_image(buf: bytes | np.ndarray, *, where: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode JPEG/PNG bytes to an RGB uint8 HxWx3 array.

    `where` names the file and record for the error message; `size` = (H, W) is checked when given.
    """
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    img = cv2.imdecode(arr, cv2.IMREAD_COLOR) if arr.size else None
    if img is None:
        raise DataFormatError(f"{where}: image bytes do not decode ({arr.size} bytes)")
    if size is not None and img.shape[:2] != tuple(size):
        raise DataFormatError(
            f"{where}: image is {img.shape[0]}x{img.shape[1]}, expected {size[0]}x{size[1]}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def to_tensor(img_rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xHxW float32 in [-1, 1] ((x - 127.5) / 127.5, as insightface trains)."""
    # One numpy pass (transpose + cast) is faster than permuting a torch view; same bits.
    chw = img_rgb.transpose(2, 0, 1).astype(np.float32)
    return torch.from_numpy((chw - np.float32(INPUT_MEAN)) / np.float32(INPUT_STD))


def random_hflip(img_rgb: np.ndarray, p: float = 0.5) -> np.ndarray:
    """Flip left-right with probability p, drawing from torch's RNG (seeded per DataLoader worker)."""
    if p > 0 and torch.rand(()).item() < p:
        return img_rgb[:, ::-1]
    return img_rgb


def train_transform(img_rgb: np.ndarray) -> torch.Tensor:
    """arcface_torch's training pipeline: random horizontal flip, then normalise."""
    return to_tensor(random_hflip(img_rgb))


def eval_transform(img_rgb: np.ndarray) -> torch.Tensor:
    return to_tensor(img_rgb)

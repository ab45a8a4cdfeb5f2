"""Decoding and the arcface_torch training pipeline: decode RGB -> random flip -> (x-127.5)/127.5, CHW float.

OpenCV decodes (no torchvision); augmentation uses torch's RNG so that DataLoader worker seeding
and `torch.manual_seed` make it reproducible.

Speed (the decode is the floor): the datasets decode to a BGR array and hand the transform an RGB
*view* of it (`decode_image(contiguous=False)`), the flip is a view too, and `to_tensor` turns the
view into normalised CHW float32 in one numpy pass, so no intermediate image is copied.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from facebce.errors import DataFormatError
from facebce.fileio import decode_bgr

# cv2 threads fight DataLoader workers for the same cores; decoding one small image needs none.
cv2.setNumThreads(1)

INPUT_MEAN = 127.5
INPUT_STD = 127.5


def decode_image(buf: bytes | np.ndarray, *, where: str, size: tuple[int, int] | None = None,
                 contiguous: bool = True) -> np.ndarray:
    """Decode JPEG/PNG bytes to an RGB uint8 HxWx3 array.

    Decoding goes through `facebce.fileio.decode_bgr`, the one image-reading path: the pixel count
    in the header is checked before OpenCV allocates anything. `where` names the file and record
    for the error message; `size` = (H, W) is checked when given.
    `contiguous=False` returns the RGB channels as a reversed view of OpenCV's BGR buffer (no copy:
    fine for numpy and `to_tensor`, not for OpenCV calls or `torch.from_numpy`).
    """
    if not len(buf):
        raise DataFormatError(f"{where}: image bytes do not decode (0 bytes: empty)")
    img = decode_bgr(buf, where=where)  # header-checked: a decompression bomb is refused before decoding
    if size is not None and img.shape[:2] != tuple(size):
        raise DataFormatError(
            f"{where}: image is {img.shape[0]}x{img.shape[1]}, expected {size[0]}x{size[1]}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if contiguous else img[:, :, ::-1]


def to_tensor(img_rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB (any strides: views welcome) -> 3xHxW float32 in [-1, 1] ((x - 127.5) / 127.5,
    as insightface trains). One cast-subtract pass straight into the CHW buffer, then one in-place
    divide: bit-identical to `(chw.astype(float32) - 127.5) / 127.5`, without its temporaries."""
    out = np.empty((3,) + img_rgb.shape[:2], np.float32)
    _normalise_into(img_rgb, out)
    return torch.from_numpy(out)


def _normalise_into(img_rgb: np.ndarray, out: np.ndarray) -> None:
    """(x - 127.5) / 127.5 of an HxWx3 uint8 image written into a 3xHxW float32 array."""
    np.subtract(img_rgb.transpose(2, 0, 1), np.float32(INPUT_MEAN), out=out, dtype=np.float32)
    np.divide(out, np.float32(INPUT_STD), out=out)


def to_batch(images, *, shared: bool = False) -> torch.Tensor:
    """N HxWx3 uint8 RGB images (views welcome) -> N x 3 x H x W float32, bit-identical to stacking
    `to_tensor` of each: every image is cast-subtracted straight into its slot of one batch buffer and
    divided there, so no per-image tensor is made and nothing is copied again to collate.
    `shared=True` allocates the buffer in shared memory (a DataLoader worker's batch crosses to the
    main process without a copy, as default_collate does)."""
    n, (h, w) = len(images), images[0].shape[:2]
    if shared:
        storage = torch.empty(0)._typed_storage()._new_shared(n * 3 * h * w, device="cpu")
        out = torch.empty(0).new(storage).resize_(n, 3, h, w)
    else:
        out = torch.empty((n, 3, h, w), dtype=torch.float32)
    a = out.numpy()
    for k, img in enumerate(images):
        _normalise_into(img, a[k])  # subtract and divide while the image is still in cache
    return out


def random_hflip(img_rgb: np.ndarray, p: float = 0.5) -> np.ndarray:
    """Flip left-right with probability p (a view, no copy), drawing from torch's RNG (seeded per
    DataLoader worker)."""
    if p > 0 and torch.rand(()).item() < p:
        return img_rgb[:, ::-1]
    return img_rgb


def train_transform(img_rgb: np.ndarray) -> torch.Tensor:
    """arcface_torch's training pipeline: random horizontal flip, then normalise."""
    return to_tensor(random_hflip(img_rgb))


def eval_transform(img_rgb: np.ndarray) -> torch.Tensor:
    return to_tensor(img_rgb)

"""ArcFace 5-point alignment geometry: the similarity transform and the crop, equal to insightface's
`norm_crop` byte for byte (tests/deploy/test_align.py checks it against insightface).

It lives in `data` because two layers use it: `facebce.eval` aligns IJB faces from their landmarks,
and `facebce.deploy.align` aligns detected faces (it re-exports these names).
"""
from __future__ import annotations

import cv2
import numpy as np

from facebce.errors import ConfigError, DataFormatError

__all__ = ["ARCFACE_DST", "estimate_similarity", "norm_crop", "points_from_68", "reference_points"]

# insightface `arcface_dst` for 112x112 (x, y): eye left, eye right, nose, mouth left, mouth right.
# Kept in float32 like insightface, so the estimated transform and the crop are bit-identical.
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)

# ----------------------------------------------------------------------------------------------
# Similarity transform and the crop
# ----------------------------------------------------------------------------------------------

def estimate_similarity(src_pts, dst_pts) -> np.ndarray:
    """2x3 least-squares similarity (rotation, uniform scale, translation) mapping src onto dst.

    Umeyama (PAMI 1991) without reflection, written operation for operation like scikit-image's
    `SimilarityTransform.estimate` (dtypes are kept, not promoted) so `norm_crop` reproduces
    insightface's crops exactly rather than to within a rounding of the matrix.
    """
    src, dst = np.asarray(src_pts), np.asarray(dst_pts)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise DataFormatError(f"points: need two equal (N>=2, 2) arrays, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    a = dst_demean.T @ src_demean / len(src)
    d = np.ones(2, dtype=np.float64)
    if np.linalg.det(a) < 0:
        d[1] = -1  # the best fit would be a reflection: take the best proper rotation instead
    u, s, v = np.linalg.svd(a)
    rank = np.count_nonzero(s > s.max() * 2 * np.finfo(float).eps)
    if rank == 0:
        raise DataFormatError("points: all source (or destination) points coincide; no similarity fits")
    if rank == 1:  # collinear points: pick the reflection sign that makes the rotation proper
        rotation = u @ v if np.linalg.det(u) * np.linalg.det(v) > 0 else u @ np.diag([1.0, -1.0]) @ v
    else:
        rotation = u @ np.diag(d) @ v
    rotation = rotation.astype(np.float64)  # skimage stores it in a float64 matrix before using it
    scale = 1.0 / src_demean.var(axis=0).sum() * (s @ d)
    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, 2] = dst_mean - scale * (rotation @ src_mean.T)
    matrix[:, :2] = rotation * scale
    return matrix


def reference_points(size: int = 112) -> np.ndarray:
    """The ArcFace 5-point template for an SxS crop (float32, like insightface's `estimate_norm`).

    S a multiple of 112 scales the 112 template; a multiple of 128 scales it by S/128 and shifts
    it right by 8*S/128, i.e. the 112-wide face centred in a 128-wide crop.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ConfigError(f"size={size!r}: expected a positive int")
    if size % 112 == 0:
        return ARCFACE_DST * (float(size) / 112.0)
    if size % 128 == 0:
        ratio = float(size) / 128.0
        points = ARCFACE_DST * ratio
        points[:, 0] += 8.0 * ratio
        return points
    raise ConfigError(f"size={size}: an aligned crop must be a multiple of 112 or 128 pixels")


def points_from_68(landmarks68) -> np.ndarray:
    """The 5 alignment points from 68-point (iBUG/dlib, 0-based) landmarks, as insightface's eval_ijbc."""
    lmk = np.asarray(landmarks68)
    if lmk.shape != (68, 2):
        raise DataFormatError(f"landmarks68: expected shape (68, 2), got {lmk.shape}")
    return np.stack([lmk[[36, 39]].mean(axis=0), lmk[[42, 45]].mean(axis=0), lmk[30], lmk[48], lmk[54]])


def norm_crop(img: np.ndarray, kps, size: int = 112) -> np.ndarray:
    """Warp `img` so its 5 landmarks `kps` land on the ArcFace template: an SxS crop, black outside."""
    kps = np.asarray(kps)
    if kps.shape != (5, 2):
        raise DataFormatError(f"kps: expected 5 (x, y) landmarks, shape (5, 2), got {kps.shape}")
    matrix = estimate_similarity(kps, reference_points(size))
    return cv2.warpAffine(img, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)

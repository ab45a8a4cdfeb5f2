"""The alignment geometry (facebce.data.align): Umeyama bit for bit against scikit-image, the
reference points, the 68-point reduction, and norm_crop byte for byte against insightface's."""
from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest

from facebce.data.align import ARCFACE_DST, estimate_similarity, norm_crop, points_from_68, reference_points
from facebce.errors import ConfigError, DataFormatError

GREY = 127


def _skimage_matrix(src, dst) -> np.ndarray:
    tform = pytest.importorskip("skimage.transform").SimilarityTransform()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # `estimate` is what insightface calls
        assert tform.estimate(src, dst)
    return tform.params[:2]


def _random_similarity(rng) -> np.ndarray:
    angle, scale = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 5.0)
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, rng.uniform(-100, 100)], [s, c, rng.uniform(-100, 100)]])


def _apply(matrix, pts):
    return pts @ matrix[:, :2].T + matrix[:, 2]


# ---------------------------------------------------------------------------- similarity transform

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_similarity_equals_skimage_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 5, 5, 68):
        src = rng.uniform(0, 250, (n, 2)).astype(dtype)
        dst = rng.uniform(0, 112, (n, 2)).astype(dtype)
        np.testing.assert_array_equal(estimate_similarity(src, dst), _skimage_matrix(src, dst))


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(1)
    for _ in range(20):
        truth = _random_similarity(rng)
        src = rng.uniform(0, 250, (5, 2))
        np.testing.assert_allclose(estimate_similarity(src, _apply(truth, src)), truth, atol=1e-9)


def test_similarity_is_least_squares_with_noise():
    rng = np.random.default_rng(2)
    truth = _random_similarity(rng)
    src = rng.uniform(0, 250, (5, 2))
    dst = _apply(truth, src) + rng.normal(0, 0.5, (5, 2))
    fitted = estimate_similarity(src, dst)
    (a, minus_b, tx), (b, a2, ty) = fitted
    assert (a2, minus_b) == pytest.approx((a, -b))
    best = np.sum((_apply(fitted, src) - dst) ** 2)
    for _ in range(50):  # every nearby similarity fits worse
        da, db, dx, dy = rng.normal(0, [1e-3, 1e-3, 1e-2, 1e-2])
        nudged = np.array([[a + da, -(b + db), tx + dx], [b + db, a + da, ty + dy]])
        assert np.sum((_apply(nudged, src) - dst) ** 2) > best


def test_similarity_never_reflects_and_handles_collinear_points():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 100, (5, 2))
    mirrored = src * [-1, 1]
    m = estimate_similarity(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    np.testing.assert_array_equal(m, _skimage_matrix(src, mirrored))
    line = np.outer(np.arange(5.0), [1.0, 2.0]) + 3
    for dst in (line * 2 + 1, line[::-1] * [1, -1]):
        np.testing.assert_array_equal(estimate_similarity(line, dst), _skimage_matrix(line, dst))


def test_similarity_rejects_bad_points():
    with pytest.raises(DataFormatError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), ARCFACE_DST)
    with pytest.raises(DataFormatError, match=r"\(4, 2\)"):
        estimate_similarity(np.zeros((4, 2)), ARCFACE_DST)


# ---------------------------------------------------------------------------- templates

def test_reference_points_follow_the_112_and_128_rules():
    np.testing.assert_array_equal(reference_points(112), ARCFACE_DST)
    np.testing.assert_allclose(reference_points(224), ARCFACE_DST * 2, rtol=1e-6)
    np.testing.assert_allclose(reference_points(128), ARCFACE_DST + [8, 0], rtol=1e-6)
    np.testing.assert_allclose(reference_points(256), (ARCFACE_DST + [8, 0]) * 2, rtol=1e-6)
    # 128 is the older 96x112 template centred in 128 columns: left-eye x 30.2946 + 16
    assert reference_points(128)[0, 0] == pytest.approx(46.2946, abs=1e-4)
    assert reference_points(112).dtype == np.float32


@pytest.mark.parametrize("size", [0, -112, 100, 120, 112.0, "112", True])
def test_reference_points_reject_other_sizes(size):
    with pytest.raises(ConfigError, match="size="):
        reference_points(size)


def test_points_from_68_uses_eye_corners_nose_and_mouth_corners():
    lmk = np.arange(136, dtype=np.float64).reshape(68, 2)
    five = points_from_68(lmk)
    np.testing.assert_array_equal(five, [(lmk[36] + lmk[39]) / 2, (lmk[42] + lmk[45]) / 2,
                                         lmk[30], lmk[48], lmk[54]])
    with pytest.raises(DataFormatError, match=r"\(5, 2\)"):
        points_from_68(lmk[:5])


# ---------------------------------------------------------------------------- norm_crop on real crops

def _gallery_crops(shared_data, n: int, step: int = 97) -> list[tuple[str, np.ndarray]]:
    files = sorted((shared_data / "lfw_aligned_10plus").glob("*/*.jpg"))[::step][:n]
    assert len(files) == n
    return [(f.name, cv2.imread(str(f))) for f in files]


@pytest.mark.parametrize("size", [112, 128, 224])
def test_norm_crop_is_byte_identical_to_insightface(shared_data, size):
    face_align = pytest.importorskip("insightface.utils.face_align")
    rng = np.random.default_rng(size)
    for name, crop in _gallery_crops(shared_data, 6):
        img = cv2.copyMakeBorder(crop, 40, 60, 70, 30, cv2.BORDER_CONSTANT, value=(GREY,) * 3)
        # landmarks at a random pose, in float32 as the detector gives them
        angle, scale = rng.uniform(-0.7, 0.7), rng.uniform(0.8, 1.6)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        kps = ((ARCFACE_DST - 56) @ rot.T + rng.uniform(80, 130, 2) + rng.normal(0, 2, (5, 2))).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            expected = face_align.norm_crop(img, kps, size)
        got = norm_crop(img, kps, size)
        assert got.shape == (size, size, 3)
        assert np.array_equal(got, expected), name

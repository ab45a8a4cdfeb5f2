"""Synthetic identities: determinism, the dataset interface, writers, and that the task is hard but learnable."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from facebce.data.image_folder import ImageFolderDataset
from facebce.data.synthetic import SyntheticFaceDataset, SyntheticFaces, make_pairs, write_image_folder
from facebce.data.transforms import decode_image, to_tensor
from facebce.data.verification_bin import load_bin, save_bin
from facebce.errors import ConfigError, DataFormatError


def test_same_seed_gives_identical_bytes_in_any_order():
    a, b = SyntheticFaces(3, 4, seed=7), SyntheticFaces(3, 4, seed=7)
    forward = [a[i][0] for i in range(len(a))]
    backward = [b[i][0] for i in reversed(range(len(b)))][::-1]
    assert all(np.array_equal(x, y) for x, y in zip(forward, backward))
    other = SyntheticFaces(3, 4, seed=8)
    assert not any(np.array_equal(forward[i], other[i][0]) for i in range(len(other)))


def test_identities_are_global_so_offsets_give_disjoint_sets():
    whole = SyntheticFaces(5, 2, seed=1)
    tail = SyntheticFaces(2, 2, seed=1, first_identity=3)
    assert np.array_equal(whole.image(3, 1), tail.image(0, 1))
    held_out = SyntheticFaces(2, 2, seed=1, first_identity=10_000)
    assert not np.array_equal(whole.image(0, 0), held_out.image(0, 0))


def test_shapes_labels_and_sizes():
    faces = SyntheticFaces(3, 2)
    img, label = faces[5]
    assert img.shape == (112, 112, 3) and img.dtype == np.uint8 and label == 2
    assert len(faces) == 6 and faces.labels.dtype == np.int64 and faces.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert SyntheticFaces(1, 1, image_size=64).image(0, 0).shape == (64, 64, 3)
    with pytest.raises(IndexError):
        faces.image(3, 0)
    with pytest.raises(ConfigError, match="num_identities=0"):
        SyntheticFaces(0, 2)


def test_difficulty_zero_is_the_clean_face():
    faces = SyntheticFaces(2, 3, difficulty=0)
    first, second = faces.image(0, 0), faces.image(1, 0)
    assert all(np.array_equal(first, faces.image(0, k)) for k in (1, 2))
    assert np.abs(first.astype(int) - second).mean() > 5


def test_dataset_interface():
    faces = SyntheticFaces(4, 3, seed=2)
    ds = SyntheticFaceDataset(faces, train=False)
    assert len(ds) == 12 and ds.num_classes == 4 and ds.image_size == (112, 112)
    assert np.array_equal(ds.labels, faces.labels)
    x, label = ds[7]
    assert x.dtype == torch.float32 and x.shape == (3, 112, 112) and label == 2
    assert torch.equal(x, to_tensor(faces[7][0])) and -1 <= x.min() < x.max() <= 1
    data, raw_label = ds.raw(7)
    assert raw_label == 2 and data[:2] == b"\xff\xd8"  # JPEG
    assert np.abs(decode_image(data, where="raw 7").astype(int) - faces[7][0]).mean() < 3
    torch.manual_seed(0)
    flips = {torch.equal(SyntheticFaceDataset(faces)[7][0], x.flip(-1)) for _ in range(20)}
    assert flips == {True, False}  # train=True (the default) is arcface_torch's random flip


def test_write_image_folder_layout_matches_image_folder_reader(tmp_path):
    faces = SyntheticFaces(3, 2, seed=3)
    root = write_image_folder(faces, tmp_path / "synth")
    assert sorted(os.listdir(tmp_path)) == ["synth"]  # the temporary folder was renamed
    assert sorted(os.listdir(root)) == ["id_0000", "id_0001", "id_0002"]
    assert sorted(os.listdir(root / "id_0001")) == ["0000.jpg", "0001.jpg"]
    ds = ImageFolderDataset(root, train=False)
    assert ds.num_classes == 3 and np.array_equal(ds.labels, faces.labels)
    assert ds.raw(3)[0] == faces.encoded(1, 1)
    with pytest.raises(DataFormatError, match="not empty"):
        write_image_folder(faces, root)


def test_make_pairs_is_balanced_and_genuine_means_same_identity(tmp_path):
    # At difficulty 0 every image of an identity is the same picture, so genuine <=> equal bytes.
    faces = SyntheticFaces(6, 3, seed=4, difficulty=0)
    images, issame = make_pairs(faces, 100, seed=5)
    assert len(images) == 200 and issame.dtype == bool
    assert (issame.reshape(10, 10).sum(axis=1) == 5).all()  # every 10-fold block 5 genuine / 5 impostor
    assert [images[2 * k] == images[2 * k + 1] for k in range(100)] == issame.tolist()
    save_bin(tmp_path / "synth.bin", images, issame)
    vs = load_bin(tmp_path / "synth.bin")
    assert vs.images == images and np.array_equal(vs.issame, issame)
    assert make_pairs(faces, 100, seed=5)[0] == images
    with pytest.raises(ConfigError, match="even"):
        make_pairs(faces, 7)


# --- difficulty: raw pixels near chance, a linear projection learned on other identities is not ---

def _best_threshold_accuracy(scores: np.ndarray, issame: np.ndarray) -> float:
    """Accuracy of `score > t` at the best t (including accept-nothing)."""
    order = np.argsort(-scores)
    accepted_same = np.cumsum(issame[order])
    accepted_diff = np.cumsum(~issame[order])
    correct = accepted_same + (~issame).sum() - accepted_diff
    return float(max(correct.max(), (~issame).sum()) / len(issame))


def _pair_cosine_accuracy(features: np.ndarray, issame: np.ndarray) -> float:
    f = features - features.mean(axis=0)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    return _best_threshold_accuracy((f[0::2] * f[1::2]).sum(axis=1), issame)


def _thumbnails(images) -> np.ndarray:
    """16x16 RGB, flattened: enough for a linear model, and cheap."""
    return np.stack([cv2.resize(img, (16, 16), interpolation=cv2.INTER_AREA).ravel() for img in images]).astype(
        np.float32)


@pytest.fixture(scope="module")
def held_out_pairs():
    """1000 pairs (as written to a .bin, decoded) of 100 identities the model below never sees."""
    images, issame = make_pairs(SyntheticFaces(100, 6, seed=0, first_identity=10_000), 1000, seed=1)
    return np.stack([decode_image(img, where="pairs") for img in images]), issame


def test_raw_pixels_verify_near_chance(held_out_pairs):
    images, issame = held_out_pairs
    raw = _pair_cosine_accuracy(images.reshape(len(images), -1).astype(np.float32), issame)
    assert raw < 0.65
    assert _pair_cosine_accuracy(_thumbnails(images), issame) < 0.65


def test_identity_is_learnable_on_held_out_identities(held_out_pairs):
    images, issame = held_out_pairs
    train = SyntheticFaces(150, 10, seed=0)
    x_train = _thumbnails(train[i][0] for i in range(len(train)))
    pca = PCA(100, svd_solver="covariance_eigh").fit(x_train)
    lda = LinearDiscriminantAnalysis().fit(pca.transform(x_train), train.labels)
    learned = _pair_cosine_accuracy(lda.transform(pca.transform(_thumbnails(images))), issame)
    raw = _pair_cosine_accuracy(_thumbnails(images), issame)
    assert learned >= raw + 0.10, (learned, raw)

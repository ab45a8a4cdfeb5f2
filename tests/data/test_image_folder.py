"""ImageFolderDataset and scan_image_folder: ordering, labels, ignored files, errors naming the file."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facebce.data.image_folder import ImageFolderDataset, scan_image_folder
from facebce.errors import DataFormatError


def make_image_folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (16, 16),
                      ext: str = ".png", seed: int = 0) -> list[Path]:
    """root/<identity>/<n>.<ext> with random images (distinct bytes); returns the paths in sorted order."""
    rng = np.random.default_rng(seed)
    paths = []
    for name in sorted(counts):
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(counts[name]):
            img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            path = root / name / f"{n:03d}{ext}"
            path.write_bytes(cv2.imencode(ext, img)[1].tobytes())
            paths.append(path)
    return paths


def test_scan_sorts_identities_and_files_and_ignores_non_images(tmp_path):
    paths = make_image_folder(tmp_path, {"bob": 2, "alice": 3, "carol": 1})
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    (tmp_path / "alice" / ".hidden.png").write_bytes(b"junk")
    (tmp_path / ".cache").mkdir()
    (tmp_path / "manifest.csv").write_text("path,label\n")
    classes, found, labels = scan_image_folder(tmp_path)
    assert classes == ["alice", "bob", "carol"]
    assert found == paths
    assert labels.tolist() == [0, 0, 0, 1, 1, 2]
    assert labels.dtype == np.int64


def test_dataset_interface(tmp_path):
    paths = make_image_folder(tmp_path, {"a": 2, "b": 1}, size=(12, 10))
    ds = ImageFolderDataset(tmp_path, train=False, image_size=(12, 10))
    assert (len(ds), ds.num_classes, ds.image_size) == (3, 2, (12, 10))
    assert ds.labels.tolist() == [0, 0, 1]
    x, y = ds[2]
    assert x.shape == (3, 12, 10) and x.dtype == torch.float32 and y == 1
    rgb = cv2.cvtColor(cv2.imread(str(paths[2])), cv2.COLOR_BGR2RGB)
    expected = (torch.from_numpy(rgb).permute(2, 0, 1).float() - 127.5) / 127.5
    assert torch.allclose(x, expected)
    assert ds.raw(0) == (paths[0].read_bytes(), 0)


def test_train_flips_and_custom_transform(tmp_path):
    make_image_folder(tmp_path, {"a": 1})
    flipped = ImageFolderDataset(tmp_path, train=True, image_size=(16, 16))
    plain = ImageFolderDataset(tmp_path, train=False, image_size=(16, 16))
    torch.manual_seed(0)
    outs = {bool(torch.equal(flipped[0][0], plain[0][0])) for _ in range(20)}
    assert outs == {True, False}  # p=0.5 over 20 draws
    raw = ImageFolderDataset(tmp_path, transform=torch.from_numpy, image_size=(16, 16))
    assert raw[0][0].dtype == torch.uint8 and raw[0][0].shape == (16, 16, 3)


@pytest.mark.parametrize("layout, problem", [
    ({"a": 1, "empty": 0}, "has no images"),
    ({}, "no identity subfolders"),
])
def test_folder_errors(tmp_path, layout, problem):
    make_image_folder(tmp_path, layout)
    with pytest.raises(DataFormatError, match=problem):
        ImageFolderDataset(tmp_path)


def test_root_must_be_a_directory(tmp_path):
    with pytest.raises(DataFormatError, match="not a directory"):
        ImageFolderDataset(tmp_path / "missing")


def test_undecodable_and_wrong_size_images_name_the_file(tmp_path):
    paths = make_image_folder(tmp_path, {"a": 2})
    paths[0].write_bytes(b"\xff\xd8 not really a jpeg")
    ds = ImageFolderDataset(tmp_path, image_size=(16, 16))
    with pytest.raises(DataFormatError, match=rf"{paths[0]}: image bytes do not decode"):
        ds[0]
    ds = ImageFolderDataset(tmp_path, image_size=(20, 16))
    with pytest.raises(DataFormatError, match=rf"{paths[1]}: image is 16x16, expected 20x16"):
        ds[1]


def test_real_lfw_gallery_matches_manifest(shared_data):
    root = shared_data / "lfw_aligned_10plus"
    ds = ImageFolderDataset(root, train=False)
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert (len(ds), ds.num_classes) == (4324, 158)
    assert [p.relative_to(root).as_posix() for p in ds.paths] == [r["path"] for r in rows]
    assert ds.labels.tolist() == [int(r["label"]) for r in rows]
    x, _ = ds[100]
    assert x.shape == (3, 112, 112)

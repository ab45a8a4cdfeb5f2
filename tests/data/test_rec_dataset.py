"""RecDataset: header detection, labels, samples, DataLoader workers, corrupt packs, real mxnet packs."""
from __future__ import annotations

import csv
import re
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from facebce.data import rec_dataset
from facebce.data.image_folder import ImageFolderDataset
from facebce.data.rec_dataset import RecDataset
from facebce.data.pack import pack_image_folder
from facebce.data.recordio import IndexedRecordReader, RecordIOWriter, pack_image_record
from facebce.errors import DataFormatError
from tests.data.test_image_folder import make_image_folder


def image_bytes(seed: int, size: tuple[int, int] = (16, 16)) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def write_rec(root, records: list[tuple[object, bytes]], prop: str = "3,16,16"):
    """A pack whose record k is pack_image_record(label, img) for the k-th (label, img) pair."""
    root.mkdir(exist_ok=True)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as writer:
        for key, (label, img) in enumerate(records):
            writer.write(key, pack_image_record(label, img, id=key))
    (root / "property").write_text(prop + "\n")
    return root


def packed_folder(tmp_path, counts=None, **kwargs):
    """(image folder, its pack) for a small synthetic identity set."""
    make_image_folder(tmp_path / "img", counts or {"a": 2, "b": 3, "c": 1})
    pack_image_folder(tmp_path / "img", tmp_path / "pack", progress=False, **kwargs)
    return tmp_path / "img", tmp_path / "pack"


def where(rec_dir, key: int) -> str:
    """The regex an error about record `key` of rec_dir/train.rec starts with."""
    return re.escape(f"{rec_dir / 'train.rec'}: record {key} (offset ") + r"\d+\): "


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("label_style", ["scalar", "face2rec2"])
def test_matches_the_image_folder_it_was_packed_from(tmp_path, label_style):
    img_root, pack = packed_folder(tmp_path, label_style=label_style)
    ds = RecDataset(pack / "train.rec", train=False)
    ref = ImageFolderDataset(img_root, train=False, image_size=(16, 16))
    assert (len(ds), ds.num_classes, ds.image_size) == (6, 3, (16, 16))
    assert ds.keys.tolist() == [1, 2, 3, 4, 5, 6]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == ref.labels.tolist() == [0, 0, 1, 1, 1, 2]
    for i in range(len(ds)):
        assert ds.raw(i) == ref.raw(i)
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == ref.labels[i]
        assert torch.equal(x, ref[i][0])


def test_pack_without_header_reads_every_key(tmp_path):
    root = write_rec(tmp_path / "p", [(1.0, image_bytes(0)), (0.0, image_bytes(1)), (2.0, image_bytes(2))])
    ds = RecDataset(root, train=False)
    assert ds.keys.tolist() == [0, 1, 2] and ds.labels.tolist() == [1, 0, 2]
    assert ds.raw(0) == (image_bytes(0), 1)


@pytest.mark.parametrize("label0", [[1.0, 3.0], [1.0], [2.0, 2.0, 9.0]])
def test_image_record_0_with_array_label_is_not_a_header(tmp_path, label0):
    records = [(label0, image_bytes(0)), (0.0, image_bytes(1)), (2.0, image_bytes(2))]
    ds = RecDataset(write_rec(tmp_path / "p", records), train=False)
    assert ds.keys.tolist() == [0, 1, 2]
    assert ds.labels.tolist() == [int(label0[0]), 0, 2]
    assert ds[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("label0", [[3.0, 2.0], [0.0, 2.0]])
def test_empty_record_0_outside_1_le_a_le_b_is_not_a_header(tmp_path, label0):
    root = write_rec(tmp_path / "p", [(label0, b""), (0.0, image_bytes(1))], prop="4,16,16")
    ds = RecDataset(root)
    assert ds.keys.tolist() == [0, 1]
    with pytest.raises(DataFormatError, match=where(root, 0) + "image bytes do not decode"):
        ds[0]


def test_header_without_identity_records(tmp_path):
    records = [([4.0, 4.0], b""), (2.0, image_bytes(1)), (0.0, image_bytes(2)), (2.0, image_bytes(3))]
    ds = RecDataset(write_rec(tmp_path / "p", records))
    assert ds.keys.tolist() == [1, 2, 3] and ds.labels.tolist() == [2, 0, 2]


def test_header_beyond_float32_precision_falls_back_to_idx_keys(tmp_path, monkeypatch):
    _, pack = packed_folder(tmp_path)
    monkeypatch.setattr(rec_dataset, "FLOAT32_EXACT_MAX", 8)  # pretend b = 10 is not exact
    with pytest.warns(UserWarning, match=r"header range \[7, 10\) exceeds float32"):
        ds = RecDataset(pack)
    assert ds.keys.tolist() == [1, 2, 3, 4, 5, 6] and ds.labels.tolist() == [0, 0, 1, 1, 1, 2]


def test_dataloader_workers_give_the_same_batches(tmp_path):
    _, pack = packed_folder(tmp_path, counts={"a": 5, "b": 4, "c": 3})
    ds = RecDataset(pack, train=False)
    ds[0]  # the parent's open handle must not be shared with the forked workers

    def batches(workers):
        loader = DataLoader(ds, batch_size=4, num_workers=workers)
        return [(x.clone(), y.clone()) for x, y in loader]

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 3
    for (xs, ys), (xp, yp) in zip(serial, parallel):
        assert torch.equal(xs, xp) and torch.equal(ys, yp)


# ---------------------------------------------------------------- corrupt packs

def test_missing_or_malformed_property(tmp_path):
    _, pack = packed_folder(tmp_path)
    (pack / "property").write_text("3;16;16\n")
    with pytest.raises(DataFormatError, match=re.escape(f"{pack / 'property'}: line 1: expected")):
        RecDataset(pack)
    (pack / "property").unlink()
    with pytest.raises(DataFormatError, match=re.escape(f"{pack / 'property'}: property file not found")):
        RecDataset(pack)


def test_wrong_image_size(tmp_path):
    _, pack = packed_folder(tmp_path)
    (pack / "property").write_text("3,20,16\n")
    with pytest.raises(DataFormatError, match=where(pack, 4) + "image is 16x16, expected 20x16"):
        RecDataset(pack)[3]


def test_undecodable_image_in_a_record(tmp_path):
    root = write_rec(tmp_path / "p", [(0.0, image_bytes(0)), (1.0, b"\xff\xd8\xff not a jpeg")])
    ds = RecDataset(root)
    with pytest.raises(DataFormatError, match=where(root, 1) + "image bytes do not decode"):
        ds[1]


@pytest.mark.parametrize("records, prop, key, problem", [
    ([(0.0, b"x"), (3.0, b"x")], "3,16,16", 1, r"label 3 is not a class id in \[0, 3\)"),
    ([(-1.0, b"x")], "3,16,16", 0, r"label -1 is not a class id"),
    ([(1.5, b"x")], "3,16,16", 0, r"label 1.5 is not a class id"),
    ([([3.0, 5.0], b""), (0.0, b"x"), (1.0, b"x"), ([1.0, 2.0], b""), ([2.0, 3.0], b"")], "1,16,16", 2,
     r"label 1 is not a class id in \[0, 1\)"),
])
def test_bad_labels(tmp_path, records, prop, key, problem):
    root = write_rec(tmp_path / "p", records, prop=prop)
    with pytest.raises(DataFormatError, match=where(root, key) + problem):
        RecDataset(root)


@pytest.mark.parametrize("identities, key, problem", [
    ([[1.0, 2.0], [3.0, 4.0]], 5, r"identity 1 covers keys \[3, 4\), expected a range starting at 2"),
    ([[1.0, 3.0], [3.0, 3.0]], 5, r"identity ranges end at key 2, but the images are keys 1..3"),
    ([[1.0, 2.0], [2.0, 4.0]], 2, r"label 0, but identity record 5 places it in class 1"),
    ([[1.0, 3.0], 1.0], 5, r"identity record needs a \[start, end\) label"),
])
def test_identity_records_must_match_the_images(tmp_path, identities, key, problem):
    images = [(0.0, image_bytes(1)), (0.0, image_bytes(2)), (1.0, image_bytes(3))]
    root = write_rec(tmp_path / "p", [([4.0, 6.0], b"")] + images + [(r, b"") for r in identities])
    with pytest.raises(DataFormatError, match=where(root, key) + problem):
        RecDataset(root)


def test_header_naming_keys_missing_from_idx(tmp_path):
    root = write_rec(tmp_path / "p", [([3.0, 5.0], b""), (0.0, image_bytes(1)), (0.0, image_bytes(2))])
    with pytest.raises(DataFormatError, match=re.escape(f"{root / 'train.idx'}: record 3: missing from the .idx")):
        RecDataset(root)


# ---------------------------------------------------------------- real mxnet packs

def manifest(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_real_celeba_pack(shared_data):
    ds = RecDataset(shared_data / "celeba299" / "rec", train=False)
    rows = manifest(shared_data / "celeba299" / "manifest.csv")
    assert (len(ds), ds.num_classes, ds.image_size) == (6240, 278, (112, 112))
    assert ds.keys.tolist() == list(range(1, 6241))  # row i is record i + 1
    assert ds.labels.tolist() == [int(r["label"]) for r in rows]
    counts = np.bincount(ds.labels, minlength=278)
    assert (counts.min(), counts.max(), int((counts == 30).sum())) == (5, 30, 77)
    x, y = ds[1234]
    assert x.shape == (3, 112, 112) and -1 <= x.min() < x.max() <= 1 and y == int(rows[1234]["label"])


def test_real_lfw_pack_matches_the_gallery(shared_data):
    gallery = shared_data / "lfw_aligned_10plus"
    ds = RecDataset(shared_data / "lfw10_rec", transform=torch.from_numpy)
    rows = manifest(gallery / "manifest.csv")
    names = dict(line.split(" ", 1) for line in (shared_data / "lfw10_rec" / "labels.txt").read_text().splitlines())
    assert (len(ds), ds.num_classes, ds.image_size) == (4324, 158, (112, 112))
    assert ds.labels.tolist() == [int(r["label"]) for r in rows]
    assert Counter(ds.labels.tolist()) == Counter(int(r["label"]) for r in rows)
    for i in np.random.default_rng(0).choice(len(ds), 50, replace=False):
        data, label = ds.raw(i)
        assert data == (gallery / rows[i]["path"]).read_bytes()
        assert names[str(label)] == rows[i]["person"] == rows[i]["path"].split("/")[0]
    for i in (0, 2000, 4323):
        rgb = cv2.cvtColor(cv2.imread(str(gallery / rows[i]["path"])), cv2.COLOR_BGR2RGB)
        img, _ = ds[i]
        assert img.shape == (112, 112, 3) and np.array_equal(img.numpy(), rgb)


def test_real_pack_through_dataloader_workers(shared_data):
    ds = RecDataset(shared_data / "lfw10_rec", train=False)
    subset = torch.utils.data.Subset(ds, range(0, 4324, 97))
    serial = [x for x, _ in DataLoader(subset, batch_size=16, num_workers=0)]
    parallel = [x for x, _ in DataLoader(subset, batch_size=16, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and len(serial) == 3
    assert IndexedRecordReader(ds.rec_path, ds.rec_path.with_suffix(".idx")).read(1)[24:] == ds.raw(0)[0]


def test_fast_transform_is_bit_identical_to_the_plain_pipeline():
    """decode to an RGB view + flip view + one-pass to_tensor == cvtColor copy + (x - 127.5) / 127.5."""
    import cv2
    from facebce.data.transforms import decode_image, to_tensor

    rng = np.random.default_rng(0)
    blob = cv2.imencode(".jpg", rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))[1].tobytes()
    view = decode_image(blob, where="x", contiguous=False)
    rgb = decode_image(blob, where="x")
    assert not view.flags.c_contiguous and np.array_equal(view, rgb)
    for img in (view, view[:, ::-1]):
        chw = np.ascontiguousarray(img).transpose(2, 0, 1).astype(np.float32)
        plain = (chw - np.float32(127.5)) / np.float32(127.5)
        assert torch.equal(to_tensor(img), torch.from_numpy(plain))

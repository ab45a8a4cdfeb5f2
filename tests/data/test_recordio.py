"""RecordIO framing, IRHeader records, the indexed writer/reader and pack_image_folder (docs/formats.md §1-3)."""
from __future__ import annotations

import os
import pickle
import re
import struct

import numpy as np
import pytest

from facebce.data.pack import pack_image_folder
from facebce.data.recordio import (MAGIC, IndexedRecordReader, IRHeader, RecordIOWriter, frame_record,
                                   pack_image_record, unpack_image_record)
from facebce.errors import DataFormatError
from tests.data.test_image_folder import make_image_folder

M = struct.pack("<I", MAGIC)  # 0a 23 d7 ce


def chunks(framed: bytes) -> list[tuple[int, bytes]]:
    """(cflag, data) of each chunk in framed bytes, checking magic and zero padding."""
    out, pos = [], 0
    while pos < len(framed):
        magic, lrec = struct.unpack_from("<II", framed, pos)
        assert magic == MAGIC
        n = lrec & (2**29 - 1)
        out.append((lrec >> 29, framed[pos + 8:pos + 8 + n]))
        pad = framed[pos + 8 + n:pos + 8 + n + (-n % 4)]
        assert pad == b"\0" * (-n % 4)
        pos += 8 + n + len(pad)
    assert pos == len(framed)
    return out


def write_pack(tmp_path, records: dict[int, bytes], name: str = "t"):
    """Write records with RecordIOWriter; returns (rec path, idx path)."""
    rec, idx = tmp_path / f"{name}.rec", tmp_path / f"{name}.idx"
    with RecordIOWriter(rec, idx) as writer:
        for key, payload in records.items():
            writer.write(key, payload)
    return rec, idx


# ---------------------------------------------------------------- byte-level spec examples

def test_spec_framing_example():
    assert frame_record(b"abcde") == bytes.fromhex("0a23d7ce 05000000 6162636465 000000")


def test_spec_irheader_examples():
    scalar = pack_image_record(3.0, b"", id=7)
    assert scalar == bytes.fromhex("00000000 00004040 0700000000000000 0000000000000000")
    array = pack_image_record([5.0, 1.0], b"")
    assert array == bytes.fromhex("02000000 00000000" + "00" * 16 + "0000a040 0000803f")
    header, label, img = unpack_image_record(scalar + b"JPEG")
    assert (header, label, img) == (IRHeader(0, 3.0, 7, 0), 3.0, b"JPEG")
    header, label, img = unpack_image_record(array + b"PNG")
    assert header == IRHeader(2, 0.0, 0, 0) and img == b"PNG"
    assert label.dtype == np.float32 and label.tolist() == [5.0, 1.0]


@pytest.mark.parametrize("payload, problem", [
    (b"\0" * 23, "shorter than the 24-byte IRHeader"),
    (struct.pack("<IfQQ", 3, 0, 0, 0) + b"\0" * 8, "flag 3 needs 36 bytes"),
])
def test_unpack_rejects_short_payloads(payload, problem):
    with pytest.raises(DataFormatError, match=f"rec 9: .*{problem}"):
        unpack_image_record(payload, where="rec 9")


# ---------------------------------------------------------------- multi-part records

@pytest.mark.parametrize("payload, expected", [
    (b"abcd" + M + b"efgh", [(1, b"abcd"), (3, b"efgh")]),
    (M + b"xyz", [(1, b""), (3, b"xyz")]),
    (b"abcd" + M, [(1, b"abcd"), (3, b"")]),
    (M, [(1, b""), (3, b"")]),
    (M + M, [(1, b""), (2, b""), (3, b"")]),
    (b"abcd" + M + b"efgh" + M + b"ij", [(1, b"abcd"), (2, b"efgh"), (3, b"ij")]),
    (b"ab" + M + b"cd", [(0, b"ab" + M + b"cd")]),  # unaligned: not a split point
    (b"ab" + M + b"cd" + M, [(1, b"ab" + M + b"cd"), (3, b"")]),
])
def test_multipart_split_and_rejoin(tmp_path, payload, expected):
    framed = frame_record(payload)
    assert chunks(framed) == expected
    rec, idx = write_pack(tmp_path, {0: payload, 1: b"next"})
    with IndexedRecordReader(rec, idx) as reader:
        assert reader.read(0) == payload
        assert reader.read(1) == b"next"


def test_round_trip_random_payloads(tmp_path):
    rng = np.random.default_rng(1)
    records = {}
    for key in rng.permutation(200).tolist():
        words = rng.integers(0, 2**32, rng.integers(0, 40), dtype=np.uint32)
        words[rng.random(words.size) < 0.2] = MAGIC  # aligned magic words, sometimes adjacent
        tail = rng.integers(0, 256, rng.integers(0, 4), dtype=np.uint8).tobytes()
        records[key] = words.astype("<u4").tobytes() + tail
    assert sum(M in p for p in records.values()) > 50
    rec, idx = write_pack(tmp_path, records)
    reader = IndexedRecordReader(rec, idx)
    assert reader.keys == list(records)
    assert all(reader.read(k) == p for k, p in records.items())
    clone = pickle.loads(pickle.dumps(reader))  # an open handle must not travel
    assert clone.read(5) == records[5]


def test_reader_reopens_its_file_in_a_forked_process(tmp_path, monkeypatch):
    """A forked DataLoader worker must not share the parent's file offset (seek races)."""
    reader = IndexedRecordReader(*write_pack(tmp_path, {0: b"a", 1: b"b"}))
    assert reader.read(0) == b"a"
    parent_handle = reader._file()
    monkeypatch.setattr(os, "getpid", lambda: -1)
    assert reader._file() is not parent_handle
    assert reader.read(1) == b"b"


# ---------------------------------------------------------------- writer

def test_writer_is_atomic(tmp_path):
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    with pytest.raises(RuntimeError):
        with RecordIOWriter(rec, idx) as writer:
            writer.write(0, b"payload")
            assert not rec.exists()
            raise RuntimeError("crash mid-pack")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_duplicate_key(tmp_path):
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as writer:
        writer.write(3, b"a")
        with pytest.raises(ValueError, match="record key 3 written twice"):
            writer.write(3, b"b")


# ---------------------------------------------------------------- corrupt files

def pack_with_idx(tmp_path, idx_text: str | None = None):
    """A valid 3-record pack (records at offsets 0, 12, 28), optionally with its .idx replaced."""
    rec, idx = write_pack(tmp_path, {0: b"zero", 1: b"one-one", 2: b"two"})
    if idx_text is not None:
        idx.write_text(idx_text)
    return rec, idx


def test_truncated_rec(tmp_path):
    rec, idx = write_pack(tmp_path, {0: b"zero", 1: b"one-one-one"})
    rec.write_bytes(rec.read_bytes()[:-6])
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(rec))}: record 1 \(offset 12\): truncated file"):
        IndexedRecordReader(rec, idx).read(1)


@pytest.mark.parametrize("chunk, problem", [
    (struct.pack("<II", 0xDEADBEEF, 4) + b"abcd", "bad magic 0xDEADBEEF at offset 0"),
    *[(struct.pack("<II", MAGIC, (c << 29) | 4) + b"abcd", f"invalid chunk flag {c}") for c in (4, 5, 6, 7)],
    (struct.pack("<II", MAGIC, (2 << 29) | 4) + b"abcd", "part 2 at offset 0 without a preceding part 1"),
    (struct.pack("<II", MAGIC, (3 << 29) | 4) + b"abcd", "part 3 at offset 0 without a preceding part 1"),
    (frame_record(b"x" * 4 + M)[:12] + frame_record(b"y"), "chunk flag 0 at offset 12 inside a multi-part"),
])
def test_bad_chunks(tmp_path, chunk, problem):
    rec, idx = tmp_path / "bad.rec", tmp_path / "bad.idx"
    rec.write_bytes(chunk)
    idx.write_text("7\t0\n")
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(rec))}: record 7 \(offset 0\): {problem}"):
        IndexedRecordReader(rec, idx).read(7)


def test_idx_offset_not_at_magic(tmp_path):
    rec, idx = pack_with_idx(tmp_path, idx_text="0\t0\n1\t4\n")
    reader = IndexedRecordReader(rec, idx)
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(rec))}: record 1 \(offset 4\): bad magic"):
        reader.read(1)


@pytest.mark.parametrize("idx_text, problem", [
    ("0\t0\n1\t4096\n", r"line 2: record 1: offset 4096 is past the end"),
    ("0\t0\n1\t6\n", r"line 2: record 1: offset 6 is not 4-byte aligned"),
    ("0\t0\n1\t12\n1\t24\n", r"line 3: record 1: duplicate key"),
    ("0\t0\n1 12\n", r"line 2: expected '<key>\\t<offset>'"),
    ("0\t0\n\n", r"line 2: expected"),
    ("0\t0\tx\n", r"line 1: expected"),
])
def test_bad_idx(tmp_path, idx_text, problem):
    rec, idx = pack_with_idx(tmp_path, idx_text=idx_text)
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(idx))}: {problem}"):
        IndexedRecordReader(rec, idx)


def test_missing_key_and_missing_files(tmp_path):
    rec, idx = pack_with_idx(tmp_path)
    with pytest.raises(KeyError, match="no record with key 9"):
        IndexedRecordReader(rec, idx).read(9)
    with pytest.raises(DataFormatError, match="nope.idx: file not found"):
        IndexedRecordReader(rec, tmp_path / "nope.idx")


# ---------------------------------------------------------------- pack_image_folder

def test_pack_image_folder_layout(tmp_path):
    paths = make_image_folder(tmp_path / "img", {"b": 3, "a": 2, "c": 1}, size=(16, 12))
    summary = pack_image_folder(tmp_path / "img", tmp_path / "pack", progress=False)
    assert summary[:3] == (3, 6, (16, 12))
    out = tmp_path / "pack"
    assert (out / "property").read_text() == "3,16,12\n"
    assert sorted(p.name for p in out.iterdir()) == ["property", "train.idx", "train.rec"]
    reader = IndexedRecordReader(out / "train.rec", out / "train.idx")
    assert reader.keys == list(range(10))
    header, label, img = unpack_image_record(reader.read(0))
    assert (header.flag, label.tolist(), img) == (2, [7.0, 10.0], b"")
    for key, path in enumerate(paths, start=1):
        header, label, img = unpack_image_record(reader.read(key))
        assert header == IRHeader(0, label, key, 0)
        assert label == [0, 0, 1, 1, 1, 2][key - 1]
        assert img == path.read_bytes()
    ranges = [unpack_image_record(reader.read(k))[1].tolist() for k in (7, 8, 9)]
    assert ranges == [[1, 3], [3, 6], [6, 7]]


def test_pack_face2rec2_labels(tmp_path):
    make_image_folder(tmp_path / "img", {"a": 1, "b": 1})
    pack_image_folder(tmp_path / "img", tmp_path, label_style="face2rec2", progress=False)
    reader = IndexedRecordReader(tmp_path / "train.rec", tmp_path / "train.idx")
    header, label, _ = unpack_image_record(reader.read(2))
    assert header.flag == 2 and label.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("bad, problem", [
    ("size", "image is 20x16, expected 16x16"),
    ("bytes", "image bytes do not decode"),
])
def test_pack_rejects_bad_images_and_writes_nothing(tmp_path, bad, problem):
    paths = make_image_folder(tmp_path / "img", {"a": 2, "b": 1})
    if bad == "size":
        make_image_folder(tmp_path / "img", {"b": 1}, size=(20, 16))
    else:
        paths[2].write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(paths[2]))}: {problem}"):
        pack_image_folder(tmp_path / "img", tmp_path / "pack", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]  # no pack folder, no staging leftovers


# ---------------------------------------------------------------- real mxnet packs

def test_packing_lfw_gallery_reproduces_the_mxnet_pack(shared_data, tmp_path):
    """The lfw10_rec pack was written by real mxnet from the same folder: byte-identical output."""
    summary = pack_image_folder(shared_data / "lfw_aligned_10plus", tmp_path, progress=False)
    assert summary[:3] == (158, 4324, (112, 112))
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / name).read_bytes() == (shared_data / "lfw10_rec" / name).read_bytes(), name


@pytest.mark.parametrize("pack, a, b", [("lfw10_rec", 4325, 4483), ("celeba299/rec", 6241, 6519)])
def test_real_header_and_identity_records(shared_data, pack, a, b):
    root = shared_data / pack
    reader = IndexedRecordReader(root / "train.rec", root / "train.idx")
    assert reader.keys == list(range(b))
    assert reader.read(0) == pack_image_record([a, b], b"", id=0)
    header, label, img = unpack_image_record(reader.read(a))
    assert (header.flag, header.id, label[0], img) == (2, a, 1.0, b"")
    header, label, img = unpack_image_record(reader.read(b - 1))
    assert (label[1], header.id) == (a, b - 1)

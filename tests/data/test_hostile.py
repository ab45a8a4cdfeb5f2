"""Hostile and careless data files through the CLI: one line naming the file, exit 1, no traceback,
nothing written, bounded memory (issue 12, 'Packs and alignment' and 'Memory amplification')."""
from __future__ import annotations

import tracemalloc

import pytest

from facebce.data.pack import pack_image_folder
from facebce.data.transforms import decode_image
from facebce.data.verification_bin import load_bin
from facebce.errors import DataFormatError
from tests.data.hostile import array_bomb, cli_error, make_faces, png_bomb


@pytest.fixture
def pack(tmp_path):
    make_faces(tmp_path / "img", {"a": 2, "b": 1, "c": 2, "d": 1})
    pack_image_folder(tmp_path / "img", tmp_path / "pack", progress=False)
    return tmp_path / "pack"


# ---------------------------------------------------------------- .rec packs

@pytest.mark.parametrize("name, content, problem", [
    ("train.idx", b"", "train.idx: empty index"),
    ("train.idx", b"0\t0\n\xff\xfe\t12\n", "train.idx: not a RecordIO index: byte 4 is not UTF-8"),
    ("property", b"\xff4,16,16\n", "property: property file is not UTF-8 text"),
    ("train.rec", b"", "train.idx: line 1: record 0: offset 0 is past the end of the .rec (0 bytes)"),
    ("property", b"1000,16,16\n", "property: declares 1000 classes, but"),
])
def test_damaged_pack_is_one_line(pack, capsys, name, content, problem):
    (pack / name).write_bytes(content)
    line = cli_error(capsys, "data", "inspect", pack)
    assert problem in line


def test_zero_byte_rec_and_idx(pack, capsys):
    (pack / "train.rec").write_bytes(b"")
    (pack / "train.idx").write_bytes(b"")
    assert "train.idx: empty index" in cli_error(capsys, "data", "inspect", pack)


def test_property_claiming_more_classes_than_identity_records_refuses_to_train(pack, capsys, tmp_path):
    (pack / "property").write_text("1000,16,16\n")
    line = cli_error(capsys, "train", "recipes/demo_synthetic.yaml", "--out", tmp_path / "run",
                     "--set", "data.kind=rec", "--set", f"data.path={pack}", "--set", "steps=1")
    assert line == (f"facebce: error: {pack / 'property'}: declares 1000 classes, but {pack / 'train.rec'} has 4 "
                    "identity records (header [7, 11)); the first number in property must be the number of identities")
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_missing_data_path_names_the_folder(tmp_path, capsys):
    line = cli_error(capsys, "train", "recipes/demo_synthetic.yaml", "--out", tmp_path / "run",
                     "--set", "data.kind=rec", "--set", f"data.path={tmp_path / 'nope'}")
    assert line == f"facebce: error: {tmp_path / 'nope'}: no such pack folder or .rec file"
    assert "property" not in line


def test_a_bin_given_as_a_pack(tmp_path, capsys):
    from facebce.data.verification_bin import save_bin
    save_bin(tmp_path / "pairs.dat", [b"a", b"b"], [True])
    line = cli_error(capsys, "train", "recipes/demo_synthetic.yaml", "--out", tmp_path / "run",
                     "--set", "data.kind=rec", "--set", f"data.path={tmp_path / 'pairs.dat'}")
    assert "pairs.dat: is a verification .bin" in line


# ---------------------------------------------------------------- verification .bin

def test_empty_bin(tmp_path, capsys):
    (tmp_path / "e.bin").write_bytes(b"")
    assert cli_error(capsys, "data", "inspect", tmp_path / "e.bin").endswith(
        "e.bin: empty file (0 bytes), not a verification .bin")


def test_array_bomb_is_refused_before_numpy_allocates(tmp_path):
    """67 bytes declaring a 3-billion-element array: refused, and nothing near that size is allocated."""
    path = tmp_path / "bomb.bin"
    path.write_bytes(array_bomb())
    tracemalloc.start()
    try:
        with pytest.raises(DataFormatError) as info:
            load_bin(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"{peak:,} bytes allocated for a {path.stat().st_size}-byte file"
    assert str(info.value) == (f"{path}: refused array of shape (3000000000,) int8: 3,000,000,000 bytes declared, "
                               f"more than the file's 67 bytes can hold")


@pytest.mark.parametrize("payload, problem", [
    # numpy.ndarray called directly (would allocate any shape)
    (b"\x80\x03cnumpy\nndarray\n\x8a\x05\x00\x5e\xd0\xb2\x00\x85\x85R.", "refused call of ndarray"),
    # an object dtype (numpy fills object arrays from pickle data; it can crash doing so)
    (b"\x80\x03cnumpy\ndtype\nX\x02\x00\x00\x00O8\x85R.", "refused numpy.dtype: dtype object"),
    # a declared BINBYTES8 length far beyond the file
    (b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"ab", "not a readable pickle"),
])
def test_other_bin_amplifications(tmp_path, capsys, payload, problem):
    path = tmp_path / "x.bin"
    path.write_bytes(payload)
    tracemalloc.start()
    try:
        line = cli_error(capsys, "data", "inspect", path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert problem in line and peak < 5_000_000


# ---------------------------------------------------------------- decompression bombs

def test_png_bomb_refused_by_header(tmp_path, capsys):
    bomb = png_bomb()
    with pytest.raises(DataFormatError, match="declares 40000x40000 pixels.*refused before decoding"):
        decode_image(bomb, where="x.png")
    make_faces(tmp_path / "img", {"a": 1, "b": 1})
    (tmp_path / "img" / "b" / "zz.png").write_bytes(bomb)
    line = cli_error(capsys, "data", "pack", tmp_path / "img", tmp_path / "pack")
    assert f"{tmp_path / 'img' / 'b' / 'zz.png'}: image declares 40000x40000 pixels" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]  # nothing half-written


def test_png_bomb_inside_a_pack(tmp_path, capsys):
    from facebce.data.recordio import RecordIOWriter, pack_image_record
    root = tmp_path / "p"
    root.mkdir()
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        w.write(0, pack_image_record(0.0, png_bomb()))
    (root / "property").write_text("1,16,16\n")
    assert "record 0 (offset 0): image declares 40000x40000 pixels" in cli_error(capsys, "data", "inspect", root)


# ---------------------------------------------------------------- --out naming a file

def test_out_naming_a_regular_file(tmp_path, capsys):
    make_faces(tmp_path / "img", {"a": 1})
    (tmp_path / "f").write_text("keep me")
    assert cli_error(capsys, "data", "pack", tmp_path / "img", tmp_path / "f").endswith(
        f"{tmp_path / 'f'}: exists and is not a folder (the pack's output folder)")
    assert "exists and is not a folder" in cli_error(capsys, "data", "synth", tmp_path / "f", "--identities", "2")
    assert (tmp_path / "f").read_text() == "keep me"


def test_pack_beside_other_files_keeps_them(tmp_path):
    """Replacing a pack keeps what else is in its folder (faces_emore keeps lfw.bin beside train.rec)."""
    make_faces(tmp_path / "img", {"a": 2, "b": 1})
    out = tmp_path / "pack"
    (out / "sub").mkdir(parents=True)
    (out / "lfw.bin").write_bytes(b"pairs")
    (out / "sub" / "x.txt").write_text("x")
    (out / "train.rec").write_bytes(b"old")
    out.chmod(0o750)
    pack_image_folder(tmp_path / "img", out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["lfw.bin", "property", "sub", "train.idx", "train.rec"]
    assert (out / "lfw.bin").read_bytes() == b"pairs" and (out / "sub" / "x.txt").read_text() == "x"
    assert out.stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "pack"]  # the old pack folder is gone

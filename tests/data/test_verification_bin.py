"""Verification .bin: round trip, the file variants seen in the wild, and the restricted unpickler."""
from __future__ import annotations

import os
import pickle
import pickletools
import struct
import subprocess
import sys

import cv2
import numpy as np
import pytest

from facebce.data.verification_bin import load_bin, save_bin
from facebce.errors import DataFormatError


def _jpeg(seed: int, shape=(112, 112, 3)) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


IMAGES = [_jpeg(i) for i in range(4)]
ISSAME = [True, False]


def _write(tmp_path, data: bytes, name="x.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _refusal(path, **kwargs) -> str:
    with pytest.raises(DataFormatError) as err:
        load_bin(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


# --- round trip and accepted variants ---------------------------------------------------------

def test_round_trip_writes_a_pickle_without_globals(tmp_path):
    path = tmp_path / "pairs.bin"
    save_bin(path, IMAGES, np.array(ISSAME))
    opcodes = {op.name for op, _, _ in pickletools.genops(path.read_bytes())}
    assert not opcodes & {"GLOBAL", "STACK_GLOBAL", "REDUCE"}
    assert pickletools.genops(path.read_bytes()).__next__()[1] == 4  # PROTO 4
    vs = load_bin(path)
    assert vs.images == IMAGES and vs.issame.dtype == bool and vs.issame.tolist() == ISSAME
    assert vs.num_pairs == 2 and vs.path == path
    assert os.listdir(tmp_path) == ["pairs.bin"]  # the temporary file is gone
    decoded = vs.decode()
    assert decoded.shape == (4, 112, 112, 3) and decoded.dtype == np.uint8


def test_save_stores_equal_images_once_and_decode_reuses_them(tmp_path):
    path = tmp_path / "dup.bin"
    save_bin(path, [IMAGES[0], IMAGES[1], bytes(IMAGES[0]), IMAGES[0]], ISSAME)
    assert len(path.read_bytes()) < len(IMAGES[0]) * 2 + len(IMAGES[1]) + 200
    vs = load_bin(path)
    assert vs.images[0] is vs.images[2] is vs.images[3]
    decoded = vs.decode()
    assert np.array_equal(decoded[0], decoded[3])


def test_save_refuses_bad_input_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "keep.bin"
    save_bin(path, IMAGES, ISSAME)
    before = path.read_bytes()
    with pytest.raises(DataFormatError, match=r"keep\.bin: 4 images but 1 pairs"):
        save_bin(path, IMAGES, [True])
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["keep.bin"]


def _python2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's cPickle writes at protocol 2: images as BINSTRING (Python 2 `str`), no globals."""
    out = [b"\x80\x02]("]
    for img in images:
        out.append(b"T" + struct.pack("<I", len(img)) + img)
    out.append(b"e](")
    out += [b"\x88" if x else b"\x89" for x in issame]
    out.append(b"e\x86.")
    return b"".join(out)


def test_python2_file_loads_with_bytes_encoding(tmp_path):
    data = _python2_pickle(IMAGES, ISSAME)
    with pytest.raises(UnicodeDecodeError):  # why encoding='bytes' is needed (insightface #70, #149)
        pickle.loads(data)
    vs = load_bin(_write(tmp_path, data))
    assert vs.images == IMAGES and vs.issame.tolist() == ISSAME


def test_python3_protocol2_bytes_via_codecs_encode_load(tmp_path):
    data = pickle.dumps((IMAGES, ISSAME), protocol=2)
    assert b"_codecs\nencode" in data
    assert load_bin(_write(tmp_path, data)).images == IMAGES


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("labels", ["numpy_bools", "bool_array"])
def test_numpy_images_and_labels_load(tmp_path, protocol, labels):
    arrays = [np.frombuffer(img, np.uint8).copy() for img in IMAGES]  # as cv2.imencode returns them
    issame = [np.bool_(x) for x in ISSAME] if labels == "numpy_bools" else np.array(ISSAME)
    vs = load_bin(_write(tmp_path, pickle.dumps((arrays, issame), protocol=protocol)))
    assert vs.images == IMAGES and vs.issame.tolist() == ISSAME


def test_yaw_triple_only_on_request(tmp_path):
    path = _write(tmp_path, pickle.dumps((IMAGES, [0.0] * 4, ISSAME), protocol=4))
    assert "allow_yaw=True" in _refusal(path)
    assert load_bin(path, allow_yaw=True).issame.tolist() == ISSAME


# --- the restricted unpickler -----------------------------------------------------------------

class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_refuses_classic_os_system_payload(tmp_path, capfd):
    data = b"cos\nsystem\n(S'echo pwned'\ntR."
    assert "os.system" in _refusal(_write(tmp_path, data))
    assert "pwned" not in capfd.readouterr().out


@pytest.mark.parametrize("func, args, named", [
    (eval, ("1+1",), "builtins.eval"),
    (subprocess.Popen, (["true"],), "subprocess.Popen"),
    (os.system, ("true",), f"{os.system.__module__}.system"),
])
def test_refuses_code_execution_globals(tmp_path, func, args, named):
    data = pickle.dumps((IMAGES, [_Payload(func, *args), False]), protocol=4)
    assert named in _refusal(_write(tmp_path, data))


@pytest.mark.parametrize("protocol", [2, 4])
def test_payload_that_creates_a_file_never_runs(tmp_path, protocol):
    victim = tmp_path / "created_by_pickle"
    evil = [_Payload(open, str(victim), "w"),
            _Payload(os.system, f"touch {victim}")]
    for payload in evil:
        data = pickle.dumps(([IMAGES[0], payload], [True]), protocol=protocol)
        message = _refusal(_write(tmp_path, data))
        assert "refused pickle global" in message
        assert not victim.exists()
    # Control: the payload is live; plain pickle runs it.
    pickle.loads(pickle.dumps(evil[0], protocol=protocol)).close()
    assert victim.exists()


def test_refused_module_is_never_imported(tmp_path):
    if "this" in sys.modules:  # importing `this` prints the Zen of Python: a visible side effect
        pytest.skip("module `this` already imported")
    data = b"\x80\x04\x8c\x04this\x94\x8c\x01s\x94\x93\x94."
    assert "this.s" in _refusal(_write(tmp_path, data))
    assert "this" not in sys.modules


@pytest.mark.parametrize("encoding", ["utf-8", "rot13", "hex"])
def test_codecs_encode_only_latin1(tmp_path, encoding):
    enc = encoding.encode()
    data = (b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00ab" + b"X" + struct.pack("<I", len(enc)) + enc
            + b"\x86R.")
    assert f"_codecs.encode(str, '{encoding}')" in _refusal(_write(tmp_path, data))


def test_refuses_out_of_band_buffers(tmp_path):
    arrays = [np.frombuffer(img, np.uint8).copy() for img in IMAGES]
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps((arrays, ISSAME), protocol=5, buffer_callback=buffers.append)
    assert buffers  # the pickle really uses NEXT_BUFFER
    assert "refused out-of-band buffer (pickle protocol 5 NEXT_BUFFER)" in _refusal(_write(tmp_path, data))


def test_garbage_is_a_format_error(tmp_path):
    assert "not a readable pickle" in _refusal(_write(tmp_path, b"\xff\xd8 this is a JPEG, not a pickle"))


# --- post-load validation ---------------------------------------------------------------------

@pytest.mark.parametrize("obj, expected", [
    ((IMAGES[:3], ISSAME), "3 images but 2 pairs (need 2 per pair)"),
    ((IMAGES, [1, 0]), "issame[0] is int 1, expected bool"),
    ((IMAGES, np.array([1, 0])), "issame is a int64 array of shape (2,), expected 1-D bool"),
    ((IMAGES[:3] + ["not bytes"], ISSAME), "image 3 is str, expected bytes or a 1-D uint8 array"),
    ((IMAGES[:3] + [np.zeros((2, 2), np.uint8)], ISSAME), "image 3 is uint8 array of shape (2, 2)"),
    ((IMAGES, ISSAME, ISSAME, ISSAME), "top level has 4 items"),
    ({"images": IMAGES}, "top level is dict"),
])
def test_validation_errors_name_the_problem(tmp_path, obj, expected):
    assert expected in _refusal(_write(tmp_path, pickle.dumps(obj, protocol=4)))


def test_undecodable_image_named_by_index(tmp_path):
    path = _write(tmp_path, pickle.dumps((IMAGES[:3] + [b"\xff\xd8broken"], ISSAME), protocol=4))
    vs = load_bin(path)
    with pytest.raises(DataFormatError, match=rf"{path} image 3: image bytes do not decode"):
        vs.decode()


def test_decode_resizes_short_side_and_rejects_non_square(tmp_path):
    big = [_jpeg(9, (224, 224, 3))] * 2
    vs = load_bin(_write(tmp_path, pickle.dumps((big, [True]), protocol=4)))
    assert vs.decode().shape == (2, 112, 112, 3)
    wide = [IMAGES[0], _jpeg(10, (112, 150, 3))]
    vs = load_bin(_write(tmp_path, pickle.dumps((wide, [True]), protocol=4), name="wide.bin"))
    with pytest.raises(DataFormatError, match=r"wide\.bin image 1: image is 112x150, expected 112x112"):
        vs.decode()


# --- the real LFW file ------------------------------------------------------------------------

def test_real_lfw_bin(shared_data):
    vs = load_bin(shared_data / "lfw.bin")
    assert len(vs.images) == 12000 and vs.num_pairs == 6000 and vs.issame.sum() == 3000
    assert len({id(img) for img in vs.images}) == 7701  # distinct JPEGs, stored once each
    folds = vs.issame.reshape(10, 600)  # LFW View 2: 10 folds of 300 same + 300 different, in file order
    assert (folds.sum(axis=1) == 300).all()
    images = vs.decode(progress=False)
    assert images.shape == (12000, 112, 112, 3) and images.dtype == np.uint8
    assert 60 < images.mean() < 200


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(DataFormatError, match="no such verification .bin"):
        load_bin(tmp_path / "nope.bin")

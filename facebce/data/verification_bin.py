"""Verification .bin files (LFW, CFP-FP, AgeDB-30, ...): a pickle of `(images, issame)`, read without running code.

A pickle can call any importable function, and .bin files are passed around between
people, so `load_bin` never uses `pickle.load`: it unpickles with an allow-list
(docs/formats.md §5) under which a malicious file is refused before anything of it runs.
Pair k is images 2k and 2k+1; `issame[k]` says whether they show the same person.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from facebce.data.transforms import decode_image
from facebce.errors import DataFormatError
from facebce.fileio import atomic_open

BIN_IMAGE_SIZE = 112
_PROGRESS_MIN_IMAGES = 1000  # below this a progress bar is noise


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The NumPy reconstructors §5 allows, under their NumPy 1 (`numpy.core`) and NumPy 2 (`numpy._core`) names.

    Files written by either NumPy major version name their own module; both map to the installed functions.
    """
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:  # NumPy < 1.26 has only numpy.core
        multiarray = importlib.import_module("numpy.core.multiarray")
        numeric = importlib.import_module("numpy.core.numeric")
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


_NUMPY_GLOBALS = _numpy_globals()
_LATIN1_NAMES = ("latin1", "latin-1")


class _RefuseOutOfBandBuffers:
    """Given as `buffers=`: a protocol-5 NEXT_BUFFER opcode asks it for a buffer, and it refuses."""

    def __init__(self, where: str):
        self._where = where

    def __iter__(self):
        return self

    def __next__(self):
        raise DataFormatError(f"{self._where}: refused out-of-band buffer (pickle protocol 5 NEXT_BUFFER)")


def _ints(shape, where: str, what: str) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise DataFormatError(f"{where}: refused {what} shape {str(shape)[:80]} (expected non-negative ints)")
    return tuple(int(n) for n in shape)


class _AllowListUnpickler(pickle._Unpickler):
    """Resolves only the globals docs/formats.md §5 lists; anything else is refused before it is imported or called.

    Bounded by the file: the unpickler reads from the file's bytes in memory (a declared length
    beyond them reads what is there and fails, never allocates the declared size), and every NumPy
    reconstructor and state it accepts is checked first: no object dtypes (numpy would fill them
    from pickle data, and can crash doing so), no array, dtype or scalar larger than the file
    (`limit` bytes) -- a 67-byte pickle declaring a 3-billion-element array is refused before numpy
    allocates. The pure-Python unpickler is used because its BUILD step can be checked; it costs
    ~0.1 s on LFW's 12000 images.
    `encoding='bytes'` keeps Python-2 `str` images as bytes (the default ASCII decoding fails on 0xFF).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, where: str, limit: int):
        super().__init__(file, encoding="bytes", buffers=_RefuseOutOfBandBuffers(where))
        self._where, self._limit = where, limit
        self._calls = {np.ndarray: None, np.dtype: self._dtype}
        for (module, name), fn in _NUMPY_GLOBALS.items():
            if name == "_reconstruct":
                self._calls[fn] = self._reconstruct
            elif name == "scalar":
                self._calls[fn] = self._scalar
            elif name == "_frombuffer":
                self._calls[fn] = self._frombuffer

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return self._encode_latin1
        try:
            return _NUMPY_GLOBALS[(module, name)]
        except KeyError:
            raise DataFormatError(
                f"{self._where}: refused pickle global {module}.{name} (not on the .bin allow-list)") from None

    def persistent_load(self, pid):
        raise DataFormatError(f"{self._where}: refused persistent id in pickle")

    def _encode_latin1(self, text, encoding):
        """`_codecs.encode` as Python 3 pickles `bytes` at protocol <= 2: str -> latin1 bytes, nothing else."""
        if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1_NAMES:
            raise DataFormatError(
                f"{self._where}: refused _codecs.encode({type(text).__name__}, {encoding!r}) (only latin1 str allowed)")
        return text.encode("latin1")

    # -------------------------------------------------------------- checked numpy reconstructors
    def _refuse(self, what: str):
        raise DataFormatError(f"{self._where}: refused {what}")

    def _bounded(self, shape, dtype: np.dtype, what: str) -> tuple[int, ...]:
        shape = _ints(shape, self._where, what)
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if nbytes > self._limit:
            self._refuse(f"{what} of shape {shape} {dtype}: {nbytes:,} bytes declared, more than the "
                         f"file's {self._limit:,} bytes can hold")
        return shape

    def _checked_dtype(self, dt, what: str) -> np.dtype:
        if not isinstance(dt, np.dtype):
            self._refuse(f"{what}: dtype is {type(dt).__name__}, expected numpy.dtype")
        if dt.hasobject or dt.itemsize > self._limit:
            self._refuse(f"{what}: dtype {dt} (object dtypes and itemsizes beyond the file are not allowed)")
        return dt

    def _dtype(self, obj, align=False, copy=False):
        if not isinstance(obj, (str, bytes)) or len(obj) > 16:
            self._refuse(f"numpy.dtype({str(obj)[:40]!r}) (only short type codes such as 'u1')")
        try:
            dt = np.dtype(obj.decode("latin1") if isinstance(obj, bytes) else obj, align=bool(align), copy=bool(copy))
        except (TypeError, ValueError) as e:
            self._refuse(f"numpy.dtype({obj!r}) ({e})")
        return self._checked_dtype(dt, "numpy.dtype")

    def _reconstruct(self, subtype, shape, dtype):
        if subtype is not np.ndarray:
            self._refuse(f"_reconstruct of {getattr(subtype, '__name__', type(subtype).__name__)} (only numpy.ndarray)")
        dt = self._dtype(dtype) if not isinstance(dtype, np.dtype) else self._checked_dtype(dtype, "_reconstruct")
        return np.ndarray(self._bounded(shape, dt, "array"), dt)

    def _scalar(self, dtype, data=None):
        dt = self._checked_dtype(dtype, "numpy scalar")
        if not isinstance(data, (bytes, bytearray)) or len(data) != dt.itemsize:
            self._refuse(f"numpy scalar of {dt} from {type(data).__name__} (expected {dt.itemsize} bytes)")
        return np.frombuffer(data, dt)[0]

    def _frombuffer(self, buf, dtype, shape, order):
        dt = self._checked_dtype(dtype, "_frombuffer")
        if not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F"):
            self._refuse(f"_frombuffer of {type(buf).__name__} (expected bytes)")
        shape = self._bounded(shape, dt, "_frombuffer array")
        if int(np.prod(shape, dtype=object)) * dt.itemsize != len(buf):
            self._refuse(f"_frombuffer: {len(buf)} bytes do not fill shape {shape} {dt}")
        return np.frombuffer(buf, dt).reshape(shape, order=order)

    # -------------------------------------------------------------- opcodes that build objects
    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if getattr(func, "__func__", None) is _AllowListUnpickler._encode_latin1:
            call = func
        else:  # numpy.ndarray itself maps to None: calling it would allocate any declared shape
            call = next((c for f, c in self._calls.items() if f is func), None)
        if call is None or not isinstance(args, tuple):
            self._refuse(f"call of {getattr(func, '__name__', type(func).__name__)} in the pickle")
        self.stack[-1] = call(*args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.ndarray) and type(inst) is np.ndarray:
            self._build_array(inst, state)
        elif isinstance(inst, np.dtype):
            self._build_dtype(inst, state)
        else:
            self._refuse(f"setting the state of a {type(inst).__name__}")
    dispatch[pickle.BUILD[0]] = load_build

    def _build_array(self, arr: np.ndarray, state) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            self._refuse("ndarray state (expected a 4- or 5-tuple)")
        shape, dt, fortran, raw = state[-4:]
        dt = self._checked_dtype(dt, "ndarray state")
        shape = self._bounded(shape, dt, "array")
        if not isinstance(raw, (bytes, bytearray)) or not isinstance(fortran, (bool, int)):
            self._refuse(f"ndarray state with {type(raw).__name__} data (expected bytes)")
        arr.__setstate__(state)

    def _build_dtype(self, dt: np.dtype, state) -> None:
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[3] is not None or state[4] is not None:
            self._refuse("dtype state (only plain numeric dtypes: no fields, no subarrays)")
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in state[-3:]):
            self._refuse("dtype state (elsize, alignment and flags must be ints)")
        dt.__setstate__(state)
        self._checked_dtype(dt, "dtype state")

    def _no_instances(self):
        self._refuse("object construction (NEWOBJ/INST/OBJ) in the pickle")
    for _op in (pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.INST, pickle.OBJ):
        dispatch[_op[0]] = _no_instances
    del _op


@dataclass
class VerificationSet:
    """A loaded .bin: `images[2k]`, `images[2k+1]` form pair k, `issame[k]` its label."""

    images: list[bytes]
    issame: np.ndarray
    path: Path

    @property
    def num_pairs(self) -> int:
        return len(self.issame)

    def distinct(self) -> tuple[np.ndarray, np.ndarray]:
        """(index of the first image of each distinct stored image, per image the number of its
        distinct image): a .bin stores a repeated image once and `load_bin` gives it one object."""
        return distinct_indices([id(b) for b in self.images])

    def decode(self, *, image_size: int = BIN_IMAGE_SIZE, progress: bool = True) -> np.ndarray:
        """All images as RGB uint8 N x S x S x 3.

        A width other than S gets its short side resized to S (insightface's `load_bin`); anything
        that is not then S x S, or does not decode, is a DataFormatError naming the image index.
        Identical images are stored once in a .bin (7701 distinct of 12000 in LFW), so each is decoded once.
        """
        out = np.empty((len(self.images), image_size, image_size, 3), np.uint8)
        first_seen: dict[int, int] = {}
        show = progress and len(self.images) >= _PROGRESS_MIN_IMAGES
        for i, buf in enumerate(tqdm(self.images, desc=f"decode {self.path.name}", unit="img", disable=not show)):
            j = first_seen.setdefault(id(buf), i)
            out[i] = out[j] if j != i else self._decode_one(i, image_size)
        return out

    def _decode_one(self, i: int, size: int) -> np.ndarray:
        where = f"{self.path} image {i}"
        img = decode_image(self.images[i], where=where)
        if img.shape[1] != size:
            img = _resize_short_side(img, size)
        if img.shape[:2] != (size, size):
            raise DataFormatError(f"{where}: image is {img.shape[0]}x{img.shape[1]}, expected {size}x{size}")
        return img


def distinct_indices(keys: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(index of the first occurrence of each distinct key, per key the number of its distinct key)."""
    row: dict = {}
    inverse = np.array([row.setdefault(k, len(row)) for k in keys], np.int64)
    first = np.full(len(row), -1, np.int64)
    first[inverse[::-1]] = np.arange(len(keys))[::-1]  # reversed: the lowest index is written last
    return first, inverse


def _resize_short_side(img: np.ndarray, size: int) -> np.ndarray:
    """MXNet's `resize_short` with its default area interpolation: the shorter side becomes `size`."""
    h, w = img.shape[:2]
    new_h, new_w = (size * h // w, size) if h > w else (size, size * w // h)
    return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)


def load_bin(path: str | os.PathLike, *, allow_yaw: bool = False) -> VerificationSet:
    """Read a verification .bin safely (see the module docstring) and validate it (docs/formats.md §5).

    Images are checked lazily: `VerificationSet.decode` names any image that does not decode.
    `allow_yaw=True` accepts the 3-tuple `(images, yaw, issame)` some scripts write; yaw is dropped.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise DataFormatError(f"{where}: no such verification .bin file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataFormatError(f"{where}: cannot read ({e.strerror or e})") from None
    if not data:
        raise DataFormatError(f"{where}: empty file (0 bytes), not a verification .bin")
    try:
        obj = _AllowListUnpickler(io.BytesIO(data), where, limit=len(data)).load()
    except DataFormatError:
        raise
    except Exception as e:  # any failure of an untrusted pickle is a format error of this file
        detail = " ".join(str(e).split())[:200]
        raise DataFormatError(f"{where}: not a readable pickle ({type(e).__name__}: {detail})") from None
    images, issame = _unpack(obj, where, allow_yaw)
    return VerificationSet(*_checked(images, issame, where), path=path)


def _unpack(obj, where: str, allow_yaw: bool) -> tuple[object, object]:
    """Split the top-level tuple into (images, issame)."""
    if not isinstance(obj, (tuple, list)):
        raise DataFormatError(f"{where}: top level is {type(obj).__name__}, expected a tuple (images, issame)")
    if len(obj) == 3:
        if not allow_yaw:
            raise DataFormatError(f"{where}: 3-tuple (images, yaw, issame) refused; pass allow_yaw=True to read it")
        return obj[0], obj[2]
    if len(obj) != 2:
        raise DataFormatError(f"{where}: top level has {len(obj)} items, expected 2 (images, issame)")
    return obj[0], obj[1]


def _checked(images, issame, where: str) -> tuple[list[bytes], np.ndarray]:
    """Validate types and lengths; images become bytes (same object for the same input), labels a bool array."""
    if not isinstance(images, (list, tuple)):
        raise DataFormatError(f"{where}: images are {type(images).__name__}, expected a list")
    out_images = [_image_bytes(img, where, i) for i, img in enumerate(images)]
    labels = _issame_array(issame, where)
    if len(out_images) != 2 * len(labels):
        raise DataFormatError(
            f"{where}: {len(out_images)} images but {len(labels)} pairs (need 2 per pair)")
    return out_images, labels


def _image_bytes(img, where: str, i: int) -> bytes:
    """Encoded image bytes; 1-D uint8 arrays (from `cv2.imencode`) are converted."""
    if isinstance(img, bytes):
        return img
    if isinstance(img, np.ndarray) and img.ndim == 1 and img.dtype == np.uint8:
        return img.tobytes()
    kind = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
    raise DataFormatError(f"{where}: image {i} is {kind}, expected bytes or a 1-D uint8 array")


def _issame_array(issame, where: str) -> np.ndarray:
    """Labels as a 1-D bool array; only bools count (0/1 integers are refused: they hint at a different format)."""
    if isinstance(issame, np.ndarray):
        if issame.dtype != np.bool_ or issame.ndim != 1:
            raise DataFormatError(
                f"{where}: issame is a {issame.dtype} array of shape {issame.shape}, expected 1-D bool")
        return issame.copy()
    if not isinstance(issame, (list, tuple)):
        raise DataFormatError(f"{where}: issame is {type(issame).__name__}, expected a list of bools")
    for k, x in enumerate(issame):
        if not isinstance(x, (bool, np.bool_)):
            raise DataFormatError(f"{where}: issame[{k}] is {type(x).__name__} {x!r}, expected bool")
    return np.array(issame, dtype=bool)


def save_bin(path: str | os.PathLike, images: Sequence[bytes | np.ndarray], issame: Sequence[bool]) -> None:
    """Write a .bin that needs no pickle globals: protocol 4, `bytes` images, Python `bool` labels.

    Equal images are written once (the pickle memo then refers back), as in the original files.
    Written through `facebce.fileio.atomic_open` (temp file, fsync, rename): readers never see half a file.
    """
    path = Path(path)
    out_images, labels = _checked(images, issame, str(path))
    distinct: dict[bytes, bytes] = {}
    out_images = [distinct.setdefault(img, img) for img in out_images]
    if path.is_dir():
        raise DataFormatError(f"{path}: is a folder, expected a .bin file path")
    with atomic_open(path, "wb") as f:
        pickle.dump((out_images, [bool(x) for x in labels]), f, protocol=4)

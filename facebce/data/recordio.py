"""Pure-Python MXNet RecordIO: framing (.rec), index (.idx), IRHeader image records, and a packer.

Byte layout follows docs/formats.md §1-3 (dmlc-core recordio + mxnet/recordio.py + insightface
face2rec2), so packs written by real mxnet read here and packs written here read in mxnet.
"""
from __future__ import annotations

import contextlib
import operator
import os
import struct
from pathlib import Path
from typing import BinaryIO, NamedTuple, Sequence

import numpy as np

from facebce.errors import DataFormatError
from facebce.fileio import atomic_open

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_BITS = 29
_LEN_MASK = (1 << _LEN_BITS) - 1
_CHUNK_HEAD = struct.Struct("<II")

_IRHEADER = struct.Struct("<IfQQ")
IRHEADER_SIZE = _IRHEADER.size  # 24

# float32 holds every integer up to 2**24 exactly; record keys stored as labels beyond that are lossy.
FLOAT32_EXACT_MAX = 1 << 24


# ---------------------------------------------------------------- image record payload (IRHeader)

class IRHeader(NamedTuple):
    """The 24-byte header mxnet puts before image bytes; `label` is the raw f32 field (0 when flag > 0)."""
    flag: int
    label: float
    id: int
    id2: int


def pack_image_record(label: float | Sequence[float], img_bytes: bytes, *, id: int = 0, id2: int = 0) -> bytes:
    """IRHeader + labels + image bytes, as `mx.recordio.pack`: a sequence label sets flag = its length."""
    if np.ndim(label) == 0:
        return _IRHEADER.pack(0, float(label), id, id2) + bytes(img_bytes)
    labels = np.asarray(label, dtype="<f4")
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"label must be a scalar or a non-empty 1-D sequence, got shape {labels.shape}")
    return _IRHEADER.pack(labels.size, 0.0, id, id2) + labels.tobytes() + bytes(img_bytes)


def unpack_image_record(payload: bytes, *, where: str = "record") -> tuple[IRHeader, float | np.ndarray, bytes]:
    """Split a payload into (header, label, image bytes); label is a float32 array when flag > 0."""
    if len(payload) < IRHEADER_SIZE:
        raise DataFormatError(f"{where}: payload is {len(payload)} bytes, shorter than the "
                              f"{IRHEADER_SIZE}-byte IRHeader")
    header = IRHeader(*_IRHEADER.unpack_from(payload))
    if header.flag == 0:
        return header, header.label, payload[IRHEADER_SIZE:]
    end = IRHEADER_SIZE + 4 * header.flag
    if len(payload) < end:
        raise DataFormatError(f"{where}: IRHeader flag {header.flag} needs {end} bytes of labels, "
                              f"payload has {len(payload)}")
    labels = np.frombuffer(payload, dtype="<f4", count=header.flag, offset=IRHEADER_SIZE).astype(np.float32)
    return header, labels, payload[end:]


def class_of(label: float | np.ndarray) -> float:
    """The class id of a record label: label[0] for array labels (face2rec2), else the scalar."""
    return float(label[0]) if isinstance(label, np.ndarray) else float(label)


# ---------------------------------------------------------------- framing

def _aligned_magic_positions(payload: bytes) -> list[int]:
    """Offsets (multiples of 4) where the magic word occurs in the payload; the writer splits there."""
    found, pos = [], payload.find(_MAGIC_BYTES)
    while pos >= 0:
        if pos % 4 == 0:
            found.append(pos)
            pos = payload.find(_MAGIC_BYTES, pos + 4)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
    return found


def _chunk(cflag: int, data: bytes) -> bytes:
    pad = -len(data) % 4
    return _CHUNK_HEAD.pack(MAGIC, (cflag << _LEN_BITS) | len(data)) + data + b"\0" * pad


def frame_record(payload: bytes) -> bytes:
    """Encode one record as dmlc's RecordIOWriter does: aligned magic words split it into parts 1/2/3."""
    if len(payload) > _LEN_MASK:
        raise ValueError(f"record of {len(payload)} bytes exceeds the RecordIO limit of 2^29 - 1")
    cuts = _aligned_magic_positions(payload)
    if not cuts:
        return _chunk(0, payload)
    starts = [0] + [c + 4 for c in cuts]
    ends = cuts + [len(payload)]
    flags = [1] + [2] * (len(cuts) - 1) + [3]
    return b"".join(_chunk(f, payload[s:e]) for f, s, e in zip(flags, starts, ends))


def _read_exact(fh: BinaryIO, n: int, where: str, what: str, pos: int, size: int) -> bytes:
    """n bytes at the current position; a length beyond the file's `size` is refused before reading
    (a damaged chunk header can declare up to 512 MB, which read(n) would allocate)."""
    if pos + n > size:
        raise DataFormatError(f"{where}: truncated file: {what} at offset {pos} needs {n} bytes, "
                              f"only {max(size - pos, 0)} left")
    data = fh.read(n)
    if len(data) != n:
        raise DataFormatError(f"{where}: truncated file: {what} at offset {pos} needs {n} bytes, only {len(data)} left")
    return data


def read_framed_record(fh: BinaryIO, offset: int, where: str, size: int | None = None) -> bytes:
    """Read the record whose first chunk starts at `offset`, re-joining multi-part records.

    Stricter than dmlc: a part 2/3 without a preceding part 1, or a part 0/1 inside a multi-part
    record, is an error rather than silently mis-joined data. `size`: the file's size (fstat when
    not given); no chunk is read past it.
    """
    if size is None:
        size = os.fstat(fh.fileno()).st_size
    fh.seek(offset)
    parts: list[bytes] = []
    while True:
        pos = fh.tell()
        magic, lrec = _CHUNK_HEAD.unpack(_read_exact(fh, 8, where, "chunk header", pos, size))
        if magic != MAGIC:
            raise DataFormatError(f"{where}: bad magic 0x{magic:08X} at offset {pos} (expected 0x{MAGIC:08X})")
        cflag, length = lrec >> _LEN_BITS, lrec & _LEN_MASK
        if cflag > 3:
            raise DataFormatError(f"{where}: invalid chunk flag {cflag} at offset {pos}")
        if parts and cflag in (0, 1):
            raise DataFormatError(f"{where}: chunk flag {cflag} at offset {pos} inside a multi-part record")
        if not parts and cflag in (2, 3):
            raise DataFormatError(f"{where}: part {cflag} at offset {pos} without a preceding part 1")
        data = _read_exact(fh, length + (-length % 4), where, "chunk", pos, size)
        parts.append(data[:length])
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts)


# ---------------------------------------------------------------- indexed writer / reader

class _Place:
    """A record's '<rec file>: record <key> (offset N)', formatted on demand (f-strings, str())."""

    __slots__ = ("reader", "key")

    def __init__(self, reader: "IndexedRecordReader", key: int):
        self.reader, self.key = reader, key

    def __str__(self) -> str:
        return self.reader.where(self.key)

class RecordIOWriter:
    """Writes a .rec and its .idx; both appear under their final names only on a successful close.

    Each file is written through `facebce.fileio.atomic_open` (temporary file beside it, fsync,
    rename), so a crash or an exception inside the `with` block never leaves a half-written file.
    The two renames are two steps: a crash between them can leave a new .rec beside an old .idx.
    `pack_image_folder` therefore writes a whole pack into a fresh folder and swaps folders; use it
    (or write into an empty folder) when replacing a pack someone may read.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self._stack = contextlib.ExitStack()
        try:
            self._rec = self._stack.enter_context(atomic_open(self.rec_path, "wb"))
            self._idx = self._stack.enter_context(atomic_open(self.idx_path, "wb"))
        except BaseException:
            self._stack.close()
            raise
        self._keys: set[int] = set()

    def write(self, key: int, payload: bytes) -> None:
        key = operator.index(key)  # a float key would write '3.0' into the .idx
        if key in self._keys:
            raise ValueError(f"{self.rec_path}: record key {key} written twice")
        self._keys.add(key)
        self._idx.write(f"{key}\t{self._rec.tell()}\n".encode())
        self._rec.write(frame_record(payload))

    def close(self) -> None:
        """fsync and move both files into place (the .idx is renamed first, then the .rec)."""
        self._stack.close()

    def abort(self) -> None:
        """Drop everything written so far; the final paths are left untouched."""
        self._stack.__exit__(_Aborted, _Aborted(), None)

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _Aborted(Exception):
    """Thrown into the writer's atomic_open contexts to make them discard their temporary files."""


class IndexedRecordReader:
    """Random access to a .rec by key through its .idx.

    The .idx is validated up front (syntax, duplicate keys, offsets inside the file and 4-aligned);
    that each offset points at a magic word is checked when the record is read, which avoids one
    seek per record at start-up on multi-million-record sets. The file handle is opened lazily and
    re-opened in a new process, so a reader can be pickled into DataLoader workers.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self._fh: BinaryIO | None = None
        self._pid: int | None = None
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise DataFormatError(f"{path}: file not found")
        self._size = self.rec_path.stat().st_size
        self._offsets = _parse_idx(self.idx_path, self._size)

    @property
    def keys(self) -> list[int]:
        """Record keys in .idx order."""
        return list(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets)

    def __contains__(self, key: int) -> bool:
        return key in self._offsets

    def where(self, key: int) -> str:
        """'<rec file>: record <key> (offset N)', the prefix of every error about this record."""
        return f"{self.rec_path}: record {key} (offset {self._offsets[key]})"

    def place(self, key: int) -> "_Place":
        """`where(key)` made only when an error message formats it (the hot read path builds none)."""
        return _Place(self, key)

    def read(self, key: int) -> bytes:
        """The payload of record `key` (KeyError if the .idx has no such key)."""
        if key not in self._offsets:
            raise KeyError(f"{self.idx_path}: no record with key {key}")
        return read_framed_record(self._file(), self._offsets[key], self.place(key), self._size)

    def _file(self) -> BinaryIO:
        """This process's handle: a forked child must not share (and seek) its parent's file offset."""
        if self._fh is None or self._pid != os.getpid():
            self.close()  # in a child this closes only the child's copy of the descriptor
            self._fh = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._fh

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fh"] = state["_pid"] = None
        return state

    def __enter__(self) -> "IndexedRecordReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_idx(idx_path: Path, rec_size: int) -> dict[int, int]:
    """Parse '<key>\\t<offset>' lines into {key: offset}, rejecting anything a writer cannot produce."""
    offsets: dict[int, int] = {}
    try:
        text = idx_path.read_bytes().decode("utf-8")
    except OSError as e:
        raise DataFormatError(f"{idx_path}: cannot read the index ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{idx_path}: not a RecordIO index: byte {e.start} is not UTF-8 text "
                              f"(expected '<key>\\t<offset>' lines)") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{idx_path}: line {lineno}"
        fields = line.split("\t")
        try:
            key, offset = (int(f) for f in fields)
        except ValueError:
            raise DataFormatError(f"{where}: expected '<key>\\t<offset>', got {line[:80]!r}") from None
        if key in offsets:
            raise DataFormatError(f"{where}: record {key}: duplicate key")
        if offset < 0 or offset + _CHUNK_HEAD.size > rec_size:
            raise DataFormatError(f"{where}: record {key}: offset {offset} is past the end of the "
                                  f".rec ({rec_size} bytes)")
        if offset % 4:
            raise DataFormatError(f"{where}: record {key}: offset {offset} is not 4-byte aligned")
        offsets[key] = offset
    if not offsets:
        raise DataFormatError(f"{idx_path}: empty index: no '<key>\\t<offset>' lines "
                              f"(the .rec beside it has {rec_size} bytes)")
    return offsets

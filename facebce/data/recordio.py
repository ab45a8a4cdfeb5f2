"""Pure-Python MXNet RecordIO: framing (.rec), index (.idx), IRHeader image records, and a packer.

Byte layout follows formats.md §1-3 (dmlc-core recordio + mxnet/recordio.py + insightface
face2rec2), so packs written by real mxnet read here and packs written here read in mxnet.
"""
from __future__ import annotations

import contextlib
import glob
import ctypes
import ctypes.util
import operator
import os
import shutil
import struct
import secrets
from pathlib import Path
from typing import BinaryIO, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from facebce.data.image_folder import scan_image_folder
from facebce.data.transforms import decode_image
from facebce.errors import DataFormatError
from facebce.fileio import atomic_open, atomic_write_text, fsync_dir

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


# ---------------------------------------------------------------- image folder -> MS1M-style pack

class PackSummary(NamedTuple):
    """What pack_image_folder wrote (the CLI prints it)."""
    num_classes: int
    num_images: int
    image_size: tuple[int, int]
    rec_bytes: int


PACK_FILES = ("train.rec", "train.idx", "property")


def pack_image_folder(root: str | os.PathLike, out_dir: str | os.PathLike, *,
                      label_style: str = "scalar", progress: bool = True) -> PackSummary:
    """Pack `root/<identity>/*.jpg|png` into out_dir/train.rec, train.idx, property (face2rec2 layout).

    Record 0 is the header [a, b]; records 1..a-1 hold the original file bytes (identities sorted,
    files sorted) with the class id as label (`label_style="scalar"`, flag 0) or face2rec2's
    [class_id, 1.0] (`"face2rec2"`); records a..b-1 are one [start, end) range per identity.
    Every image must decode and all must share one size, which goes into `property`.

    Replacing a pack is all-or-nothing (see `_swap_in`): the three files are written into a fresh
    hidden sibling folder and that folder takes out_dir's place in one atomic step, so a reader
    (or a kill -9 at any moment) sees the old pack or the new one, never a new train.rec beside
    an old train.idx.
    """
    if label_style not in ("scalar", "face2rec2"):
        raise ValueError(f"label_style must be 'scalar' or 'face2rec2', got {label_style!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataFormatError(f"{out}: exists and is not a folder (the pack's output folder)")
    classes, paths, labels = scan_image_folder(root)
    a = len(paths) + 1
    b = a + len(classes)
    if b > FLOAT32_EXACT_MAX:
        raise ValueError(f"{root}: {len(paths)} images and {len(classes)} identities need record keys "
                         f"above 2^24, which float32 header labels cannot hold exactly")
    with _staging_folder(out) as stage:
        with RecordIOWriter(stage / "train.rec", stage / "train.idx") as writer:
            writer.write(0, pack_image_record([a, b], b"", id=0))
            size = _write_images(writer, paths, labels, label_style, progress)
            for cls, (start, end) in enumerate(_class_ranges(labels, len(classes))):
                writer.write(a + cls, pack_image_record([start, end], b"", id=a + cls))
        atomic_write_text(stage / "property", f"{len(classes)},{size[0]},{size[1]}\n")
        rec_bytes = (stage / "train.rec").stat().st_size
        _swap_in(stage, out)
    return PackSummary(len(classes), len(paths), size, rec_bytes)


# ---------------------------------------------------------------- replacing a pack folder atomically

_STAGE_TAG = ".packing-"


@contextlib.contextmanager
def _staging_folder(out: Path):
    """A new hidden folder beside `out` (same filesystem) holding a link to each of out's other
    entries (a pack often sits beside verification .bin files); removed on exit, whatever happens.
    Stale staging folders of killed packs (their process is gone) are removed first."""
    out = Path(os.path.realpath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(out)
    stage = _new_stage(out)
    try:
        if out.is_dir():
            _link_tree(out, stage, skip=PACK_FILES)
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _new_stage(out: Path) -> Path:
    """mkdir (mode from the umask, like any new folder) of a unique `.<name>.packing-<pid>-<token>`."""
    while True:
        stage = out.with_name(f".{out.name}{_STAGE_TAG}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(stage)
        except FileExistsError:
            continue
        if out.is_dir():
            os.chmod(stage, out.stat().st_mode & 0o7777)  # the replacement keeps the folder's mode
        return stage


def _remove_stale_stages(out: Path) -> None:
    for p in out.parent.glob(f".{glob.escape(out.name)}{_STAGE_TAG}*"):
        pid = p.name[len(out.name) + 1 + len(_STAGE_TAG):].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _link_tree(src: Path, dst: Path, skip: Sequence[str] = ()) -> None:
    """Hard-link (copy where links fail) every entry of `src` into the existing folder `dst`."""
    def link(a, b):
        try:
            os.link(a, b, follow_symlinks=False)
        except OSError:
            shutil.copy2(a, b, follow_symlinks=False)
    for entry in os.scandir(src):
        if entry.name in skip or (entry.name.startswith(".") and _STAGE_TAG in entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, dst / entry.name, symlinks=True, copy_function=link)
        else:
            link(entry.path, dst / entry.name)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL (filesystem cannot), ENOSYS (kernel cannot), EOPNOTSUPP
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _swap_in(stage: Path, out: Path) -> None:
    """Make the finished folder `stage` appear as `out` in one step.

    - `out` absent: rename(stage, out), atomic.
    - `out` exists: renameat2(RENAME_EXCHANGE) swaps the two folders atomically; the old pack ends
      up under the staging name and is deleted with it.
    - Where the kernel or filesystem cannot exchange: rename out aside, then stage into place. A
      kill between the two leaves no `out` folder at all (reported as missing; the old pack is in
      the hidden `.<name>.packing-*` sibling) -- still never a mix of two packs.
    """
    fsync_dir(stage)  # the files themselves were fsynced by atomic_open
    out = Path(os.path.realpath(out))
    if not out.exists():
        os.rename(stage, out)
    elif not _exchange(stage, out):
        aside = stage.with_name(stage.name + "-old")
        os.rename(out, aside)
        os.rename(stage, out)
        os.rename(aside, stage)  # so the staging context removes it
    fsync_dir(out.parent)


def _write_images(writer: RecordIOWriter, paths: list[Path], labels: np.ndarray,
                  label_style: str, progress: bool) -> tuple[int, int]:
    """Write image records 1..n and return the common (H, W); the first image sets it."""
    size: tuple[int, int] | None = None
    for key, (path, label) in enumerate(tqdm(list(zip(paths, labels)), desc="pack", unit="img",
                                             disable=None if progress else True), start=1):
        data = path.read_bytes()
        img = decode_image(data, where=str(path), size=size)
        size = size or img.shape[:2]
        record_label = float(label) if label_style == "scalar" else [float(label), 1.0]
        writer.write(key, pack_image_record(record_label, data, id=key))
    return size


def _class_ranges(labels: np.ndarray, num_classes: int) -> list[tuple[int, int]]:
    """[start, end) record-key ranges per class; image keys start at 1 and labels are sorted."""
    ends = np.searchsorted(labels, np.arange(num_classes), side="right") + 1
    starts = np.concatenate([[1], ends[:-1]])
    return [(int(s), int(e)) for s, e in zip(starts, ends)]

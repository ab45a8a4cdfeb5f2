"""File I/O every layer shares (leaf module: imports only `facebce.errors`).

- Atomic writes: a temporary file beside the target, fsynced, given the permissions the umask
  gives a normal file (mkstemp's 0600 would hide a model from a service running as another user),
  renamed over the target, then the folder fsynced. A reader sees the old file or the new one,
  never a mix, and a write that returned survives a crash.
- Image reading: bytes from disk with `np.fromfile` (non-ASCII paths work), the pixel count read
  from the file header and refused before decoding when it is over a bound (a 74-byte PNG can
  declare 40000 x 40000 pixels), then OpenCV's decoder.
- Row normalisation: float32 rows of unit length, with NaN/Inf, zero rows and wrong shapes
  reported as one-line errors naming the data.
"""
from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from facebce.errors import DataFormatError

# Decoding more than this many pixels is refused unless a caller asks for more (100 MP: any
# camera photo; 300 MB of BGR pixels).
MAX_IMAGE_PIXELS = 100_000_000


# ---------------------------------------------------------------------------------------------
# atomic writes


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def normal_file_mode() -> int:
    """The mode open(path, 'w') would give a new file: 0o666 less the process umask."""
    return 0o666 & ~_umask()


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so a rename inside it survives a crash (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                fsync: bool = True) -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path` atomically.

    On an exception the temporary file is removed and `path` is left as it was. `fsync=False` skips
    the two fsyncs (for scratch files whose loss after a power cut is harmless).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode {mode!r}, expected 'wb' or 'w'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None,
                       newline=None if "b" in mode else "") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, normal_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> None:
    with atomic_open(path, "w", encoding="utf-8", fsync=fsync) as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------
# images


def image_size_from_header(buf: bytes | np.ndarray) -> tuple[int, int] | None:
    """(width, height) read from a PNG, JPEG, GIF, BMP or WebP header, or None when the format is
    not one of these or the header is cut short. Reads only the header: nothing is decoded."""
    b = bytes(buf[:65536]) if isinstance(buf, np.ndarray) else bytes(buf[:65536])
    try:
        if b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR":
            w, h = struct.unpack(">II", b[16:24])
            return w, h
        if b[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", b[6:10])
            return w, h
        if b[:2] == b"BM":
            w, h = struct.unpack("<ii", b[18:26])
            return abs(w), abs(h)
        if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
            chunk = b[12:16]
            if chunk == b"VP8X":
                w = int.from_bytes(b[24:27], "little") + 1
                h = int.from_bytes(b[27:30], "little") + 1
                return w, h
            if chunk == b"VP8 ":
                w, h = struct.unpack("<HH", b[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if chunk == b"VP8L":
                bits = int.from_bytes(b[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            return None
        if b[:2] == b"\xff\xd8":
            i = 2
            while i + 9 < len(b):
                if b[i] != 0xFF:
                    i += 1
                    continue
                marker = b[i + 1]
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                    i += 1 if marker == 0xFF else 2
                    continue
                length = struct.unpack(">H", b[i + 2:i + 4])[0]
                if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                    h, w = struct.unpack(">HH", b[i + 5:i + 9])
                    return w, h
                i += 2 + length
            return None
    except struct.error:
        return None
    return None


def decode_bgr(buf: bytes | np.ndarray, *, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode image bytes to a BGR uint8 H x W x 3 array; DataFormatError naming `where` when the
    bytes do not decode or the header declares more than `max_pixels` pixels (checked before
    decoding, so a decompression bomb never allocates)."""
    import cv2

    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    if not arr.size:
        raise DataFormatError(f"{where}: empty image file")
    size = image_size_from_header(arr)
    if size is not None and size[0] * size[1] > max_pixels:
        raise DataFormatError(f"{where}: image declares {size[0]}x{size[1]} pixels, "
                              f"over the limit of {max_pixels:,}; refused before decoding")
    try:
        img = cv2.imdecode(arr, cv2.IMREAD_COLOR)
    except cv2.error as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataFormatError(f"{where}: image does not decode ({msg})") from None
    if img is None:
        raise DataFormatError(f"{where}: image bytes do not decode ({arr.size} bytes)")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise DataFormatError(f"{where}: image is {img.shape[1]}x{img.shape[0]} pixels, "
                              f"over the limit of {max_pixels:,}")
    return img


def read_bgr(path: str | os.PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read and decode an image file (non-ASCII paths too) to BGR uint8; one-line DataFormatError
    naming the file when it cannot be read, is not an image or is too large."""
    try:
        buf = np.fromfile(os.fspath(path), dtype=np.uint8)
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_bgr(buf, where=os.fspath(path), max_pixels=max_pixels)


# ---------------------------------------------------------------------------------------------
# embeddings


def unit_rows(x, where: str, *, dim: int | None = None, rows: int | None = None,
              what: str = "rows") -> np.ndarray:
    """float32 N x D with unit-length rows. Shape (2-D, `dim` columns, `rows` rows when given),
    NaN/Inf and zero rows are DataFormatErrors naming `where` and the first bad row. Rows already
    of unit length (within 1e-6) are returned bit-unchanged."""
    x = np.asarray(x)
    if (x.ndim != 2 or x.dtype.kind not in "fiu" or (dim is not None and x.shape[1] != dim)
            or (rows is not None and x.shape[0] != rows)):
        want = f"{rows if rows is not None else 'N'} x {dim if dim is not None else 'D'}"
        raise DataFormatError(f"{where}: shape {x.shape} {x.dtype}, expected {want} numbers")
    x = x.astype(np.float32, copy=False)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise DataFormatError(f"{where}: {bad.size} {what} contain NaN or Inf (first: row {bad[0]})")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise DataFormatError(f"{where}: {zero.size} {what} have zero norm (first: row {zero[0]})")
    if np.all(np.abs(norms - 1) <= 1e-6):
        return np.ascontiguousarray(x)
    return np.ascontiguousarray(x / norms)


# ---------------------------------------------------------------------------------------------
# structured files: one-line errors for YAML and torch weights


def load_yaml_file(path: str | os.PathLike, *, what: str = "YAML file"):
    """yaml.safe_load of a UTF-8 file; a missing file, non-UTF-8 bytes or a YAML syntax error is one
    DataFormatError line naming the file (and line/column for syntax errors)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise DataFormatError(f"{path}: is a folder, expected a {what}") from None
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DataFormatError(f"{path}: not valid YAML{where}: {problem}") from None


def torch_load_weights_only(path: str | os.PathLike, *, what: str = "checkpoint"):
    """torch.load(weights_only=True, map_location='cpu'); anything refused or unreadable is one
    DataFormatError line naming the file: 'not a weights-only checkpoint: it contains <global>'
    for pickles that reference code, 'truncated or not a torch file' for damaged bytes."""
    import pickle
    import warnings
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such {what} file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        refused = _pickle_globals(path)
        if refused:
            raise DataFormatError(f"{path}: not a weights-only {what}: it contains {refused[0]} "
                                  "(refused; nothing was executed)") from None
        raise DataFormatError(f"{path}: not a weights-only {what}: damaged, or not a torch file "
                              "(torch's weights-only loader refused it)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError,
            IndexError, TypeError) as e:  # damaged bytes: the unpickler's stack can run out (IndexError)
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        reason = first.split(". ")[0][:160]
        raise DataFormatError(f"{path}: {what} is truncated or not a torch file ({reason})") from None


_TORCH_SAFE_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset",
                        "_codecs.encode", "numpy.")


def _pickle_globals(path: Path) -> list[str]:
    """The module.name globals a pickle (or a torch zip's data.pkl) references that torch's
    weights-only loader would not accept; read with pickletools, nothing is executed."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # a damaged pickle: report what was read before the damage
        pass
    return [g for g in found if not g.startswith(_TORCH_SAFE_PREFIXES)]

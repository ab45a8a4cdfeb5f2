"""Image folder -> MS1M-style pack (train.rec, train.idx, property), replaced atomically.

The pack is written into a hidden sibling folder and swapped in with one directory exchange, so a
reader sees the old pack or the new one, never a mix (see `_swap_in`). Framing and records come
from `facebce.data.recordio`.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import secrets
import shutil
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from facebce.data.image_folder import scan_image_folder
from facebce.data.recordio import FLOAT32_EXACT_MAX, RecordIOWriter, pack_image_record
from facebce.data.transforms import decode_image
from facebce.errors import DataFormatError
from facebce.fileio import atomic_write_text, fsync_dir


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

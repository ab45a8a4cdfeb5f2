"""kill -9 during `data pack` over an existing pack: the folder holds the old pack or the new one, never a mix.

A real (forked) process packs over an existing pack and is killed with SIGKILL at seeded random
moments of its run (bounded: 10 kills). Renames in the child are slowed by 50 ms each (a slow disk), which
widens every window between two file operations where a pack written file by file would be caught
half-replaced. After every kill the folder must load and be byte-identical to the old or the new pack.
"""
from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from facebce.data.rec_dataset import RecDataset
from facebce.data.pack import PACK_FILES, pack_image_folder
from tests.data.hostile import make_faces

KILLS = 10


def snapshot(folder: Path) -> tuple[bytes, ...]:
    return tuple((folder / name).read_bytes() for name in PACK_FILES)


def _slow(f):
    def call(*a, **k):
        out = f(*a, **k)
        time.sleep(0.05)
        return out
    return call


def start(src: Path, out: Path) -> tuple[int, int]:
    """Fork a child process that packs src into out (renames slowed) and writes b'done' to a pipe;
    (pid, read end of the pipe). A fork starts in microseconds, so the kill moments cover the pack."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(r)
            os.rename, os.replace = _slow(os.rename), _slow(os.replace)
            pack_image_folder(src, out, progress=False)
            os.write(w, b"done")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def finish(pid: int, r: int, kill_after: float | None = None) -> bytes:
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    msg = os.read(r, 16)
    os.close(r)
    if kill_after is None:
        assert os.waitstatus_to_exitcode(status) == 0
    return msg


def test_kill_9_during_pack_leaves_old_or_new_pack(tmp_path):
    make_faces(tmp_path / "old_img", {"a": 2, "b": 1, "c": 2})
    make_faces(tmp_path / "new_img", {f"id{k}": 30 for k in range(4)}, seed=1)
    pack_image_folder(tmp_path / "old_img", tmp_path / "ref_old", progress=False)
    pack_image_folder(tmp_path / "new_img", tmp_path / "ref_new", progress=False)
    old, new = snapshot(tmp_path / "ref_old"), snapshot(tmp_path / "ref_new")
    out = tmp_path / "pack"

    # calibration: how long an uninterrupted pack takes
    pack_image_folder(tmp_path / "old_img", out, progress=False)
    t0 = time.perf_counter()
    assert finish(*start(tmp_path / "new_img", out)) == b"done"
    duration = time.perf_counter() - t0
    assert snapshot(out) == new

    rng = random.Random(12)
    outcomes = []
    for _ in range(KILLS):
        pack_image_folder(tmp_path / "old_img", out, progress=False)  # back to the old pack
        delay = rng.uniform(0, duration)
        finish(*start(tmp_path / "new_img", out), kill_after=delay)
        got = snapshot(out)
        assert got in (old, new), f"killed {delay:.3f} s into a {duration:.3f} s pack: a mix of two packs"
        outcomes.append("new" if got == new else "old")
        ds = RecDataset(out, train=False)
        assert len(ds) == (120 if got == new else 5)
        assert sorted(p.name for p in out.iterdir()) == sorted(PACK_FILES)
    print(f"pack took {duration:.3f} s; outcomes after {KILLS} kills: {outcomes}")
    assert "old" in outcomes  # the kills did land inside packs

    # the next pack removes what killed packs left beside the folder
    pack_image_folder(tmp_path / "new_img", out, progress=False)
    assert snapshot(out) == new
    assert not [p.name for p in tmp_path.iterdir() if ".packing-" in p.name]


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux-only")
def test_exchange_fallback_still_gives_old_or_new(tmp_path, monkeypatch):
    """Where the folder exchange is unsupported, two renames are used: never a mix either."""
    from facebce.data import pack as packing
    monkeypatch.setattr(packing, "_exchange", lambda a, b: False)
    make_faces(tmp_path / "img", {"a": 1, "b": 2})
    pack_image_folder(tmp_path / "img", tmp_path / "pack", progress=False)
    make_faces(tmp_path / "img", {"c": 1})
    pack_image_folder(tmp_path / "img", tmp_path / "pack", progress=False)
    assert RecDataset(tmp_path / "pack").num_classes == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "pack"]

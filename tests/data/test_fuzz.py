"""Fuzz-style: mutated copies of a real-format .rec pack and .bin either load or fail with ONE line.

Seeded and bounded (a fixed number of mutants, each under an alarm and a memory bound). Mutations:
bit flips, truncations, splices (a slice of the file copied over another place), inserted and
deleted bytes, and zeroed or 0xFF-filled ranges. Every outcome must be success or a FacebceError
whose message is one line; any other exception type, a hang or a large allocation fails the test
with the seed of the mutant, so a failure can be replayed.
"""
from __future__ import annotations

import os
import random
import signal
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from facebce.data.rec_dataset import RecDataset
from facebce.data.pack import PACK_FILES, pack_image_folder
from facebce.data.tools import inspect_data
from facebce.data.verification_bin import load_bin, save_bin
from facebce.errors import FacebceError
from tests.data.hostile import make_faces

MUTANTS = int(os.environ.get("FACEBCE_FUZZ_MUTANTS", 250))  # per format; FACEBCE_FUZZ_MUTANTS=3000 for a long run
SECONDS_PER_CASE = 5    # an alarm: a hang fails the test instead of stalling the suite
MAX_BYTES = 20_000_000  # traced allocation peak allowed for files of a few kB


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.choice(["flip", "flip", "truncate", "splice", "insert", "delete", "fill"])
    if not b or kind == "truncate":
        return bytes(b[:rng.randrange(len(b) + 1)])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "splice":
        i, j = rng.randrange(len(b)), rng.randrange(len(b))
        n = rng.randint(1, 64)
        b[j:j + n] = b[i:i + n]
    elif kind == "insert":
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "delete":
        i = rng.randrange(len(b))
        del b[i:i + rng.randint(1, 16)]
    else:
        i = rng.randrange(len(b))
        b[i:i + rng.randint(1, 32)] = bytes([rng.choice([0, 255])]) * len(b[i:i + rng.randint(1, 32)])
    return bytes(b)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def check(case: str, fn) -> str:
    """Run fn under an alarm and tracemalloc; 'ok' or 'error', anything else fails naming the case."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_PER_CASE)
    tracemalloc.start()
    try:
        fn()
        outcome = "ok"
    except FacebceError as e:
        assert "\n" not in str(e), f"{case}: multi-line error: {e}"
        assert str(e).strip(), f"{case}: empty error message"
        outcome = "error"
    except _Hang:
        pytest.fail(f"{case}: still running after {SECONDS_PER_CASE} s")
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{case}: {type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MAX_BYTES, f"{case}: {peak:,} bytes allocated"
    return outcome


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("fuzz")
    make_faces(root / "img", {"a": 2, "b": 1, "c": 3}, size=(16, 16))
    pack_image_folder(root / "img", root / "pack", progress=False)
    files = {name: (root / "pack" / name).read_bytes() for name in PACK_FILES}
    rng = np.random.default_rng(0)
    images = [cv2.imencode(".jpg", rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))[1].tobytes()
              for _ in range(3)]
    save_bin(root / "pairs.bin", [images[0], images[1], images[2], images[2]], [False, True])
    files["pairs.bin"] = (root / "pairs.bin").read_bytes()
    return files


def _read_pack(folder: Path) -> None:
    ds = RecDataset(folder, train=False)
    for i in range(len(ds)):
        ds[i]
    inspect_data(folder)


def _read_bin(path: Path) -> None:
    vs = load_bin(path)
    vs.decode(progress=False)
    inspect_data(path)


def test_mutated_rec_packs(originals, tmp_path):
    rng = random.Random(int(os.environ.get("FACEBCE_FUZZ_SEED", 2026)))
    outcomes = []
    for k in range(MUTANTS):
        folder = tmp_path / f"m{k}"
        folder.mkdir()
        target = rng.choice(["train.rec", "train.rec", "train.idx", "property"])
        for name in PACK_FILES:
            data = originals[name]
            (folder / name).write_bytes(mutate(data, rng) if name == target else data)
        outcomes.append(check(f"pack mutant {k} ({target})", lambda: _read_pack(folder)))
    assert outcomes.count("error") > MUTANTS // 4  # the mutations do hit: most damage is noticed


def test_mutated_bins(originals, tmp_path):
    rng = random.Random(int(os.environ.get("FACEBCE_FUZZ_SEED", 2026)) + 1)
    outcomes = []
    for k in range(MUTANTS):
        path = tmp_path / f"m{k}.bin"
        path.write_bytes(mutate(originals["pairs.bin"], rng))
        outcomes.append(check(f"bin mutant {k}", lambda: _read_bin(path)))
    assert outcomes.count("error") > MUTANTS // 4

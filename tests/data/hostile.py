"""Builders of hostile and careless inputs shared by the data, fuzz and align tests."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from facebce.cli import main


def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny PNG (69 bytes) whose header declares width x height pixels, 40000 x 40000 by default."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def array_bomb(elements: int = 3_000_000_000) -> bytes:
    """A 67-byte pickle: numpy.core.multiarray._reconstruct(numpy.ndarray, (elements,), b'b'), an allowed
    reducer declaring an int8 array of `elements` elements."""
    return (b"\x80\x03" + b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n"
            + b"\x8a\x05" + elements.to_bytes(5, "little", signed=True) + b"\x85" + b"C\x01b" + b"\x87R" + b".")


def cli_error(capsys, *argv) -> str:
    """Run the CLI in this process; assert exit 1 and exactly one stderr line, which is returned."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("facebce: error: "), err
    assert "Traceback" not in err
    return lines[0]


def make_faces(root: Path, counts: dict[str, int], size=(16, 16), seed: int = 0) -> None:
    """root/<identity>/<n>.png with random pixels."""
    import cv2
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            (root / name / f"{k:03d}.png").write_bytes(cv2.imencode(".png", img)[1].tobytes())

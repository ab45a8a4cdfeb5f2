"""A real `facebce serve` on 127.0.0.1 in a subprocess (so tests can kill -9 it), and httpx clients."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, SHARED_DATA

MODEL = SHARED_DATA / "models" / "mobilefacenet.onnx"
DETECTOR = SHARED_DATA / "models" / "scrfd_2.5g_bnkps.onnx"
LFW = SHARED_DATA / "lfw_aligned_10plus"
# The shared MobileFaceNet has no facebce metadata: RGB with ImageNet mean/std (shared data README).
MEAN, STD = "123.675,116.28,103.53", "58.395,57.12,57.375"
THRESHOLD = "0.2919"  # the README's LFW threshold for this model
START_TIMEOUT = 240.0  # seconds; the CPU is shared and importing torch + loading ONNX is slow there


def need_shared() -> None:
    for p in (MODEL, LFW):
        if not p.exists():
            pytest.skip(f"real data not found: {p} (put the team's shared/ folder beside the repo or set "
                        f"FACEBCE_SHARED)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m facebce.cli serve ...` on a free loopback port; `start()` waits for /readyz."""

    def __init__(self, gallery: Path, log: Path, *extra: str):
        self.gallery, self.log, self.extra = gallery, log, list(extra)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.port = free_port()
        cmd = [sys.executable, "-m", "facebce.cli", "serve", "--model", str(MODEL), "--mean", MEAN, "--std", STD,
               "--gallery", str(self.gallery), "--threshold", THRESHOLD, "--host", "127.0.0.1",
               "--port", str(self.port), *self.extra]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {START_TIMEOUT:.0f} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def kill9(self) -> None:
        self.proc.kill()  # SIGKILL
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()


def people(n: int, *, start: int = 0) -> list[str]:
    return sorted(p.name for p in LFW.iterdir() if p.is_dir())[start:start + n]


def image(person: str, i: int) -> Path:
    return sorted((LFW / person).glob("*.jpg"))[i]

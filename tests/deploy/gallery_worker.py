"""Process side of tests/deploy/test_gallery_store.py: a writer that adds batches and says which
returned, or a reader that searches in a loop. Not collected by pytest.

  writer GALLERY PREFIX FIRST LAST SEED CHECKPOINT_BYTES  -> prints "done I" after add I returned
  reader GALLERY SECONDS SEED                              -> until GALLERY.stop exists: "searches N errors E torn T"

`spawn(kind, *args)` starts one as a real process forked from a multiprocessing forkserver that
has imported numpy, FAISS and facebce once (starting a fresh interpreter and importing them took
most of the kill -9 test's time); its stdout and stderr come back through a pipe. It can also
run as a script: `python gallery_worker.py writer ...`.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import traceback

import numpy as np

import facebce.deploy.stores  # noqa: F401  (preloaded in the forkserver)

DIM = 16


def batch(prefix: str, i: int, seed: int) -> tuple[np.ndarray, list[str], list[str]]:
    """Batch i: 1-6 rows, all named PREFIXi, reproducible from (prefix, i, seed)."""
    rng = np.random.default_rng([seed, i, sum(map(ord, prefix))])
    n = int(rng.integers(1, 7))
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x, [f"{prefix}{i}"] * n, [f"{prefix}{i}/{j}.jpg" for j in range(n)]


def writer(path: str, prefix: str, first: int, last: int, seed: int, checkpoint_bytes: int) -> None:
    from facebce.deploy.store import FaissStore
    store = FaissStore(path, checkpoint_bytes=checkpoint_bytes or None, lock_timeout=60)
    print("ready", flush=True)
    for i in range(first, last):
        x, names, sources = batch(prefix, i, seed)
        store.add(x, names, sources)
        print(f"done {i}", flush=True)
    store.close()


def reader(path: str, seconds: float, seed: int) -> None:
    from facebce.deploy.stores import open_gallery
    store = open_gallery(path)
    print("ready", flush=True)
    probe = np.ones((1, DIM), np.float32)
    searches = errors = torn = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and not os.path.exists(path + ".stop"):
        try:
            if len(store):
                store.search(probe, k=3, threshold=0.5)
            g = store.gallery
            counts: dict[str, int] = {}
            for e in g._entries.values():
                counts[e.identity] = counts.get(e.identity, 0) + 1
            for name, n in counts.items():  # a batch is all there or not at all
                prefix, i = name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")):])
                if n != len(batch(prefix, i, seed)[1]):
                    torn += 1
            searches += 1
        except Exception as e:  # noqa: BLE001 - the test counts every kind of failure
            errors += 1
            print(f"error {type(e).__name__}: {e}", flush=True)
    print(f"searches {searches} errors {errors} torn {torn}", flush=True)


class _Stream:
    """A text stream that sends what is written through a Connection, tagged stdout/stderr."""

    def __init__(self, conn, tag: bytes):
        self.conn, self.tag = conn, tag

    def write(self, text: str) -> int:
        self.conn.send_bytes(self.tag + text.encode())
        return len(text)

    def flush(self) -> None:
        pass


def _child(conn, kind: str, args: tuple) -> None:
    import faiss
    faiss.omp_set_num_threads(1)
    sys.stdout, sys.stderr = _Stream(conn, b"o"), _Stream(conn, b"e")
    try:
        (writer if kind == "writer" else reader)(*args)
    except BaseException:
        sys.stderr.write(traceback.format_exc())
        raise SystemExit(1) from None


class Worker:
    """A forked writer/reader with Popen's parts the tests use: readline, kill, communicate, returncode."""

    def __init__(self, kind: str, args: tuple):
        ctx = multiprocessing.get_context("forkserver")
        # Python 3.11's forkserver imports preloads before applying the parent's sys.path, so name a
        # module importable from the installed package (it pulls in numpy, torch, FAISS, facebce)
        ctx.set_forkserver_preload(["facebce.deploy.stores"])
        self._conn, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=(child, kind, args), daemon=True)
        self._proc.start()
        child.close()
        self._out, self._err, self._pos = b"", b"", 0  # _pos: stdout bytes already returned by readline

    def _take(self, timeout: float | None) -> bool:
        """Read one message (False at end of stream or timeout)."""
        if not self._conn.poll(timeout):
            return False
        try:
            msg = self._conn.recv_bytes()
        except (EOFError, OSError):
            return False
        if msg[:1] == b"o":
            self._out += msg[1:]
        else:
            self._err += msg[1:]
        return True

    def readline(self, timeout: float = 120.0) -> bytes:
        end = time.monotonic() + timeout
        while b"\n" not in self._out[self._pos:]:
            if not self._take(max(0.0, end - time.monotonic())):
                break
        cut = self._out.find(b"\n", self._pos)
        line = self._out[self._pos:] if cut < 0 else self._out[self._pos:cut + 1]
        self._pos += len(line)
        return line

    def kill(self) -> None:
        if self._proc.pid is not None:
            try:
                os.kill(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def communicate(self, timeout: float = 120.0) -> tuple[bytes, bytes]:
        """Everything it printed after the lines read (stdout) and all of stderr, once it ended."""
        end = time.monotonic() + timeout
        while self._take(max(0.0, end - time.monotonic())):
            pass
        self._proc.join(max(0.0, end - time.monotonic()))
        if self._proc.exitcode is None:
            raise TimeoutError(f"gallery worker {self._proc.pid} still running after {timeout} s")
        self._conn.close()
        return self._out[self._pos:], self._err

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode


def spawn(kind: str, *args) -> Worker:
    """A writer (path, prefix, first, last, seed, checkpoint_bytes) or reader (path, seconds, seed)."""
    return Worker(kind, tuple(args))


if __name__ == "__main__":
    if sys.argv[1] == "writer":
        writer(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]))
    else:
        reader(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))

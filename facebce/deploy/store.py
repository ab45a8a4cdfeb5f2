"""The embedded gallery store: FAISS on local disk, durable and safe with several processes.

This module is over 450 lines because the journal replay, the checkpoint steps and the writers' lock
are one crash-consistency protocol whose steps have to be read (and changed) together.

Files beside `PATH` (the gallery's name):
- `PATH.wal`  the journal (write-ahead log, `journal.py`): every mutation (add, remove, rename,
  set threshold, import) is appended as one checksummed record and fsynced before the call returns.
- `PATH` + `PATH.json`  the checkpoint: the FAISS index and the sidecar (ids -> identity, source;
  settings; the index's SHA-256; the sidecar's own SHA-256; the journal sequence number it holds
  and a random 16-byte generation). Loading = checkpoint + the journal records after it.
- `PATH.lock`  the writers' lock (fcntl.flock): a writer holds it exclusively from reading the
  journal's tail to fsyncing its record, so writers serialize and none works on a stale state; the
  holder writes its pid there, which a writer that times out names. A reader takes it shared only
  while loading a checkpoint; between checkpoints it follows the journal without any lock,
  stopping at a record still being written.

A checkpoint (when the journal outgrows the index, after IVF training, or on `checkpoint()`) writes
the new sidecar to `PATH.json.next`, the index to `PATH`, renames `PATH.json.next` to `PATH.json`,
then starts an empty journal of the new generation; each file is written atomically (fileio). A
crash at any point leaves either the old checkpoint with its journal, or the new index with its
complete pending sidecar (which load recognises by the index checksum and the next writer renames
into place), and a journal of another generation is one whose records the checkpoint already holds.

Load verifies everything it reads. A torn last journal record (a crash mid-append: its call never
returned) is cut off by the next writer with a one-line warning; any other inconsistency is a
DataFormatError naming the file and the record, and nothing is written after a failed load.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from facebce.deploy.gallery import (_REFINE_BYTES, EXACT_TYPES, GALLERY_FORMAT, GALLERY_VERSION, TRAINED_TYPES, Gallery,
                                    _Entry, _id_array, _names, _sources, _threshold)
from facebce.deploy.journal import Journal, create_journal, read_journal
from facebce.errors import DataFormatError, FacebceError
from facebce.fileio import atomic_write_bytes, fsync_dir, unit_rows

__all__ = ["FaissStore", "GalleryLockTimeout", "warn"]

_MIN_CHECKPOINT_BYTES = 64 << 20


class GalleryLockTimeout(FacebceError):
    """Another process held the gallery's writers' lock for longer than the timeout."""


def warn(message: str) -> None:
    """One warning line on stderr (a torn journal record cut off, a stale pending file removed)."""
    print(f"facebce: warning: {message}", file=sys.stderr, flush=True)


class _FileLock:
    """fcntl.flock on PATH.lock, blocking up to `timeout` seconds; the exclusive holder leaves its pid there."""

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout = path, float(timeout)
        self._fd: int | None = None

    def _open(self, create: bool) -> int | None:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
            except FileNotFoundError:
                if create:
                    raise
                return None
            except PermissionError:  # a reader of a gallery it may not write: lock read-only
                try:
                    self._fd = os.open(self.path, os.O_RDONLY)
                except OSError:
                    return None
        return self._fd

    @contextmanager
    def hold(self, exclusive: bool):
        fd = self._open(create=exclusive)
        if fd is None:  # a reader of a gallery without a lock file (read-only folder): nothing to wait for
            yield
            return
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + self.timeout
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            if time.monotonic() >= deadline:
                raise GalleryLockTimeout(f"{self.path}: the gallery is locked by {self._holder()}; gave up "
                                         f"after {self.timeout:g} s (raise lock_timeout / --lock-timeout, or "
                                         f"stop that process)")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        try:
            if exclusive:
                with _suppress_os():
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _holder(self) -> str:
        try:
            text = self.path.read_text(encoding="ascii", errors="replace").strip()
            pid = int(text)
            os.kill(pid, 0)
            return f"pid {pid}"
        except (OSError, ValueError):
            return "another process (a reader loading it, or a writer that left no pid)"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextmanager
def _suppress_os():
    try:
        yield
    except OSError:
        pass


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _sidecar_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "sidecar_sha256"}
    return _sha256(json.dumps(body, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode("ascii"))


class FaissStore:
    """A FAISS gallery on local disk (module docstring). The public calls are those of
    `facebce.deploy.stores.open_gallery`'s result; `gallery` is the in-memory Gallery (current as of
    the last call). Thread-safe: calls on one store object are serialized."""

    backend = "faiss"

    def __init__(self, path: str | os.PathLike, *, dim: int | None = None, create: bool = False,
                 threshold: float | None = None, lock_timeout: float = 30.0, use_gpu: bool | None = None,
                 checkpoint_bytes: int | None = None, **options):
        self.path = Path(path)
        if self.path.is_dir():
            raise FacebceError(f"{self.path}: is a folder; a FAISS gallery is named by a file path, e.g. "
                               f"{self.path / 'gallery.faiss'}")
        self.sidecar_path = self.path.with_name(self.path.name + ".json")
        self.pending_path = self.path.with_name(self.path.name + ".json.next")
        self.journal_path = self.path.with_name(self.path.name + ".wal")
        self._lock = _FileLock(self.path.with_name(self.path.name + ".lock"), lock_timeout)
        self._mutex = threading.RLock()
        self._use_gpu = use_gpu
        self._checkpoint_bytes = checkpoint_bytes
        self._journal: Journal | None = None
        self._g: Gallery | None = None
        self._stale = True
        if create:
            if dim is None:
                raise FacebceError(f"{self.path}: creating a gallery needs dim= (the embedding size)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            gallery = Gallery(dim, threshold=threshold, use_gpu=use_gpu, **options)
            with self._mutex, self._lock.hold(exclusive=True):
                if self.exists():
                    raise FacebceError(f"{self.path}: a gallery already exists here; use 'gallery add' or another path")
                self._checkpoint(gallery, seq=0)
                self._g, self._stale = gallery, False
            return
        if options:
            raise FacebceError(f"{self.path}: index options {sorted(options)} apply only when creating a gallery")
        if not self.exists():
            raise FacebceError(f"{self.path}: no gallery here (create one with 'facebce gallery build')")
        with self._mutex:
            self._reload(exclusive=False)
        if dim is not None and self._g.dim != dim:
            raise DataFormatError(f"{self.path}: gallery embeddings are {self._g.dim}-d, the model gives {dim}-d")
        if threshold is not None and self._g.threshold != _threshold(threshold, "threshold"):
            raise FacebceError(f"threshold={threshold}: the gallery's is {self._g.threshold}; use set_threshold")

    def exists(self) -> bool:
        """A committed checkpoint is here (or the index of one whose sidecar rename was interrupted)."""
        return self.sidecar_path.exists() or (self.path.exists() and self.pending_path.exists())

    # ---- reading --------------------------------------------------------------------------------
    @property
    def gallery(self) -> Gallery:
        with self._mutex:
            self.refresh()
            return self._g

    def __len__(self) -> int:
        return len(self.gallery)

    def __enter__(self) -> FaissStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def dim(self) -> int:
        return self._g.dim

    @property
    def mode(self) -> str:
        return self._g.mode

    @property
    def threshold(self) -> float | None:
        return self.gallery.threshold

    @property
    def identities(self) -> list[str]:
        return self.gallery.identities

    @property
    def ids(self) -> np.ndarray:
        return self.gallery.ids

    def entry(self, id: int) -> dict:
        return self.gallery.entry(id)

    def entries(self) -> list[dict]:
        return self.gallery.entries()

    def vectors(self, ids) -> np.ndarray:
        return self.gallery.vectors(ids)

    def info(self) -> dict:
        with self._mutex:
            g = self.gallery
            return {**g.info(), "backend": self.backend, "path": str(self.path), "journal_seq": self._seq,
                    "journal_records_since_checkpoint": self._seq - self._ckpt_seq,
                    "exact_vectors": g.index_type in EXACT_TYPES}

    def search(self, queries, k: int = 5, threshold: float | None = None, *, nprobe: int | None = None):
        """Gallery.search on the latest committed state (the journal is checked first)."""
        return self.gallery.search(queries, k=k, threshold=threshold, nprobe=nprobe)

    def knn(self, queries, k: int, *, nprobe: int | None = None):
        return self.gallery.knn(unit_rows(queries, "queries", dim=self.dim), k, nprobe=nprobe)

    def refresh(self) -> bool:
        """Apply what other processes committed since the last call; True if anything changed.
        Every call of this store does it first, so there is no need to call it yourself."""
        with self._mutex:
            before = (self._seq, self._ckpt_gen)
            self._catch_up(exclusive=False)
            return (self._seq, self._ckpt_gen) != before

    def close(self) -> None:
        with self._mutex:
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            self._lock.close()

    # ---- mutations --------------------------------------------------------------------------------
    def add(self, embeddings, identities, sources=None, *, ids=None) -> np.ndarray:
        """Enrol rows of `embeddings` as `identities`; durable (journalled and fsynced) when it returns."""
        def op(g: Gallery):
            x = unit_rows(embeddings, "embeddings", dim=g.dim)
            names = _names(identities, len(x))
            srcs = _sources(sources, len(x))
            new = g.add(x, names, srcs, ids=ids)
            return new, {"op": "add", "ids": new.tolist(), "identities": names, "sources": srcs}, x.tobytes()
        return self._mutate(op)

    def remove(self, ids=None, identity=None) -> int:
        """Delete entries by id or by identity; durable when it returns."""
        def op(g: Gallery):
            drop = g.ids_to_remove(ids=ids, identity=identity)
            n = g.remove(ids=drop)
            return n, {"op": "remove", "ids": drop.tolist()}, b""
        return self._mutate(op)

    def rename(self, old: str, new: str) -> int:
        def op(g: Gallery):
            return g.rename(old, new), {"op": "rename", "old": old, "new": new}, b""
        return self._mutate(op)

    def set_threshold(self, threshold: float | None) -> None:
        def op(g: Gallery):
            g.set_threshold(threshold)
            return None, {"op": "threshold", "value": g.threshold}, b""
        self._mutate(op)

    def import_entries(self, records: list[dict], vectors) -> int:
        """Add entries as they are (ids, identities, sources, mean-template counts) with their stored
        vectors: what `migrate` copies. Ids must be free."""
        def op(g: Gallery):
            x = unit_rows(vectors, "vectors", dim=g.dim, rows=len(records))
            clean = _import(g, records, x)
            return len(clean), {"op": "import", "entries": clean}, x.tobytes()
        return self._mutate(op)

    def checkpoint(self) -> None:
        """Write the index and sidecar now and start an empty journal."""
        with self._mutex, self._lock.hold(exclusive=True):
            self._catch_up(exclusive=True)
            self._checkpoint(self._g, self._seq)

    def _mutate(self, op):
        with self._mutex, self._lock.hold(exclusive=True):
            self._catch_up(exclusive=True)
            g = self._g
            was_trained = g.trained
            result, meta, blob = op(g)  # validates everything before changing the in-memory gallery
            try:
                if self._journal is None:
                    if not self.journal_path.exists():
                        create_journal(self.journal_path, self._seq + 1, bytes.fromhex(self._ckpt_gen))
                        self._note_journal()
                    self._journal = Journal(self.journal_path)
                self._journal_off = self._journal.append(self._seq + 1, meta, blob)
            except BaseException:
                self._stale = True  # memory is ahead of the disk: reload before anything else
                raise
            self._seq += 1
            if (g.index_type in TRAINED_TYPES and not was_trained) or self._journal_off > self._checkpoint_limit(g):
                self._checkpoint(g, self._seq)  # a trained index is kept, not retrained on replay
            return result

    def _checkpoint_limit(self, g: Gallery) -> int:
        if self._checkpoint_bytes is not None:
            return self._checkpoint_bytes
        o = g.options
        per_vector = (4 * g.dim if g.index_type in EXACT_TYPES else
                      (o["pq_m"] or 64) * o["pq_bits"] // 8 + 24 + _REFINE_BYTES[o["refine"]] * g.dim)
        return max(_MIN_CHECKPOINT_BYTES, len(g) * per_vector)

    # ---- checkpoints --------------------------------------------------------------------------
    def _checkpoint(self, g: Gallery, seq: int) -> None:
        """Write index + sidecar (+ a new empty journal) for `g` at journal sequence `seq` (lock held)."""
        data, refine_bytes = g.serialized()
        generation = secrets.token_hex(16)
        meta = {"format": GALLERY_FORMAT, "version": GALLERY_VERSION, **g.settings(), "metric": "inner_product",
                "next_id": g.next_id, "count": len(g), "seq": seq, "generation": generation,
                "index_sha256": _sha256(data), "refine_bytes": refine_bytes, "entries": g.entries()}
        meta["sidecar_sha256"] = _sidecar_digest(meta)
        text = json.dumps(meta, ensure_ascii=True, indent=0).encode("ascii")
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        atomic_write_bytes(self.pending_path, text)
        atomic_write_bytes(self.path, data.tobytes())
        os.replace(self.pending_path, self.sidecar_path)
        fsync_dir(self.path.parent)
        create_journal(self.journal_path, seq + 1, bytes.fromhex(generation))
        self._seq = self._ckpt_seq = seq
        self._ckpt_gen = generation
        self._ckpt_sig = _signature(self.sidecar_path)
        self._note_journal()

    def _note_journal(self) -> None:
        st = os.stat(self.journal_path)
        self._journal_ino, self._journal_off = (st.st_dev, st.st_ino), st.st_size

    @classmethod
    def write_gallery(cls, path: str | os.PathLike, gallery: Gallery) -> None:
        """Replace whatever is at `path` by a store holding `gallery` (stores.save_gallery)."""
        store = cls.__new__(cls)
        store.path = Path(path)
        store.sidecar_path = store.path.with_name(store.path.name + ".json")
        store.pending_path = store.path.with_name(store.path.name + ".json.next")
        store.journal_path = store.path.with_name(store.path.name + ".wal")
        store._lock = _FileLock(store.path.with_name(store.path.name + ".lock"), 30.0)
        store._journal = None
        store.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with store._lock.hold(exclusive=True):
                store._checkpoint(gallery, 0)
        finally:
            store._lock.close()

    # ---- loading --------------------------------------------------------------------------------
    def _catch_up(self, exclusive: bool) -> None:
        """Bring the in-memory gallery to the last committed state (full reload after a checkpoint)."""
        if self._stale or _signature(self.sidecar_path) != self._ckpt_sig:
            return self._reload(exclusive)
        try:
            f = open(self.journal_path, "rb")
        except FileNotFoundError:
            if self._journal_ino is not None:
                return self._reload(exclusive)
            return None
        with f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) != self._journal_ino:
                return self._reload(exclusive)
            if st.st_size == self._journal_off:
                return None
            tail = read_journal(self.journal_path, f, offset=self._journal_off, next_seq=self._seq + 1)
        if tail.generation.hex() != self._ckpt_gen:
            return self._reload(exclusive)
        try:
            for rec in tail.records:
                _apply(self._g, rec, self.journal_path)
                self._seq = rec.seq
        except BaseException:
            self._stale = True
            raise
        self._journal_off = tail.end
        if tail.torn and exclusive:
            self._cut_torn_tail(tail)
        return None

    def _reload(self, exclusive: bool) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if exclusive:
            self._load(exclusive=True)
        else:
            with self._lock.hold(exclusive=False):
                self._load(exclusive=False)

    def _load(self, exclusive: bool) -> None:
        data, meta = self._read_checkpoint(exclusive)
        g = _gallery_from_sidecar(meta, self.sidecar_path, self._use_gpu)
        index, refine = _deserialize_pair(data, meta, self.path)
        _check_index(g, index, meta, self.path, self.sidecar_path)
        if (refine is None) != (g.options["refine"] == "none" or not index.ntotal):
            raise DataFormatError(f"{self.path}: {g.index_type} with refine={g.options['refine']!r} "
                                  f"{'has no' if refine is None else 'has a'} re-ranking copy of the vectors")
        if refine is not None:
            _check_index(g, refine, meta, self.path, self.sidecar_path)
        if index.ntotal or g.index_type not in TRAINED_TYPES:
            g._configure(index)
            g._index, g._refine = index, refine
        seq = int(meta.get("seq", 0))
        generation = meta.get("generation")
        self._ckpt_seq, self._ckpt_gen = seq, generation or ""
        self._journal_ino, self._journal_off = None, 0
        tail = None
        try:
            f = open(self.journal_path, "rb")
        except FileNotFoundError:
            f = None
        if f is not None:
            with f:
                st = os.fstat(f.fileno())
                tail = read_journal(self.journal_path, f)
            if generation is not None and tail.generation.hex() == generation:
                if tail.base_seq != seq + 1:
                    raise DataFormatError(f"{self.journal_path}: starts at record {tail.base_seq} but "
                                          f"{self.sidecar_path.name} holds records up to {seq}")
                for rec in tail.records:
                    _apply(g, rec, self.journal_path)
                    seq = rec.seq
                self._journal_ino, self._journal_off = (st.st_dev, st.st_ino), tail.end
            else:
                tail = None  # a journal the checkpoint already holds (crash before its replacement)
        self._g, self._seq, self._stale = g, seq, False
        self._ckpt_sig = _signature(self.sidecar_path)
        if not exclusive:
            return
        # a writer makes the files what they should be; only now that everything loaded
        if tail is None and generation is not None:
            create_journal(self.journal_path, seq + 1, bytes.fromhex(generation))
            self._note_journal()
        elif generation is None:  # a version-1 gallery: checkpoint it in this version's format
            self._checkpoint(g, seq)
        elif tail.torn:
            self._cut_torn_tail(tail)

    def _cut_torn_tail(self, tail) -> None:
        journal = Journal(self.journal_path)
        try:
            journal.truncate(tail.end)
        finally:
            journal.close()
        self._note_journal()
        warn(f"{tail.torn}: a write interrupted by a crash (its call never returned); cut off")

    def _read_checkpoint(self, exclusive: bool) -> tuple[bytes, dict]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise DataFormatError(f"{self.path}: cannot read the gallery index (missing beside "
                                  f"{self.sidecar_path.name})") from None
        except OSError as e:
            raise DataFormatError(f"{self.path}: cannot read the gallery index ({e.strerror or e})") from None
        digest = _sha256(data)
        meta = _read_sidecar(self.sidecar_path) if self.sidecar_path.exists() else None
        if meta is not None and meta.get("index_sha256") == digest:
            if exclusive and self.pending_path.exists():
                self.pending_path.unlink()  # a checkpoint that never reached its index rename
            return data, meta
        pending = _read_sidecar(self.pending_path) if self.pending_path.exists() else None
        if pending is not None and pending.get("index_sha256") == digest:
            if exclusive:  # finish the interrupted checkpoint: its index is in place, its sidecar complete
                os.replace(self.pending_path, self.sidecar_path)
                fsync_dir(self.path.parent)
            return data, pending
        if meta is None:
            raise DataFormatError(f"{self.sidecar_path}: missing: the gallery index {self.path.name} has no sidecar")
        raise DataFormatError(f"{self.path}: index file does not match {self.sidecar_path.name} (SHA-256 "
                              f"differs): corrupted, or replaced without its sidecar")


def _signature(path: Path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _deserialize_pair(data: bytes, meta: dict, path: Path) -> tuple[faiss.Index, faiss.Index | None]:
    """The index and, when the sidecar says the file ends with one, the re-ranking copy."""
    tail = meta.get("refine_bytes", 0)
    if isinstance(tail, bool) or not isinstance(tail, int) or not 0 <= tail < len(data):
        raise DataFormatError(f"{path}: sidecar refine_bytes={tail!r} does not fit the {len(data)}-byte index file")
    if not tail:
        return _deserialize(data, path), None
    return _deserialize(data[:len(data) - tail], path), _deserialize(data[len(data) - tail:], path)


def _deserialize(data: bytes, path: Path) -> faiss.Index:
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        detail = " ".join(str(e).split())[-120:]  # FAISS prefixes the C++ location; keep the reason
        raise DataFormatError(f"{path}: not a readable FAISS index ({detail})") from None


def _read_sidecar(path: Path) -> dict:
    try:
        meta = json.loads(path.read_bytes())
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read the gallery sidecar ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: gallery sidecar is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != GALLERY_FORMAT:
        raise DataFormatError(f"{path}: not a facebce gallery sidecar (format != {GALLERY_FORMAT!r})")
    if meta.get("version") not in (1, GALLERY_VERSION):
        raise DataFormatError(f"{path}: gallery version {meta.get('version')!r}; this facebce reads 1 and "
                              f"{GALLERY_VERSION}")
    if meta["version"] >= 2 and meta.get("sidecar_sha256") != _sidecar_digest(meta):
        raise DataFormatError(f"{path}: sidecar checksum mismatch (edited or damaged)")
    return meta


def _gallery_from_sidecar(meta: dict, where: Path, use_gpu: bool | None) -> Gallery:
    """The Gallery (without its index) a validated sidecar describes; every record checked."""
    try:
        o = meta["options"] if meta["version"] == 1 else meta
        gallery = Gallery(meta["dim"], index_type=meta["index_type"], mode=meta["mode"], threshold=meta["threshold"],
                          nlist=o["nlist"], nprobe=o["nprobe"], pq_m=o.get("pq_m"), hnsw_m=o["hnsw_m"],
                          ef_construction=o["ef_construction"], ef_search=o["ef_search"], use_gpu=use_gpu,
                          pq_bits=o.get("pq_bits", 8), refine=o.get("refine", "none"), refine_k=o.get("refine_k", 64))
        entries, next_id, count = meta["entries"], meta["next_id"], meta["count"]
        if not isinstance(entries, list):
            raise TypeError("entries is not a list")
    except (KeyError, TypeError, ValueError, FacebceError) as e:
        raise DataFormatError(f"{where}: malformed gallery sidecar ({type(e).__name__}: {e})") from None
    for n, r in enumerate(entries):
        ok = (isinstance(r, dict) and isinstance(r.get("id"), int) and not isinstance(r.get("id"), bool)
              and r["id"] >= 0 and isinstance(r.get("identity"), str) and r["identity"]
              and (r.get("source") is None or isinstance(r.get("source"), str))
              and isinstance(r.get("count", 1), int) and r.get("count", 1) >= 1
              and isinstance(r.get("mean_norm", 1.0), (int, float)))
        if not ok:
            raise DataFormatError(f"{where}: entry #{n} is malformed ({str(r)[:80]})")
        if r["id"] in gallery._entries:
            raise DataFormatError(f"{where}: entry #{n}: duplicate id {r['id']}")
        gallery._entries[r["id"]] = _Entry(r["identity"], r.get("source"), r.get("count", 1),
                                           float(r.get("mean_norm", 1.0)))
    if not isinstance(count, int) or count != len(entries):
        raise DataFormatError(f"{where}: sidecar count {count} but {len(entries)} entries")
    top = max(gallery._entries, default=-1)
    if not isinstance(next_id, int) or isinstance(next_id, bool) or next_id <= top:
        raise DataFormatError(f"{where}: next_id {next_id!r} would reuse id {top} (entry ids go up to {top})")
    gallery._next_id = next_id
    return gallery


def _check_index(g: Gallery, index: faiss.Index, meta: dict, path: Path, sidecar: Path) -> None:
    if index.d != g.dim or index.ntotal != len(g):
        raise DataFormatError(f"{path}: index holds {index.ntotal} x {index.d}-d vectors but "
                              f"{sidecar.name} lists {len(g)} x {g.dim}-d")
    if not index.ntotal:
        return
    probe = Gallery.__new__(Gallery)
    probe._index = index
    in_index = probe.index_ids()
    listed = g.ids
    if len(np.unique(in_index)) != len(in_index):
        raise DataFormatError(f"{path}: the index holds duplicate ids")
    extra = np.setdiff1d(in_index, listed)
    if extra.size:
        raise DataFormatError(f"{path}: id {int(extra[0])} is in the index but not in {sidecar.name}")
    missing = np.setdiff1d(listed, in_index)
    if missing.size:
        raise DataFormatError(f"{sidecar}: id {int(missing[0])} is listed but not in the index {path.name}")


def _import(g: Gallery, records: list[dict], x: np.ndarray) -> list[dict]:
    """Insert entries verbatim (migrate): check every record, then change the gallery."""
    clean = []
    for n, r in enumerate(records):
        try:
            clean.append({"id": int(r["id"]), "identity": _names([r["identity"]], 1)[0],
                          "source": _sources([r.get("source")], 1)[0], "count": int(r.get("count", 1)),
                          "mean_norm": float(r.get("mean_norm", 1.0))})
        except (KeyError, TypeError, ValueError) as e:
            raise DataFormatError(f"entries: record #{n} is malformed ({type(e).__name__}: {e})") from None
    ids = _id_array([r["id"] for r in clean])
    if ids.size and (len(np.unique(ids)) != ids.size or any(int(i) in g._entries for i in ids) or ids.min() < 0):
        raise FacebceError("entries: ids clash with each other or with the gallery's")
    if g.mode == "mean":
        names = [r["identity"] for r in clean]
        if len(set(names)) != len(names) or set(names) & set(g.identities):
            raise FacebceError("entries: a mean-mode gallery holds one template per identity")
    if ids.size:
        g._insert(x, ids)
        g._next_id = max(g._next_id, int(ids.max()) + 1)
    for r in clean:
        g._entries[r["id"]] = _Entry(r["identity"], r["source"], r["count"], r["mean_norm"])
    return clean


def _apply(g: Gallery, rec, where: Path) -> None:
    """Replay one journal record on the in-memory gallery; a record that does not apply is damage."""
    m = rec.meta
    try:
        op = m["op"]
        if op == "add":
            x = np.frombuffer(rec.blob, dtype=np.float32).reshape(-1, g.dim)
            ids = np.asarray(m["ids"], dtype=np.int64)
            if g.mode == "mean":
                got = g.add(x, m["identities"], m["sources"])
                if not np.array_equal(got, ids):
                    raise DataFormatError(f"gave ids {got.tolist()[:5]}, the record says {ids.tolist()[:5]}")
            else:
                g.add(x, m["identities"], m["sources"], ids=ids)
        elif op == "remove":
            g.remove(ids=np.asarray(m["ids"], dtype=np.int64))
        elif op == "rename":
            g.rename(m["old"], m["new"])
        elif op == "threshold":
            g.set_threshold(m["value"])
        elif op == "import":
            _import(g, m["entries"], np.frombuffer(rec.blob, dtype=np.float32).reshape(-1, g.dim))
        else:
            raise DataFormatError(f"unknown op {op!r}")
    except (KeyError, TypeError, ValueError, FacebceError) as e:
        raise DataFormatError(f"{where}: record {rec.seq} ({m.get('op')!r}) does not apply to the gallery "
                              f"({type(e).__name__}: {e})") from None

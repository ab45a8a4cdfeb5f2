"""The service's work outside the event loop: images -> faces -> embeddings -> gallery.

- `MicroBatcher`: worker threads that take jobs (rows of an array) from one queue; each gathers
  those waiting, up to its `max_batch` rows (for the embedder: the model's fixed batch, else the
  config's max_batch), runs one call on all of them and hands each job its rows back. With one
  worker it waits up to `max_wait` seconds after the first job, but only while requests are still
  being decoded (`more_coming`); with several it never waits (an idle worker takes what is queued)
  and takes at most its share of the queue, so no job waits behind a neighbour's oversized batch.
  Concurrent requests' faces are embedded in one ONNX call as far as the model's batch allows, and
  their probes searched in one gallery call. If the shared call fails, each job is retried alone
  so a bad request cannot fail its neighbours.
- Views: with flip, a face's crop and its mirror image are two rows, and a request's rows are split
  over the workers, so at low load one face's two views run on two cores at once; the sums and
  the L2 normalisation are the embedder's own (`finish`), so embeddings equal `OnnxEmbedder.embed`.
- Inference sessions: one ONNX session using every core, or one single-threaded session per core
  each with its own embedding worker (a small model's layers are too small to split across cores,
  so independent requests in parallel can do more). `inference_sessions` fixes the number; by
  default the engine times both on the model at start and keeps the faster (`choose_sessions`).
- `Engine`: decodes and checks images (header-checked decoding: decompression bombs are refused
  before any pixel is decoded), aligns faces with the detector when one is configured, owns the
  embedder and its batcher, the search batcher, and the gallery with its single writer thread:
  every enrol and delete runs there, one at a time, and returns once the store has made it durable.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from facebce.errors import DataFormatError, FacebceError
from facebce.fileio import decode_bgr
from facebce.serve.config import ServeConfig

__all__ = ["Engine", "Face", "MicroBatcher", "ServiceError", "sniff_image"]


class ServiceError(FacebceError):
    """A request the service refuses: an HTTP status, a short code and a one-line message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"BM", "bmp"))


def sniff_image(data: bytes) -> str | None:
    """The image format from the bytes themselves (never the file name or the declared type)."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


class MicroBatcher:
    """Dynamic micro-batching (module docstring). `fn(rows, params, sizes)` gets the concatenated
    rows, the jobs' params and row counts, and returns a list with one result per row; a list of
    functions gives one worker thread each, all taking batches from the same queue."""

    def __init__(self, name: str, fn: Callable | list[Callable], max_batch: int, max_wait: float,
                 on_batch: Callable[[int], None] | None = None, more_coming: Callable[[], int] | None = None):
        self.name = name
        self.max_batch, self.max_wait = int(max_batch), float(max_wait)
        self.on_batch = on_batch
        self.more_coming = more_coming
        self._jobs: deque = deque()
        self._cv = threading.Condition()
        self._stop = False
        fns = fn if isinstance(fn, list) else [fn]
        self.workers = len(fns)
        self._threads = [threading.Thread(target=self._loop, args=(f,), name=f"facebce-{name}-{i}", daemon=True)
                         for i, f in enumerate(fns)]
        for t in self._threads:
            t.start()

    def submit(self, rows: np.ndarray, params=None) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._stop:
                fut.set_exception(ServiceError(503, "shutting_down", "the server is stopping"))
            else:
                self._jobs.append((rows, params, fut))
                self._cv.notify()
        return fut

    async def run(self, rows: np.ndarray, params=None):
        return await asyncio.wrap_future(self.submit(rows, params))

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=10)
        with self._cv:
            left, self._jobs = list(self._jobs), deque()
        for _, _, fut in left:
            fut.set_exception(ServiceError(503, "shutting_down", "the server is stopping"))

    def _take(self) -> list | None:
        """The next batch of jobs (None: stopping). Alone, a worker gathers up to `max_batch` rows,
        waiting up to `max_wait` while more requests are on their way; one of several takes only
        its share of the queue and never waits, so no job sits behind a neighbour's batch while
        another worker is idle."""
        with self._cv:
            while not self._jobs and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            if self.workers == 1:
                limit = self.max_batch
            else:
                rows = sum(len(j[0]) for j in self._jobs)
                limit = min(self.max_batch, -(-rows // self.workers))
            jobs = [self._jobs.popleft()]
            n = len(jobs[0][0])
            deadline = time.monotonic() + (self.max_wait if self.workers == 1 else 0.0)
            while n < limit:
                if self._jobs:
                    if n + len(self._jobs[0][0]) > limit:
                        break
                    job = self._jobs.popleft()
                    jobs.append(job)
                    n += len(job[0])
                    continue
                timeout = deadline - time.monotonic()
                if timeout <= 0 or self._stop or not (self.more_coming and self.more_coming() > 0):
                    break  # nothing queued and nothing on its way (or waited long enough)
                self._cv.wait(min(timeout, 0.001))  # woken by submit; re-check what is on its way
            return jobs

    def _loop(self, fn: Callable) -> None:
        while (jobs := self._take()) is not None:
            self._run(fn, jobs)

    def _run(self, fn: Callable, jobs) -> None:
        if self.on_batch:
            self.on_batch(sum(len(j[0]) for j in jobs))
        try:
            out = fn(np.concatenate([j[0] for j in jobs]), [j[1] for j in jobs], [len(j[0]) for j in jobs])
        except Exception:
            if len(jobs) > 1:  # find the job that fails; the others still get their answer
                for job in jobs:
                    self._run(fn, [job])
                return
            out = None
            err = _as_exception()
        start = 0
        for rows, _, fut in jobs:
            if out is None:
                fut.set_exception(err)
            else:
                fut.set_result(out[start:start + len(rows)])
            start += len(rows)


def _as_exception() -> BaseException:
    import sys
    return sys.exc_info()[1]


@dataclass
class Face:
    """One image's face as the service used it."""
    crop: np.ndarray  # aligned BGR crop at the model's input size
    box: list[float] | None  # x1, y1, x2, y2 in the uploaded image; None: the upload was an aligned crop
    score: float | None  # detector score
    faces: int  # faces the detector found (1 for an aligned crop)
    width: int
    height: int

    def describe(self) -> dict:
        return {"aligned_input": self.box is None, "box": self.box, "score": self.score, "faces": self.faces,
                "image_size": [self.width, self.height]}


class Engine:
    """Model, detector, gallery store and the threads that run them (module docstring)."""

    def __init__(self, config: ServeConfig, *, log: Callable[[str], None] = print, metrics=None):
        from facebce.eval.model_loading import ModelSpec
        from facebce.models.embedder import parse_channel_values

        self.config = config
        self.metrics = metrics
        mean, std = parse_channel_values(config.mean, "mean"), parse_channel_values(config.std, "std")
        spec = ModelSpec(config.model, color=config.color, mean=mean, std=std, batch_size=config.max_batch)
        if spec.path.suffix.lower() != ".onnx":
            raise FacebceError(f"{spec.path}: facebce serve runs ONNX models (export one with 'facebce export')")
        from facebce.models.embedder import OnnxEmbedder, Preprocess
        pre = None if mean is None else Preprocess(color=config.color, mean=mean, std=std)

        def session(threads: int | None) -> OnnxEmbedder:  # flip and normalisation happen in `embed`
            return OnnxEmbedder(spec.path, preprocess=pre, batch_size=config.max_batch, flip=False,
                                normalize=False, progress=False, intra_op_threads=threads, sessions=1)
        cores = None  # with --workers N each process gets its share of the cores for its sessions
        if config.workers > 1:
            from facebce.models.embedder import available_cores
            cores = max(1, available_cores() // config.workers)
        threads = config.intra_op_threads if config.intra_op_threads is not None else cores
        self.embedders = choose_sessions(session, config.inference_sessions, threads, log, cores=cores)
        self.embedder = self.embedders[0]
        self.size = self.embedder.input_size
        self.dim = self.embedder.embedding_size
        if self.dim is None:
            self.dim = int(self.embedder.embed(np.zeros((1, *self.size, 3), np.uint8)).shape[1])
        self.aligner = None
        if config.detector:
            from facebce.deploy.align import FaceAligner, ScrfdDetector
            det = ScrfdDetector(config.detector, input_size=(config.det_size, config.det_size),
                                det_thresh=config.det_thresh)
            self.aligners = {p: FaceAligner(det, size=self.size[0], policy=p, min_score=config.min_score)
                             for p in ("central", "largest", "best")}
            self.aligner = self.aligners[config.policy]
        # a calibrated:CALIB.json threshold is checked against this model's weights before any use
        from facebce.eval.calibrate import verified_threshold
        threshold = verified_threshold(config.threshold, spec)
        self.store = _open_store(config, threshold, self.dim, self.embedder, log)
        self.threshold_source = "gallery"
        wait = config.max_wait_ms / 1000.0
        self._decoding = 0  # requests decoding their images: what the embed batcher may wait for
        self.run_rows = min(config.max_batch, self.embedder.run_rows)  # rows per ONNX call
        self._embed_batcher = MicroBatcher("embed", [self._embed_with(e) for e in self.embedders], self.run_rows,
                                           wait, on_batch=self._note_batch("embed"),
                                           more_coming=lambda: self._decoding)
        # searches gather what queued while the last one ran, without waiting: a search costs little
        # next to the wait, and under load the queue fills by itself
        self._search_batcher = MicroBatcher("search", self._search_rows, config.max_batch, 0.0,
                                            on_batch=self._note_batch("search"))
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facebce-gallery-writer")
        self._prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="facebce-decode")
        self.ready = True

    def _note_batch(self, kind: str):
        def note(n: int) -> None:
            if self.metrics is not None:
                self.metrics.observe_batch(kind, n)
        return note

    def close(self) -> None:
        self.ready = False
        self._embed_batcher.close()
        self._search_batcher.close()
        self._writer.shutdown(wait=True)
        self._prep.shutdown(wait=True)
        self.store.close()

    # ---- images -> faces ----------------------------------------------------------------------
    def face_from_bytes(self, data: bytes, where: str, policy: str | None = None) -> Face:
        """Sniff, header-check, decode, and (when needed and configured) detect + align one image."""
        kind = sniff_image(data)
        if kind is None:
            raise ServiceError(415, "unsupported_media_type",
                               f"{where}: not a JPEG, PNG, BMP or WebP image (judged by its bytes)")
        try:
            img = decode_bgr(data, where=where, max_pixels=self.config.max_image_pixels)
        except DataFormatError as e:
            text = str(e)
            if "over the limit" in text:
                raise ServiceError(413, "image_too_large", text) from None
            raise ServiceError(422, "undecodable_image", text) from None
        h, w = img.shape[:2]
        if (h, w) == tuple(self.size):
            return Face(img, None, None, 1, w, h)
        if self.aligner is None:
            raise ServiceError(422, "not_aligned",
                               f"{where}: {w}x{h} image, but without a detector the service takes only aligned "
                               f"{self.size[1]}x{self.size[0]} crops (start it with --detector)")
        aligner = self.aligners[policy or self.config.policy]
        try:
            faces = aligner.align_detections(img, dets := aligner.candidates(img))
        except DataFormatError as e:
            raise ServiceError(422, "undetectable_image", f"{where}: {e}") from None
        if not faces:
            raise ServiceError(422, "no_face", f"{where}: no face found")
        f = faces[0]
        return Face(f.crop, [round(float(v), 1) for v in f.bbox], round(f.score, 4), len(dets), w, h)

    async def faces(self, items: list[tuple[bytes, str]], policy: str | None = None) -> list[Face]:
        loop = asyncio.get_running_loop()
        futs = [loop.run_in_executor(self._prep, self.face_from_bytes, data, where, policy) for data, where in items]
        self._decoding += 1
        try:
            results = await asyncio.gather(*futs, return_exceptions=True)
        finally:
            self._decoding -= 1
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    # ---- embeddings and search ----------------------------------------------------------------
    @staticmethod
    def _embed_with(embedder):
        def embed_rows(crops: np.ndarray, params, sizes) -> np.ndarray:
            return embedder.embed(crops)
        return embed_rows

    async def embed(self, faces: list[Face]) -> np.ndarray:
        """L2-normalised embeddings of the faces, equal to `OnnxEmbedder(flip=config.flip).embed`: the
        crops (and their mirror images) go to the batcher in parts, one per worker, so that one
        request's rows run on every idle session at once."""
        crops = np.stack([f.crop for f in faces])
        rows = np.concatenate([crops, crops[:, :, ::-1]]) if self.config.flip else crops
        part = min(self.run_rows, -(-len(rows) // self._embed_batcher.workers))
        raw = np.concatenate(await asyncio.gather(
            *(self._embed_batcher.run(rows[i:i + part]) for i in range(0, len(rows), part))))
        if self.config.flip:
            raw = raw[:len(crops)] + raw[len(crops):]
        return self.embedder.finish(raw)

    def _search_rows(self, queries: np.ndarray, params, sizes) -> list:
        k = max(params)
        if len(self.store) == 0:
            return [None] * len(queries)
        try:
            return self.store.search(queries, k=min(k, self.config.max_k))
        except FacebceError:
            if len(self.store) == 0:  # emptied by a delete since the check above
                return [None] * len(queries)
            raise

    async def search(self, queries: np.ndarray, k: int) -> list:
        """Top-k SearchResults of each row (None for every row while the gallery is empty)."""
        results = await self._search_batcher.run(queries, k)
        return [None if r is None else r.matches[:k] for r in results]

    # ---- the gallery's one writer -------------------------------------------------------------
    async def write(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, lambda: fn(*args, **kwargs))

    async def read(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))


def choose_sessions(make: Callable, sessions: int | None, intra_op_threads: int | None, log=print,
                    seconds: float = 0.6, cores: int | None = None) -> list:
    """The inference sessions the engine embeds with: `sessions` of them when given (each with
    `intra_op_threads`, default: one thread each when there are several, else onnxruntime's
    default); otherwise both candidates — one session on every core, one single-threaded session
    per core — embed blank crops for `seconds` each, alternately (twice) so both see the same machine, and
    the one with more images per second is kept. The choice and the rates are logged in one line.
    `cores`: the cores these sessions may use (default: all this process may run on; a server with
    several worker processes gives each its share)."""
    if sessions is not None:
        threads = intra_op_threads if intra_op_threads is not None else (1 if sessions > 1 else None)
        return [make(threads) for _ in range(sessions)]
    from facebce.models.embedder import available_cores

    cores = cores or available_cores()
    one = make(intra_op_threads)
    if cores < 2:
        log(f"inference: 1 session on this process's {cores} core")
        return [one]
    many = [make(1) for _ in range(cores)]
    crop = np.zeros((1, *one.input_size, 3), np.uint8)
    for e in (one, *many):
        e.embed(crop)  # warm-up: first runs allocate

    def rate(group: list) -> float:
        done, stop = [0] * len(group), time.perf_counter() + seconds

        def work(i: int, e) -> None:
            while time.perf_counter() < stop:
                e.embed(crop)
                done[i] += 1
        threads = [threading.Thread(target=work, args=(i, e)) for i, e in enumerate(group)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(done) / (time.perf_counter() - start)
    r_one = r_many = 0.0
    for _ in range(2):
        r_one += rate([one])
        r_many += rate(many)
    best = many if r_many > r_one else [one]
    log(f"inference: {len(best)} session(s) ({'1 thread each' if best is many else 'all cores'}): measured "
        f"{r_many / 2:.1f} img/s with {cores} single-threaded sessions vs {r_one / 2:.1f} with one "
        f"{'on every core' if intra_op_threads is None else f'of {intra_op_threads} threads'}")
    return best


def _open_store(config: ServeConfig, threshold, dim: int, embedder, log):
    """Open the gallery store, creating it (at `threshold`, else the model's pair threshold) when it is missing."""
    from facebce.deploy.gallery import resolve_threshold
    from facebce.deploy.stores import is_uri, open_gallery

    try:
        store = open_gallery(config.gallery, dim=dim)
    except FacebceError as e:
        missing = "no gallery here" in str(e) or "does not exist" in str(e) or "no collection" in str(e)
        if not missing:
            raise
        t, said = resolve_threshold(threshold, embedder)
        store = open_gallery(config.gallery, dim=dim, create={"index_type": config.index}, threshold=t)
        log(f"created gallery {config.gallery} ({dim}-d, {config.index}, {said})")
        return store
    if store.threshold is None:
        t, said = resolve_threshold(threshold, embedder)
        store.set_threshold(t)
        log(f"gallery {config.gallery} had no threshold; set {said}")
    elif threshold is not None:
        t, _ = resolve_threshold(threshold, embedder)
        if abs(t - store.threshold) > 1e-9:
            raise FacebceError(f"threshold {t:.4f}: the gallery {config.gallery} has {store.threshold:.4f}; "
                               f"change it with PUT /v1/threshold (admin) or drop --threshold")
    if is_uri(config.gallery):
        log(f"gallery {config.gallery}: milvus backend")
    return store

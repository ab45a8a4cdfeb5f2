"""Face crops -> embeddings, through an ONNX file (`OnnxEmbedder`) or a torch backbone (`TorchEmbedder`).

One runner family for evaluation and deployment alike, so that both preprocess, batch, flip and
normalise in exactly the same way. Images go in as OpenCV gives them: uint8 N x H x W x 3 in
**BGR** order, already aligned at the model's input size; `Preprocess` turns them into what the
model expects (channel order, mean/std on 0..255 pixels, NCHW float32).

An ONNX file's preprocessing comes from, in order: the `preprocess=` argument, facebce's metadata
keys (written by `facebce.deploy.export_onnx`), else insightface model_zoo's node-name rule
(docs/formats.md §7), so that any arcface_torch / insightface model runs as insightface runs it.

torch is imported only by `TorchEmbedder`, so `OnnxEmbedder` (the service, galleries, eval of
ONNX files) runs in a process that never loads it.

It is over 450 lines because both runners share one path for batching, flip-sum, output checks
and normalisation, and OnnxEmbedder's batch probe and session layouts (one session, or one per
core, measured) act on the session it owns; split apart, each half would reach into the other.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import queue
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from facebce.errors import ConfigError, DataFormatError, ModelError

if TYPE_CHECKING:  # torch is imported by TorchEmbedder itself: the ONNX path runs without it
    import torch
    from torch import nn

__all__ = ["META_COLOR", "META_LEARNED_THRESHOLD", "META_MEAN", "META_STD", "META_THRESHOLD", "OnnxEmbedder",
           "Preprocess", "TorchEmbedder", "default_providers", "insightface_preprocess", "ort_session_options",
           "parse_channel_values"]

# facebce's ONNX metadata_props keys read here (export.py writes them and a few more).
META_MEAN = "input_mean"
META_STD = "input_std"
META_COLOR = "color_order"
META_THRESHOLD = "threshold"  # a PAIR threshold (embedding vs embedding), given or calibrated by a user
META_LEARNED_THRESHOLD = "learned_threshold"  # a head's b/γ: embedding vs CLASS CENTRE, never a pair threshold

_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_PROGRESS_MIN_IMAGES = 1000  # below this a progress bar is noise
_SNIFF_NODES = 8  # insightface's ArcFaceONNX looks at the first 8 graph nodes only
_AUTO_MIN_CALLS = 64  # a job of this many model calls measures whether one session per core pays
_STRETCH_SECONDS = 1.0  # each layout runs two stretches this long while sessions="auto" measures
_POOL_BYTES = 2 << 30  # sessions="auto" runs at most this many bytes of model weights side by side


def _channel_values(value, name: str) -> float | tuple[float, float, float]:
    """A scalar, or 3 values (one per channel), as finite floats."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        values = (float(value),)
    elif isinstance(value, Sequence) and len(value) == 3 and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        values = tuple(float(v) for v in value)
    else:
        raise ModelError(f"preprocess {name}={value!r}: expected a number or 3 numbers (one per channel)")
    if not all(math.isfinite(v) for v in values) or (name == "std" and min(values) <= 0):
        raise ModelError(f"preprocess {name}={value!r}: expected finite values{' > 0' if name == 'std' else ''}")
    return values[0] if len(values) == 1 else values


def parse_channel_values(text: str | None, option: str = "--mean") -> float | tuple[float, float, float] | None:
    """A `--mean` / `--std` option value: '127.5' -> 127.5, '123.675,116.28,103.53' -> a per-channel
    tuple, None -> None; anything else is one ConfigError line naming the option."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{option} {text!r}: expected one number or three comma-separated numbers "
                          "(one per channel, in the model's channel order), e.g. 127.5 or 123.675,116.28,103.53")
    if option.endswith("std") and min(values) <= 0:
        raise ConfigError(f"{option} {text!r}: values must be > 0")
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its pixels: `(x - mean) / std` on 0..255 values in `color` channel order.

    `mean` and `std` are scalars or one value per channel *in the model's channel order* (for
    'rgb', R first). `input_size` is (H, W); None means "the model's own". The defaults are
    insightface's convention for recognition models, which facebce trains with: RGB, 127.5, 127.5.
    """

    color: str = "rgb"
    mean: float | tuple[float, float, float] = 127.5
    std: float | tuple[float, float, float] = 127.5
    input_size: tuple[int, int] | None = None

    def __post_init__(self):
        if self.color not in ("rgb", "bgr"):
            raise ModelError(f"preprocess color={self.color!r}: expected 'rgb' or 'bgr'")
        object.__setattr__(self, "mean", _channel_values(self.mean, "mean"))
        object.__setattr__(self, "std", _channel_values(self.std, "std"))
        if self.input_size is not None:
            size = tuple(self.input_size)
            if len(size) != 2 or not all(isinstance(s, numbers.Integral) and s > 0 for s in size):
                raise ModelError(f"preprocess input_size={self.input_size!r}: expected (height, width)")
            object.__setattr__(self, "input_size", (int(size[0]), int(size[1])))

    def to_blob(self, images_bgr: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x 3 BGR -> float32 N x 3 x H x W, normalised as the model expects."""
        x = images_bgr[..., ::-1] if self.color == "rgb" else images_bgr
        x = x.astype(np.float32)
        x -= np.asarray(self.mean, np.float32)
        x /= np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def to_metadata(self) -> dict[str, str]:
        """The facebce metadata_props that make `OnnxEmbedder` use this preprocessing."""
        return {META_MEAN: json.dumps(self.mean), META_STD: json.dumps(self.std), META_COLOR: self.color}

    @classmethod
    def from_metadata(cls, props: Mapping[str, str], where: str) -> Preprocess | None:
        """Read facebce's keys; None when the model does not have them (not a facebce export)."""
        if META_MEAN not in props or META_STD not in props:
            return None
        try:
            mean, std = json.loads(props[META_MEAN]), json.loads(props[META_STD])
        except json.JSONDecodeError as e:
            raise ModelError(f"{where}: metadata {META_MEAN}/{META_STD} is not JSON ({e})") from None
        try:
            return cls(color=props.get(META_COLOR, "rgb"), mean=mean, std=std)
        except ModelError as e:
            raise ModelError(f"{where}: bad preprocessing metadata: {e}") from None


def insightface_preprocess(model: onnx.ModelProto) -> Preprocess:
    """insightface model_zoo's rule (ArcFaceONNX): a `Sub*`/`_minus*` and a `Mul*`/`_mul*` node among
    the first 8 mean the graph normalises itself (MXNet conversions) -> feed raw 0..255; otherwise
    (x - 127.5) / 127.5. insightface always feeds RGB."""
    names = [node.name for node in model.graph.node[:_SNIFF_NODES]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return Preprocess(mean=0.0, std=1.0) if has_sub and has_mul else Preprocess()


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always as the fallback."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _as_batch(images, size: tuple[int, int], model: str = "the model") -> np.ndarray:
    """Validate `images` (uint8 N x H x W x 3 array, or a list of H x W x 3) into one array."""
    if isinstance(images, np.ndarray):
        batch = images
    else:
        items = list(images)
        for i, img in enumerate(items):
            if not isinstance(img, np.ndarray) or img.ndim != 3:
                raise DataFormatError(f"images[{i}]: expected an H x W x 3 uint8 array, got "
                                      f"{getattr(img, 'shape', type(img).__name__)}")
        if not items:
            return np.empty((0, *size, 3), np.uint8)
        if len({img.shape for img in items}) > 1:
            raise DataFormatError(f"images: crops of different sizes {sorted({img.shape for img in items})}")
        batch = np.stack(items)
    if batch.ndim != 4 or batch.shape[3] != 3:
        raise DataFormatError(f"images: shape {batch.shape}, expected N x H x W x 3 (BGR); "
                              f"for a single crop pass img[None]")
    if batch.dtype != np.uint8:
        raise DataFormatError(f"images: dtype {batch.dtype}, expected uint8 pixels (0..255, BGR)")
    if batch.shape[1:3] != size:
        raise DataFormatError(f"images: {batch.shape[1]}x{batch.shape[2]} crops, but {model} expects "
                              f"{size[0]}x{size[1]}; align faces at the model's input size")
    return batch


class _Embedder:
    """Batching, flip-sum, output checks and L2 normalisation; subclasses run one blob (`_run`)."""

    embedding_size: int | None = None  # D, when the model declares it

    def __init__(self, name: str, preprocess: Preprocess, batch_size: int, flip: bool, normalize: bool,
                 progress: bool | None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
            raise ModelError(f"batch_size={batch_size!r}: expected a positive int")
        self.name = name
        self.preprocess = preprocess
        self.batch_size = int(batch_size)
        self.flip = bool(flip)
        self.normalize = bool(normalize)
        self.progress = progress

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocess.input_size

    def _run(self, blob: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _step(self) -> int:
        return self.batch_size

    def _running(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _run_all(self, blobs: Iterator[np.ndarray], calls: int) -> Iterator[np.ndarray]:
        """The raw outputs of `calls` blobs, in order. Subclasses may run several at once."""
        return map(self._run, blobs)

    def embed(self, images) -> np.ndarray:
        """Embed aligned crops: uint8 N x H x W x 3 **BGR** (OpenCV order), or a list of H x W x 3.

        Returns float32 N x D, L2-normalised when `normalize`. With `flip`, each embedding is
        embedding(img) + embedding(mirrored img), summed before the normalisation.
        """
        batch = _as_batch(images, self.input_size, self.name)
        n, step = len(batch), self._step()
        show = self.progress if self.progress is not None else n >= _PROGRESS_MIN_IMAGES
        views = 2 if self.flip else 1

        def blobs() -> Iterator[np.ndarray]:  # chunk by chunk, each view in turn: made as they are run
            for start in range(0, n, step):
                chunk = batch[start:start + step]
                yield self.preprocess.to_blob(chunk)
                if self.flip:
                    yield self.preprocess.to_blob(chunk[:, :, ::-1])

        chunks = []
        with self._running(), tqdm(total=n, desc=f"embed {os.path.basename(self.name)}", unit="img",
                                   disable=not show) as bar:
            outputs = self._run_all(blobs(), views * math.ceil(n / step))
            for start in range(0, n, step):
                emb = next(outputs)
                if self.flip:
                    emb = emb + next(outputs)
                chunks.append(np.asarray(emb, np.float32))
                bar.update(min(step, n - start))
        if not chunks:
            return np.empty((0, self.embedding_size or 0), np.float32)
        return self._checked(np.concatenate(chunks))

    @property
    def run_rows(self) -> int:
        """Rows per model call: the graph's fixed batch, else `batch_size`."""
        return self._step()

    def finish(self, emb: np.ndarray) -> np.ndarray:
        """What `embed` does to the (flip-summed) raw outputs: refuse NaN/Inf or all-zero rows, then
        L2-normalise. For callers that run the views themselves, as the service does."""
        return self._checked(np.asarray(emb, np.float32), normalize=True)

    def _checked(self, emb: np.ndarray, normalize: bool | None = None) -> np.ndarray:
        """Refuse NaN/Inf or all-zero embeddings (they would silently score as garbage), then normalise."""
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if bad.size:
            raise ModelError(f"{self.name}: NaN/Inf embedding for {bad.size} of {len(emb)} images "
                             f"(first: image {bad[0]})")
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        zero = np.flatnonzero(norms[:, 0] == 0)
        if zero.size:
            raise ModelError(f"{self.name}: all-zero embedding for {zero.size} of {len(emb)} images "
                             f"(first: image {zero[0]}); cannot L2-normalise")
        return emb / norms if (self.normalize if normalize is None else normalize) else emb


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ort_session_options(intra_op_threads: int | None = None) -> "ort.SessionOptions":
    """The onnxruntime session settings facebce runs recognition models with (OnnxEmbedder, the
    benchmarks): every graph optimisation (conv+BN+PReLU fusion, the NCHWc layout on x86), no log lines
    of onnxruntime's own (failures reach the caller as exceptions) and
    `intra_op_threads` CPU threads (None: one per core this process may run on — its CPU affinity,
    as set by taskset or a container's cpuset; onnxruntime's own default counts the machine's cores,
    and more threads than cores spin against each other)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4  # fatal only: a failing run is one ModelError line, not ORT's own log lines
    if intra_op_threads is None and hasattr(os, "sched_getaffinity"):  # elsewhere onnxruntime's own default
        intra_op_threads = available_cores()
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    return options


class OnnxEmbedder(_Embedder):
    """Runs a recognition ONNX model (facebce export, arcface_torch, or any NCHW 3 x S x S model) with onnxruntime.

    A fixed batch dimension (e.g. 1) is honoured by running chunks of that size and zero-padding
    the last one; a symbolic batch runs `batch_size` images at a time. The batch a model supports
    is read from its input *and* output shapes, then checked by one probe run on 2 blank images:
    arcface_torch's torch2onnx.py relabels the input batch as dynamic while a Reshape in the graph
    still bakes batch 1 (MobileFaceNet), which only a run reveals; such a model runs at batch 1
    (`fixed_batch`). The probe also turns a graph that fails at run time, or an output that is not
    one [batch, D] float vector per image, into one ModelError line naming the file. The input may
    be float32, float16 or float64 (blobs are cast); other input types are refused. `intra_op_threads` caps
    onnxruntime's CPU threads (None: one per core this process may run on).

    `sessions`: how the model calls of one `embed` run. An int N > 1 runs them N at a time on N
    sessions of `intra_op_threads` (default 1) threads each; 1 keeps one session. "auto" (the
    default) measures, once per embedder, when the model has a fixed batch (e.g. MobileFaceNet's
    1), the CPU several cores and a job at least 64 calls: alternately (twice) 1 s of calls on the
    one session with a thread per core and 1 s on one single-threaded session per core (as many as
    fit in 2 GiB of weights), on the job's own images (a job that ends first leaves the rest of the
    measuring to the next job of 64 calls or more). The faster runs the rest of that job and
    later ones (`layout` says which, `layout_rates` the calls per second measured). A batch-1 model
    keeps two cores busier as two single-threaded sessions than as one with two threads on some
    CPUs, and not on others. A model that takes any batch keeps one session: its batch fills the
    threads, and a session per core would hold a whole batch's activations each. Every layout runs
    the same graph on the same rows, so each row's embedding does not depend on the choice (tested
    to 1e-6).
    """

    def __init__(self, path: str | os.PathLike, preprocess: Preprocess | None = None,
                 providers: Sequence[str] | None = None, batch_size: int = 64, flip: bool = False,
                 normalize: bool = True, progress: bool | None = None, intra_op_threads: int | None = None,
                 sessions: int | str = "auto"):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ModelError(f"{path}: no such ONNX file")
        if sessions != "auto" and (isinstance(sessions, bool) or not isinstance(sessions, numbers.Integral)
                                   or sessions < 1):
            raise ModelError(f"sessions={sessions!r}: expected a positive int or 'auto'")
        self._threads, self._sessions = intra_op_threads, sessions
        self._provider_list = list(providers or default_providers())
        self._session = self._new_session(path, intra_op_threads)
        self._pool: list | None = None  # the parallel sessions, made when first needed
        self._many: bool | None = None  # whether calls run on the parallel sessions, once decided
        self._timing = {False: [0, 0.0], True: [0, 0.0]}  # sessions="auto": [calls, seconds] per layout
        self.layout: str | None = None  # how calls ran: "1 session x T threads" / "N sessions x T threads"
        self.layout_rates: dict[str, float] = {}  # calls/s of each layout when "auto" measured them
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{path}: {len(inputs)} inputs and {len(outputs)} outputs, expected 1 and 1")
        self._input, self._output = inputs[0].name, outputs[0].name
        batch, side = _nchw_square(path, inputs[0].shape)
        if inputs[0].type not in _INPUT_TYPES:
            raise ModelError(f"{path}: input {inputs[0].name!r} is {inputs[0].type}, expected a float tensor "
                             f"({', '.join(_INPUT_TYPES)}) of normalised pixels")
        self._input_dtype = _INPUT_TYPES[inputs[0].type]
        out_shape = outputs[0].shape or []  # [] also when the rank is unknown: the probe run checks it
        out_batch = out_shape[0] if len(out_shape) == 2 else None
        if batch is None and isinstance(out_batch, int) and out_batch > 0:
            batch = out_batch  # a dynamic input label over a graph that still makes a fixed batch
        out_dim = out_shape[-1] if len(out_shape) == 2 else None
        self.embedding_size = out_dim if isinstance(out_dim, int) else None
        self.name = path
        self.fixed_batch = self._probe_batch(batch, side)
        self.metadata = dict(self._session.get_modelmeta().custom_metadata_map)
        preprocess = preprocess or Preprocess.from_metadata(self.metadata, path) \
            or insightface_preprocess(onnx.load(path, load_external_data=False))
        if preprocess.input_size not in (None, (side, side)):
            raise ModelError(f"{path}: preprocess input_size={preprocess.input_size} but the model takes {side}x{side}")
        super().__init__(path, replace(preprocess, input_size=(side, side)), batch_size, flip, normalize, progress)

    def _new_session(self, path: str, threads: int | None) -> "ort.InferenceSession":
        try:
            return ort.InferenceSession(path, ort_session_options(threads), providers=self._provider_list)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None

    @property
    def providers(self) -> list[str]:
        return self._session.get_providers()

    # ---- how a job's model calls run: one session, or one per core at once -------------------------
    def _parallel_sessions(self) -> list:
        """The sessions that run calls side by side (made once, each warmed by one blank run)."""
        if self._pool is None:
            weights = max(os.path.getsize(self.name), 1)
            count = self._sessions if self._sessions != "auto" else min(available_cores(),
                                                                        max(2, _POOL_BYTES // weights))
            pool = [self._new_session(self.name, self._pool_threads) for _ in range(count)]
            rows = self.fixed_batch or 1
            for session in pool:
                self._raw_run(np.zeros((rows, 3, *self.input_size), np.float32), rows, session)
            self._pool = pool
        return self._pool

    @property
    def _pool_threads(self) -> int:
        """Threads per parallel session: `intra_op_threads` when given with sessions=N, else 1."""
        return self._threads if self._sessions != "auto" and self._threads is not None else 1

    def _describe(self, many: bool) -> str:
        count, threads = (len(self._parallel_sessions()), self._pool_threads) if many else \
            (1, self._threads or available_cores())
        return f"{count} session{'s' if count != 1 else ''} x {threads} thread{'s' if threads != 1 else ''}"

    def _run_all(self, blobs: Iterator[np.ndarray], calls: int) -> Iterator[np.ndarray]:
        if self._sessions != "auto":
            self._many = self._sessions != 1
        elif self._many is None and calls >= _AUTO_MIN_CALLS:
            if (available_cores() < 2 or self._threads is not None or not self.fixed_batch
                    or self.providers != ["CPUExecutionProvider"]):
                self._many = False  # one core, threads given, any batch or not the CPU: one session
            else:
                return self._measure_then_run(blobs)
        many = bool(self._many)  # undecided (jobs too short to measure so far): one session
        self.layout = self._describe(many)
        return self._run_parallel(blobs) if many else map(self._run, blobs)

    def _measure_then_run(self, blobs: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """sessions="auto": run the calls in alternate timed stretches on each layout until each has
        run 2 x `_STRETCH_SECONDS`, then the rest on the faster. A job that ends mid-measurement leaves
        the timings on the embedder and the next job goes on from them: the consumer stops pulling at
        its last output, so the decision is made before a stretch's outputs are handed out."""
        timing = self._timing  # layout (many?) -> [calls, seconds], over this embedder's jobs
        self._parallel_sessions()  # made and warmed outside the timing
        blobs = iter(blobs)
        while self._many is None:
            many = timing[True][1] < timing[False][1]  # the layout behind runs up to its next whole stretch
            spent = timing[many][1]
            start = time.perf_counter()
            deadline = start + (math.floor(spent / _STRETCH_SECONDS) + 1) * _STRETCH_SECONDS - spent
            ended = []

            def stretch() -> Iterator[np.ndarray]:
                for blob in blobs:
                    timing[many][0] += 1
                    yield blob
                    if time.perf_counter() >= deadline:
                        return
                ended.append(True)
            outputs = list(self._run_parallel(stretch()) if many else map(self._run, stretch()))
            timing[many][1] += time.perf_counter() - start
            if min(timing[False][1], timing[True][1]) >= 2 * _STRETCH_SECONDS:
                self.layout_rates = {self._describe(m): calls / seconds for m, (calls, seconds) in timing.items()}
                self._many = timing[True][0] / timing[True][1] > timing[False][0] / timing[False][1]
                self.layout = self._describe(self._many)
            yield from outputs
            if ended:
                return
        yield from (self._run_parallel(blobs) if self._many else map(self._run, blobs))

    def _run_parallel(self, blobs: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Each blob on whichever parallel session is free, at most two per session queued; in order."""
        pool = self._parallel_sessions()
        free: queue.SimpleQueue = queue.SimpleQueue()
        for session in pool:
            free.put(session)

        def run(blob: np.ndarray) -> np.ndarray:
            session = free.get()
            try:
                return self._run(blob, session)
            finally:
                free.put(session)

        executor = ThreadPoolExecutor(len(pool), thread_name_prefix="facebce-embed")
        pending: deque = deque()
        try:
            for blob in blobs:
                pending.append(executor.submit(run, blob))
                if len(pending) >= 2 * len(pool):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error (or the caller stopping) waits only for the calls already running
            executor.shutdown(wait=True, cancel_futures=True)

    @property
    def threshold(self) -> float | None:
        """The pair threshold (cosine of two embeddings) from facebce's metadata, or None."""
        return self._meta_float(META_THRESHOLD)

    @property
    def learned_threshold(self) -> float | None:
        """The training head's learned class-centre threshold b/γ from the metadata, or None."""
        return self._meta_float(META_LEARNED_THRESHOLD)

    def _meta_float(self, key: str) -> float | None:
        value = self.metadata.get(key)
        try:
            return None if value is None else float(value)
        except ValueError:
            raise ModelError(f"{self.name}: metadata {key}={value!r} is not a number") from None

    def _step(self) -> int:
        return self.fixed_batch or self.batch_size

    def _probe_batch(self, batch: int | None, side: int) -> int | None:
        """The fixed batch to run at (None: any). One run on blank images: batch 2 when the graph
        declares none (falling back to 1 when 2 fails or gives the wrong rows), else the declared one."""
        if batch is None:
            try:
                self._raw_run(np.zeros((2, 3, side, side), np.float32), 2)
                return None
            except ModelError:
                batch = 1
        self._raw_run(np.zeros((batch, 3, side, side), np.float32), batch)
        return batch

    def _raw_run(self, blob: np.ndarray, rows: int, session=None) -> np.ndarray:
        """One session run; any failure or an output other than `rows` x D floats is a ModelError."""
        session = session or self._session
        try:
            out = session.run([self._output], {self._input: blob.astype(self._input_dtype, copy=False)})[0]
        except Exception as e:  # onnxruntime raises its own Fail/RuntimeException/... types
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
            raise ModelError(f"{self.name}: onnxruntime failed running it on a batch of {len(blob)} "
                             f"({type(e).__name__}: {first[:200]})") from None
        out = np.asarray(out)
        if out.ndim != 2 or out.shape[0] != rows or out.shape[1] < 1 or not np.issubdtype(out.dtype, np.floating):
            raise ModelError(f"{self.name}: output of shape {out.shape} ({out.dtype}) for a batch of {len(blob)}, "
                             f"expected {rows} x D floats (one embedding per image)")
        if self.embedding_size is None:
            self.embedding_size = int(out.shape[1])
        elif out.shape[1] != self.embedding_size:
            raise ModelError(f"{self.name}: output has {out.shape[1]} values per image but the graph "
                             f"declares {self.embedding_size}")
        return out

    def _run(self, blob: np.ndarray, session=None) -> np.ndarray:
        n = len(blob)
        if self.fixed_batch and n < self.fixed_batch:
            blob = np.concatenate([blob, np.zeros((self.fixed_batch - n, *blob.shape[1:]), blob.dtype)])
        return self._raw_run(blob, len(blob), session)[:n].astype(np.float32, copy=False)


def _nchw_square(path: str, shape: list) -> tuple[int | None, int]:
    """(fixed batch or None, side) of an input shaped [batch, 3, S, S]; ModelError naming the shape otherwise."""
    ok = (len(shape) == 4 and shape[1] == 3 and isinstance(shape[2], int) and shape[2] > 0
          and shape[2] == shape[3])
    if not ok:
        raise ModelError(f"{path}: input shape {shape}, expected [batch, 3, S, S] (NCHW, 3 channels, square)")
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return batch, shape[2]


class TorchEmbedder(_Embedder):
    """Runs a torch backbone (facebce or insightface module layout) under eval + inference_mode.

    `embed` switches the model to eval mode and restores its previous mode afterwards, so training
    callbacks can call it mid-run. `device=None` keeps the model where it is; a device moves it.
    """

    def __init__(self, model: nn.Module, preprocess: Preprocess | None = None, device: str | torch.device | None = None,
                 batch_size: int = 64, flip: bool = False, normalize: bool = True, channels_last: bool = False,
                 autocast_dtype: torch.dtype | None = None, progress: bool | None = None):
        import torch

        preprocess = preprocess or Preprocess()
        if preprocess.input_size is None:
            size = getattr(model, "input_size", None)
            if size is None:
                raise ModelError(f"{type(model).__name__} has no input_size: "
                                 f"pass preprocess=Preprocess(input_size=(H, W))")
            preprocess = replace(preprocess, input_size=tuple(size))
        if device is not None:
            model.to(device)
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.model = model
        self.channels_last = channels_last
        self.autocast_dtype = autocast_dtype
        self.embedding_size = getattr(model, "embedding_size", None)
        super().__init__(type(model).__name__, preprocess, batch_size, flip, normalize, progress)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    def _run(self, blob: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(blob).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            return self.model(x).float().cpu().numpy()

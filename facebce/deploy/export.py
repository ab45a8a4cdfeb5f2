"""Export a backbone to ONNX that insightface, the MFR checker and `OnnxEmbedder` all run correctly.

The exported graph takes `data` [batch, 3, S, S] float32 already normalised outside the graph
((x - 127.5) / 127.5, RGB: facebce's training convention and insightface's default), and returns
`embedding` [batch, D], not L2-normalised (formats.md §7). The preprocessing, embedding size,
backbone, head, learned bias and the recommended global threshold travel in `metadata_props`.

Nothing is written unless every requested file passes its parity check against torch eager: files
are built under temporary names in the target folder and renamed into place at the end.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from facebce import __version__
from facebce.data.transforms import INPUT_MEAN, INPUT_STD
from facebce.errors import FacebceError, ModelError
from facebce.models.embedder import META_THRESHOLD, OnnxEmbedder, Preprocess, TorchEmbedder, insightface_preprocess

__all__ = ["ExportReport", "VariantReport", "convert_variant", "export_onnx"]

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
# Per-sample cosine vs torch eager that each file must reach: fp32 is the §7 parity rule; the
# reduced-precision variants are approximations, held to what a correct conversion reaches.
MIN_COSINE = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.95, "int8-static": 0.95}
VARIANTS = ("fp16", "int8", "int8-static")  # int8-static: facebce.deploy.quantize, needs calibration faces
_USER_KEYS = {"backbone": str, "head": str, "bias": float, META_THRESHOLD: float}
_N_RANDOM_IMAGES = 8


@dataclass(frozen=True)
class VariantReport:
    path: str
    size_bytes: int
    min_cosine: float | None  # per-sample cosine vs torch eager; None when check=False
    max_abs_diff: float | None  # on the raw (un-normalised) embeddings


@dataclass(frozen=True)
class ExportReport:
    path: str  # the fp32 model
    report_path: str
    opset: int
    dynamic_batch: bool
    n_parity_images: int  # real images given + random ones
    metadata: dict[str, str]
    variants: dict[str, VariantReport]  # "fp32" and each requested variant

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def export_onnx(backbone: nn.Module, out_path: str | os.PathLike, *, opset: int = 17,
                metadata: Mapping[str, object] | None = None, parity_images: np.ndarray | None = None,
                check: bool = True, dynamic_batch: bool = True, variants: Sequence[str] = (),
                calib_images: np.ndarray | None = None) -> ExportReport:
    """Export `backbone` (left untouched: a CPU copy is exported) to `out_path`, plus `variants`
    ('fp16': fp16 weights with fp32 I/O; 'int8': dynamic int8 quantisation) beside it as
    `<stem>.fp16.onnx` / `<stem>.int8.onnx`, and the report as `<out_path>.json`.

    `metadata` takes plain values for the keys backbone, head, bias, threshold.
    `parity_images` are aligned uint8 N x S x S x 3 BGR crops, checked along with random images.
    `calib_images` (same form, `facebce.deploy.quantize.calibration_images`) calibrate 'int8-static'.
    Raises ModelError (leaving no file) when a file misses its `MIN_COSINE`.
    """
    out = Path(out_path)
    variants = _checked_variants(variants)
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or opset < 11:
        raise ModelError(f"opset={opset!r}: expected an int >= 11")
    model = copy.deepcopy(backbone).cpu().eval()
    side = _input_side(model)
    props = _metadata_props(model, metadata)
    paths = {"fp32": out, **{v: out.with_name(f"{out.stem}.{v}{out.suffix or '.onnx'}") for v in variants}}
    temps = {name: _temp_path(path) for name, path in paths.items()}
    try:
        _export_fp32(model, temps["fp32"], opset, dynamic_batch, side, props)
        for name in variants:
            convert_variant(temps["fp32"], temps[name], name, calib_images=calib_images)
        images = _parity_inputs(parity_images, side) if check else None
        reference = TorchEmbedder(model, normalize=False).embed(images) if check else None
        reports = {name: _variant_report(name, temps[name], paths[name], reference, images) for name in paths}
        for name, path in paths.items():
            os.replace(temps[name], path)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    report = ExportReport(path=str(out), report_path=str(out) + ".json", opset=int(opset),
                          dynamic_batch=bool(dynamic_batch), n_parity_images=len(images) if check else 0,
                          metadata=props, variants=reports)
    _write_atomic(Path(report.report_path), report.to_json())
    return report


def _checked_variants(variants: Sequence[str]) -> list[str]:
    if isinstance(variants, str):
        variants = (variants,)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ModelError(f"variants={list(variants)!r}: unknown {unknown}; valid: {', '.join(VARIANTS)}")
    return list(dict.fromkeys(variants))


def _input_side(model: nn.Module) -> int:
    """The square input side; insightface routes only sides >= 112 divisible by 16 to ArcFaceONNX."""
    h, w = getattr(model, "input_size", (112, 112))
    if h != w or h < 112 or h % 16:
        raise ModelError(f"{type(model).__name__}.input_size={(h, w)}: insightface's model_zoo only "
                         f"recognises square inputs with a side >= 112 divisible by 16")
    return int(h)


def _metadata_props(model: nn.Module, metadata: Mapping[str, object] | None) -> dict[str, str]:
    """facebce's metadata_props: preprocessing and embedding size always, the user's keys when given."""
    user = dict(metadata or {})
    unknown = sorted(set(user) - set(_USER_KEYS))
    if unknown:
        raise ModelError(f"metadata: unknown key(s) {unknown}; valid: {', '.join(_USER_KEYS)}")
    props = Preprocess(color="rgb", mean=INPUT_MEAN, std=INPUT_STD).to_metadata()
    props.update(embedding_size=str(model.embedding_size), backbone=type(model).__name__,
                 facebce_version=__version__)
    for key, value in user.items():
        props[key] = _plain(key, value, _USER_KEYS[key])
    return props


def _plain(key: str, value: object, kind: type) -> str:
    if kind is str:
        if not isinstance(value, str) or not value:
            raise ModelError(f"metadata {key}={value!r}: expected a non-empty string")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ModelError(f"metadata {key}={value!r}: expected a finite number")
    if key == META_THRESHOLD and not -1.0 <= value <= 1.0:
        raise ModelError(f"metadata {key}={value!r}: a cosine threshold lies in [-1, 1]")
    return repr(float(value))


def _temp_path(path: Path) -> Path:
    """An empty temporary file beside `path` (same filesystem, so os.replace is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _export_fp32(model: nn.Module, path: Path, opset: int, dynamic_batch: bool, side: int,
                 props: dict[str, str]) -> None:
    """torch.onnx.export with the TorchScript exporter, then metadata and the insightface checks.

    torch >= 2.9 defaults to the dynamo exporter, which needs onnxscript (not a facebce
    dependency) and names nodes differently; the TorchScript exporter gives the arcface_torch
    layout. Its deprecation warning is expected here and silenced.
    """
    dummy = torch.zeros(1, 3, side, side)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
                          do_constant_folding=True)
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, props)
    _check_insightface_view(proto, path)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _check_insightface_view(proto: onnx.ModelProto, path: Path) -> None:
    """insightface must see a recognition model (1 input, 1 output) that wants (x - 127.5) / 127.5."""
    n_in, n_out = len(proto.graph.input), len(proto.graph.output)
    if n_in != 1 or n_out != 1:
        raise ModelError(f"{path}: exported {n_in} inputs and {n_out} outputs; insightface needs 1 and 1")
    sniffed = insightface_preprocess(proto)
    if (sniffed.mean, sniffed.std) != (INPUT_MEAN, INPUT_STD):
        raise ModelError(f"{path}: early Sub*/Mul* node names make insightface feed raw pixels; "
                         f"rename them (normalisation happens outside the graph)")


def convert_variant(src: str | os.PathLike, dst: str | os.PathLike, kind: str, *,
                    calib_images: np.ndarray | None = None, preprocess: Preprocess | None = None) -> Path:
    """Write the `kind` variant of the fp32 ONNX model `src` to `dst` and return `dst`.

    kind 'fp16': fp16 weights and compute, fp32 input and output; 'int8': dynamic int8 quantisation
    (weights int8 offline, activations quantised per run; no calibration data); 'int8-static':
    QDQ int8 with activation ranges calibrated on `calib_images` (aligned uint8 BGR crops) through
    `preprocess` (None: the model's facebce metadata), see facebce.deploy.quantize. Works on any fp32
    ONNX model, facebce's exports and foreign ones alike (fixed or symbolic batch, opset >= 11);
    metadata_props are kept. The file is built under a temporary name beside `dst` and renamed into
    place, so `dst` is never half-written and is left as it was on failure. `src` may equal `dst`.
    No accuracy check is made here: export_onnx checks its variants, others are the caller's to check.
    """
    if not isinstance(kind, str) or kind not in VARIANTS:
        raise ModelError(f"variant kind={kind!r}: expected one of {', '.join(VARIANTS)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ModelError(f"{src}: no such ONNX file")
    if kind == "int8-static" and calib_images is None:
        raise ModelError("int8-static needs calibration images (aligned faces: --calib-images DIR or .bin)")
    temp = _temp_path(dst)
    try:
        try:
            if kind == "int8-static":
                from facebce.deploy.quantize import quantize_static_int8
                quantize_static_int8(src, temp, calib_images, preprocess)
            else:
                _CONVERTERS[kind](src, temp)
        except FacebceError:
            raise
        except Exception as e:  # onnx / onnxruntime raise their own types for models they cannot convert
            raise ModelError(f"{src}: {kind} conversion failed ({type(e).__name__}: {e})") from e
        os.replace(temp, dst)
    finally:
        temp.unlink(missing_ok=True)
    return dst


def _to_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute, fp32 input and output (onnxruntime's converter, shipped with onnxruntime)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


def _to_int8(src: Path, dst: Path) -> None:
    """Dynamic int8: weights quantised offline, activations per batch (no calibration data needed).

    onnxruntime logs advice to run its shape pre-processing first on the root logger; it does not
    change a CNN's result, so that one message is filtered out for the call.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    advice = _DropMessages("pre-processing before quantization")
    root.addFilter(advice)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.removeFilter(advice)


class _DropMessages(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_CONVERTERS = {"fp16": _to_fp16, "int8": _to_int8}


def _parity_inputs(parity_images: np.ndarray | None, side: int) -> np.ndarray:
    """The given real crops plus a few random ones (random pixels reach corners real faces do not)."""
    rng = np.random.default_rng(0)
    random = rng.integers(0, 256, size=(_N_RANDOM_IMAGES, side, side, 3), dtype=np.uint8)
    if parity_images is None:
        return random
    real = np.asarray(parity_images)
    if real.dtype != np.uint8 or real.ndim != 4 or real.shape[1:] != (side, side, 3):
        raise ModelError(f"parity_images: shape {real.shape} {real.dtype}, "
                         f"expected uint8 N x {side} x {side} x 3 (BGR)")
    return np.concatenate([real, random])


def _variant_report(name: str, temp: Path, final: Path, reference: np.ndarray | None,
                    images: np.ndarray | None) -> VariantReport:
    """Size, and the per-sample cosine / max abs difference of onnxruntime (CPU) vs torch eager."""
    size = temp.stat().st_size
    if reference is None:
        return VariantReport(str(final), size, None, None)
    got = OnnxEmbedder(temp, providers=["CPUExecutionProvider"], normalize=False, batch_size=16).embed(images)
    cosine = np.sum(got * reference, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    min_cos, max_diff = float(cosine.min()), float(np.abs(got - reference).max())
    if min_cos < MIN_COSINE[name]:
        raise ModelError(f"{final}: {name} export fails parity with torch eager: min cosine {min_cos:.6f} "
                         f"< {MIN_COSINE[name]} over {len(images)} images (nothing written)")
    return VariantReport(str(final), size, min_cos, max_diff)


def _write_atomic(path: Path, text: str) -> None:
    temp = _temp_path(path)
    try:
        temp.write_text(text)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)

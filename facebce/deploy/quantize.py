"""Static int8 quantisation of a recognition ONNX model, calibrated on real aligned faces.

`quantize_static_int8(src, dst, calib_images)` writes a QDQ model (QuantizeLinear / DequantizeLinear
pairs around every quantised operator, which onnxruntime fuses into int8 kernels): weights int8,
symmetric, one scale per output channel; activations uint8 with scales fixed offline from the
ranges the calibration faces produce. Unlike dynamic quantisation (`convert_variant(..., "int8")`),
no activation range is computed per batch at run time, and the ranges come from faces rather than
from whatever batch arrives, so the scores - and the global threshold - move less.

Calibration images are aligned uint8 BGR crops of the model's input size: `calibration_images`
reads a folder (recursively, .jpg/.jpeg/.png) or a verification .bin, evenly sampled up to `limit`.
They are preprocessed the way the model wants (`Preprocess`: facebce's exports carry it in their
metadata; foreign models need it given).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from facebce.errors import DataFormatError, ModelError
from facebce.fileio import read_bgr
from facebce.models.embedder import Preprocess

__all__ = ["CALIBRATION_METHODS", "calibration_images", "quantize_static_int8"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_LIMIT = 256


def calibration_images(source: str | os.PathLike, *, side: int = 112, limit: int = DEFAULT_LIMIT) -> np.ndarray:
    """Aligned faces for calibration, uint8 N x side x side x 3 BGR: a folder of crops (searched
    recursively, files in sorted path order) or a verification .bin; at most `limit`, evenly spaced
    over the source so that many identities are seen. One-line DataFormatError for a bad source."""
    path = Path(source)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise DataFormatError(f"calibration limit={limit!r}: expected a positive int")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not p.name.startswith("."))
        if not files:
            raise DataFormatError(f"{path}: no calibration images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        pick = _evenly(len(files), limit)
        images = []
        for i in pick:
            img = read_bgr(files[i])
            if img.shape != (side, side, 3):
                raise DataFormatError(f"{files[i]}: calibration image is {img.shape[1]}x{img.shape[0]}, expected "
                                      f"an aligned {side}x{side} crop")
            images.append(img)
        return np.stack(images)
    if path.is_file() and path.suffix.lower() == ".bin":
        from facebce.data.verification_bin import load_bin

        vset = load_bin(path)
        rgb = vset.decode(image_size=side, progress=False)
        return np.ascontiguousarray(rgb[_evenly(len(rgb), limit), ..., ::-1])  # RGB -> BGR
    raise DataFormatError(f"{path}: calibration source must be a folder of aligned crops or a verification .bin")


def _evenly(n: int, limit: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def quantize_static_int8(src: str | os.PathLike, dst: str | os.PathLike, calib_images: np.ndarray,
                         preprocess: Preprocess | None = None, *, method: str = "minmax",
                         per_channel: bool = True, chunk: int = 32) -> Path:
    """Write the static int8 (QDQ) version of fp32 model `src` to `dst` (not atomic: the caller
    writes to a temporary name; `export.convert_variant` does) and return `dst`.

    `calib_images`: uint8 N x S x S x 3 BGR aligned crops (`calibration_images`). `preprocess`:
    how the model wants its pixels; None reads facebce's metadata from `src` (ModelError when the
    model has none). `method`: how the activation ranges are read from the calibration outputs
    (minmax: the observed extremes; percentile: the 99.999th percentile; entropy: KL divergence).
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ModelError(f"calibration method={method!r}: expected one of {', '.join(CALIBRATION_METHODS)}")
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    if preprocess is None:
        props = {p.key: p.value for p in model.metadata_props}
        preprocess = Preprocess.from_metadata(props, str(src))
        if preprocess is None:
            raise ModelError(f"{src}: no facebce preprocessing in its metadata; give the model's color/mean/std")
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise ModelError(f"{src}: expected one image input, found {len(inputs)}")
    name = inputs[0].name
    dims = inputs[0].type.tensor_type.shape.dim
    fixed = dims[0].dim_value if len(dims) == 4 and dims[0].HasField("dim_value") else 0
    side = dims[2].dim_value if len(dims) == 4 and dims[2].HasField("dim_value") else None
    images = np.asarray(calib_images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or len(images) == 0:
        raise DataFormatError(f"calibration images: {images.dtype} {images.shape}, expected uint8 N x S x S x 3 BGR")
    if side is not None and images.shape[1:3] != (side, side):
        raise DataFormatError(f"calibration images are {images.shape[1]}x{images.shape[2]}; {src} wants {side}x{side}")
    step = fixed or chunk
    blobs = [preprocess.to_blob(images[s:s + step]) for s in range(0, len(images), step)]
    if fixed and len(blobs[-1]) != fixed:
        blobs.pop()  # a fixed-batch model cannot take a short last chunk
        if not blobs:
            raise DataFormatError(f"calibration: {len(images)} images, {src} takes batches of {fixed}")

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(blobs)

        def get_next(self):
            blob = next(self._it, None)
            return None if blob is None else {name: blob}

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    root = logging.getLogger()
    quiet = _DropAdvice()
    root.addFilter(quiet)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=dst.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        source = src
        if _opset(model) < 13:  # per-channel DequantizeLinear (its `axis`) needs opset 13
            from onnx import version_converter

            source = Path(tmp) / "opset13.onnx"
            onnx.save(version_converter.convert_version(onnx.load(str(src)), 13), str(source))
        try:
            # shape inference + onnxruntime's graph optimisations (BatchNorm folded into the convolutions)
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(dst), _Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=methods[method],
                            extra_options={"CalibTensorRangeSymmetric": False, "WeightSymmetric": True,
                                           "CalibMovingAverage": False})
        finally:
            root.removeFilter(quiet)
    quantized = onnx.load(str(dst))
    del quantized.metadata_props[:]
    for p in model.metadata_props:  # the preprocessing, threshold, backbone travel with the variant
        quantized.metadata_props.add(key=p.key, value=p.value)
    onnx.save(quantized, str(dst))
    return dst


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


class _DropAdvice(logging.Filter):
    """onnxruntime logs advice (run pre-processing first, ...) on the root logger; drop it for the call."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "pre-processing" not in msg and "preprocess" not in msg.lower()

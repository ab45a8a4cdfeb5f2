"""Export a backbone to ONNX that insightface, the MFR checker and `OnnxEmbedder` all run correctly.

The exported graph takes `data` [batch, 3, S, S] float32 already normalised outside the graph
((x - 127.5) / 127.5, RGB: facebce's training convention and insightface's default), and returns
`embedding` [batch, D], not L2-normalised (docs/formats.md §7). The preprocessing, embedding size,
backbone, head and learned bias travel in `metadata_props`, with two thresholds kept apart:

- `learned_threshold` (+ `learned_threshold_kind` = "class_centre"): the head's learned b/γ, a
  threshold on embedding-vs-class-centre scores, written whenever the run has one;
- `threshold` (+ `threshold_source` = "user" | "calibrated"; a calibration adds
  `threshold_target_far`, `threshold_ci` as JSON "[lo, hi]" and `threshold_calibration`, the
  calibration file's digest): a PAIR threshold (embedding vs embedding, what a gallery compares),
  written only when a user gave one or calibrated one. b/γ is never written as `threshold`.

Variants (fp16, int8) go into a `variants/` folder beside the model, so a folder handed to
insightface's FaceAnalysis (which loads the first `*.onnx` of the folder in sorted order) holds one
recognition model, the fp32 one.

Nothing is written unless every requested file passes its parity check against torch eager: files
are built in a scratch folder and only then published, each through facebce.fileio's atomic
writes (normal umask permissions, fsynced, renamed into place).

The module runs over 450 lines: the fp32 export, its variants (fp16, dynamic and static int8)
and their parity checks are one transaction that writes nothing unless every file passes.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import numbers
import os
import shutil
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
from facebce.fileio import atomic_open, atomic_write_text
from facebce.models.embedder import (META_LEARNED_THRESHOLD, META_THRESHOLD, OnnxEmbedder, Preprocess, TorchEmbedder,
                                     insightface_preprocess)

__all__ = ["ExportReport", "VariantReport", "convert_variant", "export_onnx", "export_run", "pair_threshold_metadata",
           "variant_path", "META_LEARNED_THRESHOLD", "META_THRESHOLD"]

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
# Per-sample cosine vs torch eager that each file must reach: fp32 is the §7 parity rule; the
# reduced-precision variants are approximations, held to what a correct conversion reaches.
MIN_COSINE = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.95, "int8-static": 0.95}
# Judged on real faces only: calibrated on faces, a static int8 model clips activations that random
# pixels push past the calibrated ranges, which says nothing of how it embeds faces.
FACES_ONLY = ("int8-static",)
_N_CALIB_PARITY = 32  # calibration faces that stand in for parity crops when none are given
VARIANTS = ("fp16", "int8", "int8-static")  # int8-static: facebce.deploy.quantize, needs calibration faces
VARIANTS_DIR = "variants"  # beside the fp32 model: insightface's folder glob (*.onnx) never sees them
# metadata keys of the thresholds (module docstring)
META_LEARNED_KIND = "learned_threshold_kind"
LEARNED_KIND_CLASS_CENTRE = "class_centre"
META_THRESHOLD_SOURCE = "threshold_source"
META_THRESHOLD_TARGET_FAR = "threshold_target_far"
META_THRESHOLD_CI = "threshold_ci"
META_THRESHOLD_CALIBRATION = "threshold_calibration"
THRESHOLD_SOURCES = ("user", "calibrated")
# what callers may pass in `metadata`; `threshold` there is a user's pair threshold
_USER_KEYS = {"backbone": str, "head": str, "bias": float, META_LEARNED_THRESHOLD: float, META_THRESHOLD: float}
_N_RANDOM_IMAGES = 8


@dataclass(frozen=True)
class VariantReport:
    path: str
    size_bytes: int
    min_cosine: float | None  # per-sample cosine vs torch eager; None when check=False
    max_abs_diff: float | None  # on the raw (un-normalised) embeddings
    n_images: int | None = None  # the images it was checked on (faces only for a calibrated variant)


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

    def summary(self) -> str:
        """What `facebce export` prints: the files, their parity, and which thresholds were recorded."""
        m = self.metadata
        lines = [f"exported {m.get('backbone')} -> {self.path} (opset {self.opset}, dynamic batch {self.dynamic_batch}"
                 + (f", head {m['head']}" if "head" in m else "")
                 + (f", bias {float(m['bias']):.4f}" if "bias" in m else "") + ")"]
        if META_LEARNED_THRESHOLD in m:
            lines.append(f"  learned_threshold {float(m[META_LEARNED_THRESHOLD]):.4f} (the head's b/γ: a "
                         f"{m.get(META_LEARNED_KIND, LEARNED_KIND_CLASS_CENTRE).replace('_', '-')} threshold, "
                         "not for comparing two faces)")
        if META_THRESHOLD in m:
            source = m.get(META_THRESHOLD_SOURCE, "user")
            extra = (f", target FAR {m[META_THRESHOLD_TARGET_FAR]}, 95 % interval {_interval(m[META_THRESHOLD_CI])}"
                     if source == "calibrated" else "")
            lines.append(f"  threshold {float(m[META_THRESHOLD]):.4f} (pair threshold, {source}{extra})")
        else:
            lines.append("  no pair threshold recorded (give --threshold T or --threshold calibrated:CALIB.json)")
        for name, v in self.variants.items():
            check = ("not parity-checked" if v.min_cosine is None else
                     f"min cosine vs PyTorch {v.min_cosine:.7f} over {v.n_images or self.n_parity_images} "
                     f"{'faces' if name in FACES_ONLY else 'images'}, "
                     f"max |diff| {v.max_abs_diff:.2e}")
            lines.append(f"  {name:5} {v.path}: {v.size_bytes / 1e6:.1f} MB, {check}")
        lines.append(f"  report: {self.report_path}")
        return "\n".join(lines)


def variant_path(out_path: str | os.PathLike, kind: str) -> Path:
    """Where export_onnx writes the `kind` variant of `out_path`: `<folder>/variants/<stem>.<kind>.onnx`."""
    out = Path(out_path)
    return out.parent / VARIANTS_DIR / f"{out.stem}.{kind}{out.suffix or '.onnx'}"


def threshold_option(text: str, *, model: str | os.PathLike | None = None,
                     arch: str | None = None) -> tuple[float, dict | None]:
    """`facebce export --threshold`: a number (the user's pair threshold; provenance None) or
    `calibrated:CALIB.json`, read and verified by facebce.eval.calibrate (checksum; made with `model`'s
    weights when given) into (threshold, provenance for `pair_threshold_metadata`)."""
    if text.startswith("calibrated:"):
        from facebce.eval.calibrate import resolve_threshold_spec
        from facebce.eval.model_loading import ModelSpec, file_digest
        digest = None if model is None else file_digest(ModelSpec(model, arch=arch).weights_file)
        resolved = resolve_threshold_spec(text, model_digest=digest)
        return resolved.value, resolved.provenance()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not -1.0 <= value <= 1.0:
        raise ModelError(f"--threshold {text!r}: expected a cosine in [-1, 1] or calibrated:CALIB.json")
    return value, None


def pair_threshold_metadata(value: float, provenance: Mapping[str, object] | None = None) -> dict[str, object]:
    """The metadata entries of a pair threshold: `threshold` and where it came from.

    `provenance` None: a threshold the user chose (`threshold_source` "user"). A calibration passes
    {"source": "calibrated", "target_far": float, "ci": (lo, hi), "calibration": "<digest of calib.json>"}
    (facebce.eval.calibrate makes these; `--threshold calibrated:calib.json` reads one).
    """
    entries: dict[str, object] = {META_THRESHOLD: _checked_threshold(META_THRESHOLD, value)}
    prov = dict(provenance or {"source": "user"})
    source = prov.pop("source", None)
    if source not in THRESHOLD_SOURCES:
        raise ModelError(f"threshold provenance source={source!r}: expected one of {', '.join(THRESHOLD_SOURCES)}")
    entries[META_THRESHOLD_SOURCE] = source
    if source == "user":
        if prov:
            raise ModelError(f"threshold provenance: a user threshold takes no {sorted(prov)}")
        return entries
    missing = sorted({"target_far", "ci", "calibration"} - set(prov))
    unknown = sorted(set(prov) - {"target_far", "ci", "calibration"})
    if missing or unknown:
        raise ModelError(f"threshold provenance: calibrated needs target_far, ci, calibration"
                         f"{f'; missing {missing}' if missing else ''}{f'; unknown {unknown}' if unknown else ''}")
    far = prov["target_far"]
    if isinstance(far, bool) or not isinstance(far, numbers.Real) or not 0 < far <= 1:
        raise ModelError(f"threshold provenance target_far={far!r}: expected a number in (0, 1]")
    ci = prov["ci"]
    if (not isinstance(ci, (list, tuple)) or len(ci) != 2
            or not all(isinstance(c, numbers.Real) and not isinstance(c, bool) and math.isfinite(c) for c in ci)
            or ci[0] > ci[1]):
        raise ModelError(f"threshold provenance ci={ci!r}: expected [lo, hi] with lo <= hi")
    digest = prov["calibration"]
    if not isinstance(digest, str) or not digest:
        raise ModelError(f"threshold provenance calibration={digest!r}: expected the calibration file's digest")
    entries[META_THRESHOLD_TARGET_FAR] = repr(float(far))
    entries[META_THRESHOLD_CI] = json.dumps([float(ci[0]), float(ci[1])])
    entries[META_THRESHOLD_CALIBRATION] = digest
    return entries


def export_onnx(backbone: nn.Module, out_path: str | os.PathLike, *, opset: int = 17,
                metadata: Mapping[str, object] | None = None, parity_images: np.ndarray | None = None,
                check: bool = True, dynamic_batch: bool = True, variants: Sequence[str] = (),
                threshold_provenance: Mapping[str, object] | None = None,
                calib_images: np.ndarray | None = None) -> ExportReport:
    """Export `backbone` (left untouched: a CPU copy is exported) to `out_path`, plus `variants`
    ('fp16': fp16 weights with fp32 I/O; 'int8': dynamic int8 quantisation) as
    `variants/<stem>.fp16.onnx` / `variants/<stem>.int8.onnx` beside it (`variant_path`), and the
    report as `<out_path>.json`.

    `metadata` takes plain values for the keys backbone, head, bias, learned_threshold (the head's
    b/γ, recorded with learned_threshold_kind "class_centre") and threshold (a PAIR threshold; its
    provenance is `threshold_provenance`, see `pair_threshold_metadata`; None: the user's).
    `parity_images` are aligned uint8 N x S x S x 3 BGR crops, checked along with random images
    (`FACES_ONLY` variants: the crops alone, else the first calibration faces).
    `calib_images` (same form, `facebce.deploy.quantize.calibration_images`) calibrate 'int8-static'.
    Raises ModelError (leaving no file) when a file misses its `MIN_COSINE`.
    """
    out = Path(out_path)
    variants = _checked_variants(variants)
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or opset < 11:
        raise ModelError(f"opset={opset!r}: expected an int >= 11")
    if out.is_dir():
        raise ModelError(f"{out}: is a folder; give the .onnx file to write")
    model = copy.deepcopy(backbone).cpu().eval()
    side = _input_side(model)
    props = _metadata_props(model, metadata, threshold_provenance)
    paths = {"fp32": out, **{v: variant_path(out, v) for v in variants}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        temps = {name: Path(scratch) / f"{name}.onnx" for name in paths}
        _export_fp32(model, temps["fp32"], opset, dynamic_batch, side, props)
        for name in variants:
            _convert(temps["fp32"], temps[name], name, calib_images)
        images = _parity_inputs(parity_images, side) if check else None
        reference = TorchEmbedder(model, normalize=False).embed(images) if check else None
        reports = {}
        for name in paths:
            imgs, ref = images, reference
            if check and name in FACES_ONLY:  # the given crops (first in `images`), else calibration faces
                n_real = 0 if parity_images is None else len(parity_images)
                if n_real:
                    imgs, ref = images[:n_real], reference[:n_real]
                else:
                    imgs = np.asarray(calib_images)[:_N_CALIB_PARITY]
                    ref = TorchEmbedder(model, normalize=False).embed(imgs)
            reports[name] = _variant_report(name, temps[name], paths[name], ref, imgs)
        for name in variants:  # the fp32 model last: a reader of `out` finds its variants already there
            _publish(temps[name], paths[name])
        _publish(temps["fp32"], out)
    report = ExportReport(path=str(out), report_path=str(out) + ".json", opset=int(opset),
                          dynamic_batch=bool(dynamic_batch), n_parity_images=len(images) if check else 0,
                          metadata=props, variants=reports)
    atomic_write_text(report.report_path, report.to_json())
    return report


def export_run(model: str | os.PathLike, out_path: str | os.PathLike, *, arch: str | None = None,
               embedding_size: int = 512, threshold: float | None = None,
               threshold_provenance: Mapping[str, object] | None = None, head: str | None = None,
               bias: float | None = None, variants: Sequence[str] = (), opset: int = 17,
               parity_bin: str | os.PathLike | None = None, parity_images: int = 32,
               calib_images: str | os.PathLike | None = None, calib_limit: int = 256) -> ExportReport:
    """Export a facebce training run folder (or an insightface-layout `.pth` with `arch`) with its
    metadata: what `facebce export MODEL OUT` does.

    From a run folder's model card: backbone, head, bias and the head's learned threshold b/γ
    (recorded as `learned_threshold`, never as the pair threshold). `threshold` is a pair threshold
    given by the user (or, with `threshold_provenance`, calibrated); without one, the model has no
    `threshold` metadata. `head`/`bias` override the card's. `parity_bin`: a verification .bin whose
    first `parity_images` images join the parity check. `calib_images`: aligned faces (a folder or
    a .bin, at most `calib_limit`) that calibrate the 'int8-static' variant.
    """
    from facebce.eval.model_loading import ModelSpec, read_model_card

    spec = ModelSpec(model, arch=arch, embedding_size=embedding_size)
    backbone = spec.backbone()
    card = read_model_card(spec.path) if spec.path.is_dir() else {}
    parity = None
    if parity_bin is not None:
        from facebce.data.verification_bin import load_bin
        parity = load_bin(parity_bin).decode(progress=False)[: parity_images, ..., ::-1].copy()
    metadata = {"backbone": card.get("arch", arch), "head": card.get("head"), "bias": card.get("bias"),
                META_LEARNED_THRESHOLD: card.get("threshold")}  # the card's `threshold` is the head's b/γ
    metadata.update({k: v for k, v in (("head", head), ("bias", bias), (META_THRESHOLD, threshold)) if v is not None})
    metadata = {k: v for k, v in metadata.items() if v is not None}
    if threshold is None and threshold_provenance is not None:
        raise ModelError("threshold provenance given without a threshold")
    calib = None
    if calib_images is not None and "int8-static" in _checked_variants(variants):
        from facebce.deploy.quantize import calibration_images
        calib = calibration_images(calib_images, limit=calib_limit)
    return export_onnx(backbone, out_path, opset=opset, metadata=metadata, parity_images=parity,
                       variants=variants, threshold_provenance=threshold_provenance, calib_images=calib)


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


def _metadata_props(model: nn.Module, metadata: Mapping[str, object] | None,
                    threshold_provenance: Mapping[str, object] | None = None) -> dict[str, str]:
    """facebce's metadata_props: preprocessing and embedding size always, the user's keys when given."""
    user = dict(metadata or {})
    unknown = sorted(set(user) - set(_USER_KEYS))
    if unknown:
        raise ModelError(f"metadata: unknown key(s) {unknown}; valid: {', '.join(_USER_KEYS)}")
    props = Preprocess(color="rgb", mean=INPUT_MEAN, std=INPUT_STD).to_metadata()
    props.update(embedding_size=str(model.embedding_size), backbone=type(model).__name__,
                 facebce_version=__version__)
    pair = user.pop(META_THRESHOLD, None)
    for key, value in user.items():
        props[key] = _plain(key, value, _USER_KEYS[key])
    if META_LEARNED_THRESHOLD in user:
        props[META_LEARNED_KIND] = LEARNED_KIND_CLASS_CENTRE
    if pair is not None:
        props.update(pair_threshold_metadata(pair, threshold_provenance))
    elif threshold_provenance is not None:
        raise ModelError("metadata: threshold provenance given without a threshold")
    return props


def _checked_threshold(key: str, value: object) -> str:
    text = _plain(key, value, float)
    if not -1.0 <= float(text) <= 1.0:
        raise ModelError(f"metadata {key}={value!r}: a cosine threshold lies in [-1, 1]")
    return text


def _plain(key: str, value: object, kind: type) -> str:
    if kind is str:
        if not isinstance(value, str) or not value:
            raise ModelError(f"metadata {key}={value!r}: expected a non-empty string")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ModelError(f"metadata {key}={value!r}: expected a finite number")
    return repr(float(value))


def _publish(built: Path, path: Path) -> None:
    """Copy a finished scratch file to `path` atomically (fileio: umask permissions, fsync, rename)."""
    with open(built, "rb") as src, atomic_open(path, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


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
    metadata_props are kept. The file is built in a scratch folder beside `dst`, then written atomically
    (facebce.fileio), so `dst` is never half-written and is left as it was on failure. `src` may equal `dst`.
    No accuracy check is made here: export_onnx checks its variants, others are the caller's to check.
    """
    if not isinstance(kind, str) or kind not in VARIANTS:
        raise ModelError(f"variant kind={kind!r}: expected one of {', '.join(VARIANTS)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ModelError(f"{src}: no such ONNX file")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as scratch:
        built = Path(scratch) / "variant.onnx"
        _convert(src, built, kind, calib_images, preprocess)
        _publish(built, dst)
    return dst


def _convert(src: Path, dst: Path, kind: str, calib_images: np.ndarray | None = None,
             preprocess: Preprocess | None = None) -> None:
    if kind == "int8-static" and calib_images is None:
        raise ModelError("int8-static needs calibration images (aligned faces: --calib-images DIR or .bin)")
    try:
        if kind == "int8-static":
            from facebce.deploy.quantize import quantize_static_int8
            quantize_static_int8(src, dst, calib_images, preprocess)
        else:
            _CONVERTERS[kind](src, dst)
    except FacebceError:
        raise
    except Exception as e:  # onnx / onnxruntime raise their own types for models they cannot convert
        raise ModelError(f"{src}: {kind} conversion failed ({type(e).__name__}: {e})") from e


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
    return VariantReport(str(final), size, min_cos, max_diff, len(images))


def _interval(text: str) -> str:
    """The recorded threshold interval (JSON [lo, hi], full precision) as "[lo, hi]" to 4 decimals."""
    try:
        lo, hi = (float(v) for v in json.loads(text))
    except (ValueError, TypeError):
        return text
    return f"[{lo:.4f}, {hi:.4f}]"

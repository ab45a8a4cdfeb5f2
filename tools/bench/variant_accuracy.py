"""Accuracy of the fp16 / int8 ONNX variants (`convert_variant`, as export_onnx makes them) on a real verification set.

The fp32 model is converted to fp16, dynamic int8 and static int8 (QDQ, calibrated on
`--calib-images`, default 256 crops of ../shared/data/lfw_aligned_10plus: calibration sets activation
ranges only, no labels) in a temporary folder; every image of the set
is embedded by each of the three models through facebce's `OnnxEmbedder` (flip-sum, L2-normalised,
onnxruntime CPU), and each is scored with facebce.eval: 10-fold accuracy (`ten_fold`), the best
single threshold (`best_threshold`), and - the deployment question - the accuracy of the variant
at the *fp32 model's* best threshold (`accuracy_at_threshold`): does a threshold fitted on the
fp32 model still hold for the variant? Also the per-image cosine between the variant's and the
fp32 embeddings, and throughput: images/s over the embedding calls only (preprocessing + 2 forward
passes per image, for the flip; decoding excluded), `--threads` onnxruntime intra-op threads.

Defaults: ../shared/data/models/mobilefacenet.onnx with its README preprocessing (RGB, ImageNet
per-channel mean/std on 0..255 pixels) on ../shared/data/lfw.bin.

`--limit-pairs N` scores a subset for a quicker run: from each of the 10 folds, its first N/20
genuine and first N/20 impostor pairs (so every fold - in LFW, a disjoint set of people - and both
classes stay in every test fold; the first N pairs of LFW would give folds of one class only).

Usage: python tools/bench/variant_accuracy.py [--model M.onnx] [--bin SET.bin] [--limit-pairs N]
       [--mean 123.675,116.28,103.53] [--std 58.395,57.12,57.375] [--color rgb] [--threads 1] [--keep DIR]
       [--calib-images DIR|.bin] [--calib-limit 256] [--variants fp16 int8 int8-static]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import numpy as np  # noqa: E402

from facebce.deploy.export import VARIANTS, convert_variant  # noqa: E402
from facebce.deploy.quantize import calibration_images  # noqa: E402
from facebce.errors import ConfigError  # noqa: E402
from facebce.eval.model_loading import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from facebce.eval.protocols import get_protocol  # noqa: E402
from facebce.eval.image_sets import load_pairs  # noqa: E402
from facebce.eval.tenfold import TenFoldResult, fold_bounds, ten_fold  # noqa: E402
from facebce.eval.verification import ThresholdResult, accuracy_at_threshold, best_threshold  # noqa: E402
from facebce.models.embedder import OnnxEmbedder, Preprocess  # noqa: E402

DEFAULT_MODEL = REPO.parent / "shared" / "data" / "models" / "mobilefacenet.onnx"
DEFAULT_BIN = REPO.parent / "shared" / "data" / "lfw.bin"
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "lfw_aligned_10plus"
N_FOLDS = 10


@dataclass(frozen=True)
class VariantResult:
    name: str  # fp32, fp16, int8
    size_bytes: int
    ten_fold: TenFoldResult
    best: ThresholdResult  # the variant's own best single threshold
    at_fp32_threshold: ThresholdResult  # the variant judged at the fp32 model's best threshold
    cosine_mean: float  # per image, variant vs fp32 embedding (flip-summed, L2-normalised)
    cosine_min: float
    images_per_s: float
    n_images: int  # distinct images embedded


@dataclass(frozen=True)
class Measurement:
    model: Path
    bin: Path
    preprocess: Preprocess
    n_pairs: int
    threads: int
    results: list[VariantResult]

    def result(self, name: str) -> VariantResult:
        return next(r for r in self.results if r.name == name)


def select_pairs(issame: np.ndarray, limit: int | None, n_folds: int = N_FOLDS) -> np.ndarray:
    """Indices of the pairs to score: all of them, or from each fold its first limit/(2 n_folds) genuine
    and first limit/(2 n_folds) impostor pairs, in file order."""
    if limit is None or limit >= issame.size:
        return np.arange(issame.size)
    per_class = limit // (2 * n_folds)
    if per_class < 1:
        raise ConfigError(f"--limit-pairs {limit}: need at least {2 * n_folds} (one pair per class per fold)")
    bounds = fold_bounds(issame.size, n_folds)
    chosen = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        fold = np.arange(lo, hi)
        chosen += [fold[issame[lo:hi]][:per_class], fold[~issame[lo:hi]][:per_class]]
    return np.sort(np.concatenate(chosen))


def _embed(path: Path, crops: np.ndarray, preprocess: Preprocess, threads: int,
           progress: bool) -> tuple[np.ndarray, float]:
    """Flip-summed, L2-normalised embeddings of `crops` (BGR) and images/s of the embed call."""
    embedder = OnnxEmbedder(path, preprocess=preprocess, providers=["CPUExecutionProvider"], flip=True,
                            normalize=True, intra_op_threads=threads, progress=progress)
    embedder.embed(crops[:1])  # warm-up: first-run allocations are not throughput
    start = time.perf_counter()
    emb = embedder.embed(crops)
    return emb, len(crops) / (time.perf_counter() - start)


def measure(model: str | Path = DEFAULT_MODEL, bin_path: str | Path = DEFAULT_BIN, *,
            preprocess: Preprocess | None = None, limit_pairs: int | None = None, threads: int = 1,
            keep: str | Path | None = None, progress: bool = True, variants=VARIANTS,
            calib: str | Path | None = DEFAULT_CALIB, calib_limit: int = 256) -> Measurement:
    """Convert `model` to each variant (in `keep`, else a temporary folder), embed the set with all of
    them and score each; the fp32 model's best threshold is applied to every variant."""
    model, bin_path = Path(model), Path(bin_path)
    preprocess = preprocess or Preprocess(color="rgb", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    pairs = load_pairs(get_protocol("lfw"), bin_path, progress=progress)
    chosen = select_pairs(pairs.issame, limit_pairs)
    issame = pairs.issame[chosen]
    images = np.stack([2 * chosen, 2 * chosen + 1], axis=1).ravel()  # rows 2k, 2k+1: pair k
    distinct, row = np.unique(pairs.inverse[images], return_inverse=True)  # equal images embedded once
    crops = pairs.read(pairs.first[distinct])

    with tempfile.TemporaryDirectory(prefix="variant_accuracy.") as tmp:
        folder = Path(keep) if keep is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        faces = calibration_images(calib, limit=calib_limit) if "int8-static" in variants else None
        paths = {"fp32": model, **{kind: convert_variant(model, folder / f"{model.stem}.{kind}.onnx", kind,
                                                         calib_images=faces, preprocess=preprocess)
                                   for kind in variants}}
        embedded = {name: _embed(path, crops, preprocess, threads, progress) for name, path in paths.items()}
        sizes = {name: path.stat().st_size for name, path in paths.items()}

    reference = embedded["fp32"][0]
    scores = {name: np.sum(emb[row][0::2].astype(np.float64) * emb[row][1::2], axis=1)
              for name, (emb, _) in embedded.items()}
    t_fp32 = best_threshold(scores["fp32"], issame).threshold
    results = []
    for name, (emb, speed) in embedded.items():
        cosine = np.sum(emb.astype(np.float64) * reference, axis=1)
        per_pair = emb[row]
        results.append(VariantResult(
            name=name, size_bytes=sizes[name],
            ten_fold=ten_fold(per_pair[0::2], per_pair[1::2], issame, n_folds=N_FOLDS),
            best=best_threshold(scores[name], issame),
            at_fp32_threshold=accuracy_at_threshold(scores[name], issame, t_fp32),
            cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()),
            images_per_s=speed, n_images=len(crops)))
    return Measurement(model, bin_path, preprocess, int(issame.size), threads, results)


def format_table(m: Measurement) -> str:
    ref = m.result("fp32")
    pre = m.preprocess
    lines = [
        f"{m.model.name} on {m.bin.name}: {m.n_pairs} pairs ({int(ref.n_images)} distinct images), flip-sum, "
        f"preprocess {pre.color} mean {pre.mean} std {pre.std}; onnxruntime CPU, {m.threads} thread(s)",
        f"fp32 best single threshold t = {ref.best.threshold:.4f} (applied to every variant in 'acc @ fp32 t')",
        "",
        "| variant | file MB | 10-fold acc % | Δ 10-fold | best acc % (t) | acc @ fp32 t % | Δ @ fp32 t "
        "| TAR / FAR @ fp32 t | cos vs fp32 mean (min) | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in m.results:
        at = r.at_fp32_threshold
        lines.append(
            f"| {r.name} | {r.size_bytes / 1e6:.2f} | {100 * r.ten_fold.accuracy:.2f} ± {100 * r.ten_fold.std:.2f} "
            f"| {100 * (r.ten_fold.accuracy - ref.ten_fold.accuracy):+.2f} "
            f"| {100 * r.best.accuracy:.2f} ({r.best.threshold:.4f}) | {100 * at.accuracy:.2f} "
            f"| {100 * (at.accuracy - ref.at_fp32_threshold.accuracy):+.2f} "
            f"| {100 * at.tar:.2f} / {100 * at.far:.2f} "
            f"| {r.cosine_mean:.5f} ({r.cosine_min:.4f}) | {r.images_per_s:.1f} |")
    return "\n".join(lines)


def _channels(text: str) -> float | tuple[float, float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: one number or three, comma-separated")
    return values[0] if len(values) == 1 else values


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="fp32 ONNX model")
    ap.add_argument("--bin", type=Path, default=DEFAULT_BIN, help="verification .bin (10 folds)")
    ap.add_argument("--mean", type=_channels, default=IMAGENET_MEAN, help="one value or R,G,B (model's order)")
    ap.add_argument("--std", type=_channels, default=IMAGENET_STD, help="one value or R,G,B (model's order)")
    ap.add_argument("--color", choices=("rgb", "bgr"), default="rgb")
    ap.add_argument("--limit-pairs", type=int, default=None, help="score N pairs (N/10 per fold, balanced)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--keep", type=Path, default=None, help="write the variants here instead of a temp folder")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--calib-images", type=Path, default=DEFAULT_CALIB, help="int8-static: aligned crops (folder/.bin)")
    ap.add_argument("--calib-limit", type=int, default=256)
    args = ap.parse_args(argv)
    m = measure(args.model, args.bin, preprocess=Preprocess(color=args.color, mean=args.mean, std=args.std),
                limit_pairs=args.limit_pairs, threads=args.threads, keep=args.keep, variants=args.variants,
                calib=args.calib_images, calib_limit=args.calib_limit)
    print(format_table(m))


if __name__ == "__main__":
    main()

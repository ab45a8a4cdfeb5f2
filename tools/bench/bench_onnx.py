"""Inference throughput, onnxruntime vs torch eager, on facebce's own ONNX export (images/s).

Each backbone is exported with `export_onnx` (random weights: speed does not depend on them) and
both runtimes get the same float32 NCHW blob and the same thread count. Timed: the forward pass
only (no decoding or preprocessing); median of `--repeats` runs after one warm-up.

Usage: python tools/bench/bench_onnx.py [--models r50 mbf] [--batches 1 32] [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from facebce.deploy import export_onnx  # noqa: E402
from facebce.models import build_backbone  # noqa: E402
from timing import median_seconds  # noqa: E402  (tools/bench/timing.py)


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["r50", "mbf"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__} eager vs onnxruntime {ort.__version__} (CPU), threads={args.threads}, "
          f"median of {args.repeats}, images/s")
    print(f"{'model':6s} {'batch':>5s} {'torch':>9s} {'ort':>9s} {'ort/torch':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = build_backbone(name).eval()
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(model, path, check=False)
            session = ort_session(path, args.threads)
            for batch in args.batches:
                x = np.random.default_rng(0).uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32)
                xt = torch.from_numpy(x)
                with torch.inference_mode():
                    t_torch = median_seconds(lambda: model(xt), args.repeats)
                t_ort = median_seconds(lambda: session.run(None, {"data": x}), args.repeats)
                print(f"{name:6s} {batch:5d} {batch / t_torch:9.1f} {batch / t_ort:9.1f} {t_torch / t_ort:9.2f}",
                      flush=True)


if __name__ == "__main__":
    main()

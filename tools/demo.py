"""`make demo`: the whole facebce path on built-in synthetic faces, each step printing what it did.

Today: synthetic identities -> image folder -> MS1M-style .rec pack -> read back through a
2-worker DataLoader -> a backbone embeds a batch -> held-out verification pairs (.bin) scored at
one global threshold. Training, ONNX export and the FAISS gallery join as they land.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from facebce.data import RecDataset
from facebce.data.tools import synthesize
from facebce.data.verification_bin import load_bin
from facebce.eval import best_threshold
from facebce.models import build_backbone
from facebce.models.embedder import TorchEmbedder


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--identities", type=int, default=40)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--arch", default="mbf")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)

    t = step("1. synthetic identities -> image folder -> .rec pack, held-out pairs -> .bin")
    print(synthesize(out / "synth", identities=args.identities, images=args.images, seed=0,
                     rec=True, pairs=400, pair_identities=20))
    print(f"   ({time.perf_counter() - t:.1f} s)")

    t = step("2. read the pack back (pure-Python RecordIO, 2 DataLoader workers)")
    ds = RecDataset(out / "synth" / "rec", train=True)
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=2)
    n = 0
    for images, labels in loader:
        n += len(images)
    dt = time.perf_counter() - t
    print(f"   {len(ds)} images, {ds.num_classes} classes, batches of {tuple(images.shape)}; "
          f"{n / dt:.0f} images/s including worker start-up")

    t = step(f"3. backbone {args.arch}: embed a batch (eval mode)")
    model = build_backbone(args.arch).eval()
    with torch.inference_mode():
        emb = model(images[:32])
    print(f"   {sum(p.numel() for p in model.parameters()):,} parameters; embeddings {tuple(emb.shape)}, "
          f"mean L2 norm {emb.norm(dim=1).mean():.3g} ({time.perf_counter() - t:.1f} s)")

    t = step("4. held-out verification pairs at one global threshold (untrained network: near chance)")
    vs = load_bin(out / "synth" / "pairs.bin")
    rgb = vs.decode(progress=False)
    e = TorchEmbedder(model, flip=True).embed(np.ascontiguousarray(rgb[..., ::-1]))  # embedders take BGR
    scores = np.sum(e[0::2] * e[1::2], axis=1)
    r = best_threshold(scores, vs.issame)
    print(f"   {vs.num_pairs} pairs: best single-threshold accuracy {r.accuracy:.3f} at cos > {r.threshold:.3f} "
          f"(TAR {r.tar:.3f}, FAR {r.far:.3f}) ({time.perf_counter() - t:.1f} s)")
    print(f"\ndemo finished: outputs in {out}/")


if __name__ == "__main__":
    main()

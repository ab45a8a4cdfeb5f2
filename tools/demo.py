"""`make demo`: the whole facebce path on built-in synthetic faces, each step printing what it did.

synthetic identities -> MS1M-style .rec pack -> read back through a 2-worker DataLoader ->
train a small MobileFaceNet with BCE-U (recipes/demo_synthetic.yaml) -> evaluate on pairs of
identities it never saw, at one global threshold and at its learned threshold -> export ONNX ->
enrol a FAISS gallery and search it with open-set rejection. Steps 4-7 are the `facebce`
commands a user would type; the demo prints each one before running it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from facebce.cli import main as facebce
from facebce.data import RecDataset
from facebce.data.tools import synthesize

RECIPE = "demo_synthetic"  # a shipped recipe, by name (recipes/demo_synthetic.yaml in a checkout)


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run(*argv: str) -> None:
    print("$ facebce " + " ".join(shlex.quote(a) for a in argv), flush=True)
    if facebce(list(argv)) != 0:
        sys.exit(f"demo: 'facebce {argv[0]}' failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo_out")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    started = time.perf_counter()

    t = step("1. synthetic identities -> image folder -> MS1M-style .rec pack")
    print(synthesize(out / "synth", identities=40, images=5, seed=0, rec=True))
    print(f"   ({time.perf_counter() - t:.1f} s)")

    t = step("2. read the pack back (pure-Python RecordIO, 2 DataLoader workers)")
    ds = RecDataset(out / "synth" / "rec", train=True)
    n = sum(len(images) for images, _ in DataLoader(ds, batch_size=50, shuffle=True, num_workers=2))
    print(f"   {n} images of {ds.num_classes} classes read back as {tuple(ds[0][0].shape)} tensors "
          f"({time.perf_counter() - t:.1f} s)")

    step("3. train mbf + bce_u_norm on 100 synthetic identities (held-out pairs of 50 others)")
    run_dir = out / "run"
    run("train", RECIPE, "--out", str(run_dir))

    step("4. evaluate on the held-out identities: 10-fold, best single threshold, and the learned threshold b/γ")
    pairs = run_dir / "heldout_pairs.bin"
    run("eval", str(run_dir), f"custom_bin={pairs}", "--out", str(out / "report"))
    run("eval", str(run_dir), f"custom_bin={pairs}", "--threshold", "bias")

    step("5. export to ONNX (parity-checked against PyTorch), recommending the pair threshold calibrated in step 4")
    # b/γ thresholds embedding-vs-class-centre scores; a gallery compares embeddings with
    # embeddings, so the deployed threshold is the one fitted on held-out pairs (the head and its
    # learned bias are recorded in the metadata as well).
    calibrated = json.loads((out / "report" / "report.json").read_text())["threshold"]["value"]
    run("export", str(run_dir), str(out / "model.onnx"), "--threshold", f"{calibrated:.4f}")

    step("6. enrol identities in a FAISS gallery, then search known and never-enrolled faces")
    synthesize(out / "people", identities=8, images=2, seed=7, first_identity=5000)
    enrol, probes = out / "enrol", out / "probes"
    for person in sorted((out / "people" / "images").iterdir()):
        first, second = sorted(person.iterdir())
        if person.name < "id_0006":  # six people are enrolled; two never are
            (enrol / person.name).mkdir(parents=True)
            shutil.copy(first, enrol / person.name / first.name)
        probes.mkdir(exist_ok=True)
        shutil.copy(second, probes / f"{person.name}.jpg")
    gallery = str(out / "gallery.faiss")
    run("gallery", "build", gallery, str(enrol), "--model", str(out / "model.onnx"))
    run("gallery", "search", gallery, *sorted(map(str, probes.iterdir())), "--model", str(out / "model.onnx"),
        "-k", "2")

    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s: outputs in {out}/ "
          f"(report/report.md and plots, model.onnx, gallery.faiss)")


if __name__ == "__main__":
    main()

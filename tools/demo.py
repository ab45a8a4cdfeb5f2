"""`make demo`: the whole facebce path on built-in synthetic faces, each step printing what it did.

synthetic identities -> MS1M-style .rec pack -> read back through a 2-worker DataLoader ->
train a small MobileFaceNet with BCE-U (recipes/demo_synthetic.yaml) -> evaluate on pairs of
identities it never saw, at one global threshold and at its learned threshold -> calibrate the
deployed threshold at a target false-accept rate -> export ONNX with it -> enrol a FAISS gallery
and search it with open-set rejection. Steps 3-7 are the `facebce` commands a user would type;
the demo prints each one before running it.
"""
from __future__ import annotations

import argparse
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
TARGET_FAR = 0.01  # 2 of the held-out set's 200 impostor pairs


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

    step(f"5. calibrate the deployed threshold at a target FAR of {TARGET_FAR:g} on the held-out pairs, with its "
         f"bootstrap interval")
    # b/γ thresholds embedding-vs-class-centre scores and step 4's best-accuracy threshold lets
    # through whatever share of impostors maximises accuracy; a gallery that must say UNKNOWN to
    # strangers wants the threshold at a false-accept rate chosen in advance, as an artifact
    # (calib.json) checked against the model it was measured on.
    calib = out / "calib.json"
    run("calibrate", str(run_dir), f"custom_bin={pairs}", "--target-far", f"{TARGET_FAR:g}", "--out", str(calib))

    step("6. export to ONNX (parity-checked against PyTorch), recording the calibrated pair threshold")
    run("export", str(run_dir), str(out / "model.onnx"), "--threshold", f"calibrated:{calib}")

    step("7. enrol identities in a FAISS gallery, then search known and never-enrolled faces")
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
          f"(report/report.md and plots, calib.json, model.onnx, gallery.faiss)")


if __name__ == "__main__":
    main()

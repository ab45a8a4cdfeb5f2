"""IJB-C-sized scoring: facebce's template pooling + pair scoring + TAR@FAR vs eval_ijbc.py's own code.

Synthetic per-image features stand in for a model (scoring does not care where features come from):
`--images` rows in `--templates` templates of `--subjects` people, several media per template,
`--pairs` template pairs of which `--genuine` are genuine. Defaults are IJB-C's sizes (469,375 images,
23,124 templates, 15,658,489 pairs, 19,557 genuine; D = 512) and its layout (`--layout ijbc`): one
enrolment template per subject (3,531), the other 19,593 templates verification templates, every pair
one of each. `--layout random` pairs any two templates (the whole Gram triangle is then needed).
The "plain" column runs the transcription of eval_ijbc.py in tests/eval/reference_eval_ijbc.py: a
Python loop per template, pairs gathered and multiplied in chunks of 100,000, sklearn roc_curve +
nearest-FPR reading.
Both must print the same TAR@FAR row. `--rounds N` runs the two N times, interleaved, and reports
each stage's median (a shared machine's load moves both alike within a round).

Usage: python tools/bench/bench_ijb.py [--images 469375] [--templates 23124] [--pairs 15658489]
       [--genuine 19557] [--subjects 3531] [--dim 512] [--signal 0.1] [--seed 0] [--skip-plain]
       [--precision float32|float64] [--rounds 1] [--layout ijbc|random]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import numpy as np  # noqa: E402

from facebce.eval.ijb import image_features, pair_scores, template_features  # noqa: E402
from facebce.eval.roc import FAR_TARGETS, Roc  # noqa: E402
from tests.eval import reference_eval_ijbc as ref  # noqa: E402


def synthetic_ijb(args) -> dict:
    """Image features (images, 2, dim) with a subject signal, template/media ids, scores, pairs, labels."""
    rng = np.random.default_rng(args.seed)
    template_subject = rng.integers(0, args.subjects, args.templates)
    ijbc = getattr(args, "layout", "ijbc") == "ijbc"
    if ijbc:  # the first `subjects` templates: one enrolment template per subject
        template_subject[: args.subjects] = np.arange(args.subjects)
    templates = np.sort(rng.integers(0, args.templates, args.images))  # ~images/templates rows each
    templates[: args.templates] = np.arange(args.templates)  # every template has an image
    medias = templates * 8 + rng.integers(0, 8, args.images)  # a few media per template, some with many frames
    centre = rng.normal(size=(args.subjects, args.dim)).astype(np.float32)
    raw = np.empty((args.images, 2, args.dim), np.float32)
    for s in range(0, args.images, 50_000):  # in slices: keeps the float64 temporaries small
        rows = slice(s, s + 50_000)
        signal = centre[template_subject[templates[rows]]] * np.float32(args.signal)
        raw[rows, 0] = signal + rng.standard_normal((len(signal), args.dim), np.float32)
        raw[rows, 1] = signal + rng.standard_normal((len(signal), args.dim), np.float32)
    template_ids = np.unique(templates) * 3 + 1  # sparse ids, as in the real files
    templates = templates * 3 + 1
    if ijbc:
        pairs, labels = _ijbc_pairs(args, rng, template_subject)
        order = rng.permutation(len(pairs))
        return {"raw": raw, "face_scores": rng.uniform(0.5, 1.0, args.images).astype(np.float32),
                "templates": templates, "medias": medias, "pairs": template_ids[pairs[order]],
                "labels": labels[order]}
    by_subject = np.argsort(template_subject, kind="stable")
    start = np.searchsorted(template_subject[by_subject], np.arange(args.subjects))
    size = np.diff(np.r_[start, args.templates])
    owner = rng.choice(np.flatnonzero(size >= 2), args.genuine)
    a = rng.integers(0, size[owner])
    b = (a + rng.integers(1, size[owner])) % size[owner]
    genuine = np.stack([by_subject[start[owner] + a], by_subject[start[owner] + b]], 1)
    impostor = rng.integers(0, args.templates, (args.pairs - args.genuine, 2))
    while (same := template_subject[impostor[:, 0]] == template_subject[impostor[:, 1]]).any():
        impostor[same, 1] = rng.integers(0, args.templates, int(same.sum()))
    pairs = np.concatenate([genuine, impostor])
    labels = np.r_[np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]
    order = rng.permutation(len(pairs))
    return {"raw": raw, "face_scores": rng.uniform(0.5, 1.0, args.images).astype(np.float32),
            "templates": templates, "medias": medias, "pairs": template_ids[pairs[order]], "labels": labels[order]}


def _ijbc_pairs(args, rng, template_subject: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IJB-C's 1:1 layout: the first `subjects` templates are enrolment templates, one per subject
    (template_subject[t] == t, as synthetic_ijb drew them); the rest are verification templates. Each pair is
    (enrolment, verification): `genuine` verification templates against their subject's enrolment
    template, the other pairs against a random other subject's."""
    s = args.subjects
    verif = np.arange(s, args.templates)
    chosen = rng.choice(verif, min(args.genuine, len(verif)), replace=False)
    genuine = np.stack([template_subject[chosen], chosen], 1)
    impostor = np.stack([rng.integers(0, s, args.pairs - len(genuine)),
                         rng.choice(verif, args.pairs - len(genuine))], 1)
    while (same := impostor[:, 0] == template_subject[impostor[:, 1]]).any():
        impostor[same, 0] = rng.integers(0, s, int(same.sum()))
    pairs = np.concatenate([genuine, impostor])
    return pairs, np.r_[np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]


def run_facebce(d: dict, precision: str = "float32") -> tuple[dict, np.ndarray, np.ndarray]:
    times = {}
    t = time.perf_counter()
    tids, tfeats = template_features(image_features(d["raw"], d["face_scores"]), d["templates"], d["medias"])
    times["templates"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = pair_scores(tids, tfeats, d["pairs"], precision=precision, progress=False)
    times["pairs"] = time.perf_counter() - t
    t = time.perf_counter()
    tar = Roc.from_labels(scores, d["labels"]).tar_at_far(FAR_TARGETS, "insightface").tar
    times["tar@far"] = time.perf_counter() - t
    return times, tar, scores


def run_plain(d: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    times = {}
    t = time.perf_counter()
    feats = ref.step3_image_features(d["raw"].reshape(len(d["raw"]), -1), d["face_scores"])
    tfeats, tids = ref.image2template_feature(feats, d["templates"], d["medias"])
    times["templates"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = ref.verification(tfeats, tids, d["pairs"][:, 0], d["pairs"][:, 1])
    times["pairs"] = time.perf_counter() - t
    t = time.perf_counter()
    tar = ref.tpr_at_fpr_table(d["labels"].astype(int), scores)
    times["tar@far"] = time.perf_counter() - t
    return times, tar, scores


def interleaved(d: dict, rounds: int, precision: str = "float32", plain: bool = True) -> dict:
    """{name: (median stage times, TAR@FAR, scores)} over `rounds` rounds of facebce then plain."""
    results = {"facebce": [], "plain (eval_ijbc.py)": []}
    for _ in range(max(1, rounds)):
        results["facebce"].append(run_facebce(d, precision))
        if plain:
            results["plain (eval_ijbc.py)"].append(run_plain(d))
    out = {}
    for name, runs in results.items():
        if runs:
            times = {k: float(np.median([r[0][k] for r in runs])) for k in runs[0][0]}
            out[name] = (times, runs[-1][1], runs[-1][2])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=469_375)
    ap.add_argument("--templates", type=int, default=23_124)
    ap.add_argument("--pairs", type=int, default=15_658_489)
    ap.add_argument("--genuine", type=int, default=19_557)
    ap.add_argument("--subjects", type=int, default=3_531)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--signal", type=float, default=0.1, help="subject signal vs unit image noise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layout", choices=("ijbc", "random"), default="ijbc",
                    help="pairs as IJB-C's (enrolment x verification templates) or between any two templates")
    ap.add_argument("--skip-plain", action="store_true", help="time facebce only (the plain loop is slow)")
    ap.add_argument("--precision", choices=("float32", "float64"), default="float32", help="facebce's pair scores")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; stage times are medians")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    d = synthetic_ijb(args)
    print(f"synthetic IJB: {len(d['raw']):,} images, {np.unique(d['templates']).size:,} templates, "
          f"{len(d['pairs']):,} pairs ({int(d['labels'].sum()):,} genuine), D={args.dim} "
          f"[made in {time.perf_counter() - t:.1f} s]")
    runs = interleaved(d, args.rounds, args.precision, plain=not args.skip_plain)
    stages = ["templates", "pairs", "tar@far"]
    print(f"\n{'implementation':22}" + "".join(f"{s + ' s':>12}" for s in stages) + f"{'total s':>12}")
    for name, (times, _, _) in runs.items():
        print(f"{name:22}" + "".join(f"{times[s]:12.2f}" for s in stages) + f"{sum(times.values()):12.2f}")
    print("\nTAR@FAR (mode insightface = eval_ijbc.py's table, x100)")
    print(f"{'implementation':22}" + "".join(f"{f:>9.0e}" for f in FAR_TARGETS))
    for name, (_, tar, _) in runs.items():
        print(f"{name:22}" + "".join(f"{100 * x:9.2f}" for x in tar))
    if len(runs) == 2:
        (_, tar_a, s_a), (_, tar_b, s_b) = runs.values()
        print(f"\nidentical TAR@FAR: {np.array_equal(tar_a, tar_b)}; "
              f"max |score difference| {np.max(np.abs(s_a - s_b)):.2e}")


if __name__ == "__main__":
    main()

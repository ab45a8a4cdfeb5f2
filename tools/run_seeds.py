#!/usr/bin/env python3
"""Train recipes over several seeds and tabulate mean ± std of what each run measured at its end.

    python tools/run_seeds.py recipes/celeba_*.yaml --seeds 1 2 3 --out runs/celeba --parallel 2

Each (recipe, seed) is one `facebce train RECIPE --set seed=S --set checkpoint.dir=OUT/<recipe>/seed<S>`
in its own process (its log in `train.log` there); `--parallel` runs that many at once, each with
`--threads` torch threads (default: the cores shared out). A run whose `results.json` exists is not
trained again, and an interrupted one resumes from its last checkpoint, so re-running the same
command completes a sweep. The table (`summary.md`, `summary.json` in OUT) has per recipe: the
head, the number of seeds, and for every figure in the runs' `results.json` mean ± sample std
(ddof 1) over seeds: pair verification per .bin set (10-fold, best single threshold, accuracy at
the learned threshold) and the closed-set val (SW/Uni accuracy, t*, learned bias, bias − t*).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (results.json path, column title, scale): scale 100 shows accuracies in percent
VERIFY_COLUMNS = [("acc", "10-fold %", 100), ("best_acc", "best single-threshold %", 100),
                  ("best_threshold", "best t", 1), ("learned_acc", "acc at learned threshold %", 100),
                  ("learned_far", "FAR at learned threshold %", 100)]
VAL_COLUMNS = [("sw_acc", "SW acc %", 100), ("uni_acc", "Uni acc %", 100), ("t_star", "t*", 1),
               ("bias", "learned b/γ", 1), ("bias_gap", "b/γ − t*", 1)]
TOP_COLUMNS = [("threshold", "learned threshold", 1)]


def run_one(recipe: Path, seed: int, out: Path, threads: int, overrides: list[str]) -> tuple[Path, float, str]:
    run_dir = out / recipe.stem / f"seed{seed}"
    if (run_dir / "results.json").is_file():
        return run_dir, 0.0, "done before"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "facebce.cli", "train", str(recipe), "--set", f"seed={seed}",
           "--set", f"checkpoint.dir={run_dir}", "--set", f"num_threads={threads}", "--set", "log.progress=false",
           *[a for o in overrides for a in ("--set", o)]]
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        cmd.append("--resume")
    start = time.perf_counter()
    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())
    seconds = time.perf_counter() - start
    if rc != 0 or not (run_dir / "results.json").is_file():
        return run_dir, seconds, f"FAILED (exit {rc}; see {run_dir / 'train.log'})"
    return run_dir, seconds, "ok"


def fmt(values: list[float], scale: float) -> str:
    v = np.asarray([x for x in values if x is not None], np.float64) * scale
    if v.size == 0:
        return "—"
    digits = 2 if scale == 100 else 3
    if v.size == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def summarise(out: Path, recipes: list[Path], seeds: list[int]) -> tuple[dict, str]:
    summary: dict = {"seeds": seeds, "recipes": {}}
    lines: list[str] = []
    sets: list[str] = []
    for recipe in recipes:
        runs = []
        for seed in seeds:
            f = out / recipe.stem / f"seed{seed}" / "results.json"
            if f.is_file():
                runs.append(json.loads(f.read_text()))
        config = out / recipe.stem / f"seed{seeds[0]}" / "config.yaml"
        head = _head_of(config)
        summary["recipes"][recipe.stem] = {"head": head, "runs": runs}
        for r in runs:
            sets += [s for s in r.get("verification", {}) if s not in sets]
    for name in sets:
        lines += [f"### {name} (pair verification; mean ± std over seeds)", "",
                  "| recipe | head | seeds | " + " | ".join(t for _, t, _ in VERIFY_COLUMNS + TOP_COLUMNS) + " |",
                  "|---|---|---|" + "---|" * (len(VERIFY_COLUMNS) + len(TOP_COLUMNS))]
        for stem, rec in summary["recipes"].items():
            runs = [r for r in rec["runs"] if name in r.get("verification", {})]
            if not runs:
                continue
            cells = [fmt([r["verification"][name].get(k) for r in runs], s) for k, _, s in VERIFY_COLUMNS]
            cells += [fmt([r.get(k) for r in runs], s) for k, _, s in TOP_COLUMNS]
            lines.append(f"| {stem} | {rec['head']} | {len(runs)} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(r.get("val") for rec in summary["recipes"].values() for r in rec["runs"]):
        lines += ["### closed-set val (held-out images of the training identities; mean ± std over seeds)", "",
                  "| recipe | head | seeds | " + " | ".join(t for _, t, _ in VAL_COLUMNS) + " |",
                  "|---|---|---|" + "---|" * len(VAL_COLUMNS)]
        for stem, rec in summary["recipes"].items():
            runs = [r for r in rec["runs"] if r.get("val")]
            if runs:
                cells = [fmt([r["val"].get(k) for r in runs], s) for k, _, s in VAL_COLUMNS]
                lines.append(f"| {stem} | {rec['head']} | {len(runs)} | " + " | ".join(cells) + " |")
        lines.append("")
    return summary, "\n".join(lines)


def _head_of(config: Path) -> str:
    if not config.is_file():
        return "?"
    import yaml

    head = yaml.safe_load(config.read_text()).get("head", {})
    extra = f"+{head['margin']} m={head.get('m')}" if head.get("margin") else ""
    return f"{head.get('name')}{extra} s={head.get('scale')}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="+", type=Path)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--out", type=Path, required=True, help="sweep folder: OUT/<recipe>/seed<S>/ per run")
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / parallel)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every run (repeatable)")
    ap.add_argument("--summary-only", action="store_true", help="tabulate what has finished; train nothing")
    args = ap.parse_args(argv)
    for r in args.recipes:
        if not r.is_file():
            print(f"error: {r}: no such recipe", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.parallel))
    jobs = [(r, s) for s in args.seeds for r in args.recipes]  # seed-major: every recipe gets seed 1 first
    failed = 0
    if not args.summary_only:
        print(f"{len(jobs)} runs ({len(args.recipes)} recipes x seeds {args.seeds}), {args.parallel} at a time, "
              f"{threads} thread(s) each, in {args.out}", flush=True)
        sweep_start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            futures = [pool.submit(run_one, r, s, args.out, threads, args.overrides) for r, s in jobs]
            for k, fut in enumerate(futures, 1):
                run_dir, seconds, status = fut.result()
                failed += status.startswith("FAILED")
                print(f"[{k}/{len(jobs)}] {run_dir}: {status} ({seconds:.0f} s; sweep "
                      f"{time.perf_counter() - sweep_start:.0f} s)", flush=True)
    summary, table = summarise(args.out, args.recipes, args.seeds)
    write_atomic(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(args.out / "summary.md", table + "\n")
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

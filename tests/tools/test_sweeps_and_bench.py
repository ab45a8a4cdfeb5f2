"""tools/run_seeds.py's table and tools/bench/suite.py's report (a quick run of the eval area)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests.tools.loading import REPO
from tests.tools.loading import load_tool as _load


def test_run_seeds_tabulates_mean_and_sample_std(tmp_path):
    rs = _load(REPO / "tools" / "run_seeds.py")
    recipe = tmp_path / "r_bce.yaml"
    recipe.write_text("head: {name: bce_u_norm}\n")
    accs = [0.70, 0.74, 0.75]
    for seed, acc in zip((1, 2, 3), accs):
        run = tmp_path / "out" / "r_bce" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"head": {"name": "bce_u_norm", "scale": 32}}))
        (run / "results.json").write_text(json.dumps({
            "threshold": 0.3, "verification": {"lfw": {"acc": acc, "best_acc": acc + 0.01, "learned_acc": acc - 0.02}},
            "val": {"sw_acc": 0.9, "uni_acc": 0.8, "t_star": 0.31, "bias": 0.3, "bias_gap": -0.01}}))
    summary, table = rs.summarise(tmp_path / "out", [recipe], [1, 2, 3])
    want = f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f}"
    assert want in table and "bce_u_norm s=32" in table and "| 3 |" in table
    assert "-0.010 ± 0.000" in table  # bias - t* in the val table
    assert len(summary["recipes"]["r_bce"]["runs"]) == 3
    # a finished run is not trained again
    assert rs.run_one(recipe, 1, tmp_path / "out", 1, [])[2] == "done before"


def test_bench_suite_writes_its_table(tmp_path):
    suite = _load(REPO / "tools" / "bench" / "suite.py")
    assert suite.main(["--only", "eval", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["figure"]: r for r in doc["rows"]}
    lfw = rows["LFW 10-fold + VAL@FAR, 6000 pairs"]
    assert lfw["baseline"] > 0 and lfw["ratio"] == pytest.approx(lfw["facebce"] / lfw["baseline"])
    assert "identical accuracy and VAL" in lfw["note"]
    ijb = next(r for f, r in rows.items() if f.startswith("IJB-C-sized"))
    assert "identical TAR@FAR" in ijb["note"] and ijb["target"] == 10
    assert "| eval | LFW 10-fold" in (tmp_path / "bench.md").read_text()

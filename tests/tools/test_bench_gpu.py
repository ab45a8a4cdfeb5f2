"""tools/bench/bench_gpu.py: skips cleanly without CUDA; suite.py's gpu area turns its JSON into rows."""
from __future__ import annotations

import pytest
import torch

from tests.tools.loading import REPO
from tests.tools.loading import load_tool as _load


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the rows would run")
def test_bench_gpu_without_cuda_says_so_and_exits_0(tmp_path, capsys):
    bg = _load(REPO / "tools" / "bench" / "bench_gpu.py")
    assert bg.main(["--out", str(tmp_path / "gpu")]) == 0
    assert capsys.readouterr().out.strip() == "no CUDA device: GPU rows skipped"
    assert not (tmp_path / "gpu").exists()


def test_suite_gpu_rows_from_bench_gpu_json():
    suite = _load(REPO / "tools" / "bench" / "suite.py")
    doc = {"meta": {"peak_tflops": 1000.0},
           "rows": [{"row": "train r50 b128", "figure": "samples/s", "value": 4000.0, "unit": "samples/s"},
                    {"row": "train r50 b128", "figure": "MFU", "value": 20.0, "unit": "% of peak"},
                    {"row": "train r100 b128", "figure": "MFU", "value": 50.0, "unit": "% of peak"},
                    {"row": "compile r50 b128", "figure": "samples/s (torch.compile backbone)", "value": 5000.0,
                     "unit": "samples/s"}],
           "skipped": [{"row": "faiss-gpu", "why": "no wheel"}]}
    rows = {r.figure: r for r in suite.gpu_rows(doc)}
    mfu = rows["train r50 b128: MFU"]
    assert (mfu.facebce, mfu.baseline, mfu.ratio, mfu.target, mfu.meets) == (200.0, 1000.0, 0.2, 0.45, "no")
    assert rows["train r100 b128: MFU"].target is None and rows["train r100 b128: MFU"].meets == ""
    assert rows["compile r50 b128"].ratio == pytest.approx(1.25)
    assert rows["faiss-gpu"].facebce is None and "no wheel" in rows["faiss-gpu"].note
    table = suite.table(list(rows.values()))
    assert "| 20% | ≥ 45% | no |" in table and "skipped: no wheel" in table

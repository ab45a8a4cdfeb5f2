"""Two gloo processes (torchrun's environment variables) with DDP + Partial-FC, then resume on one."""
from __future__ import annotations

import json

import pytest
import torch

from facebce.train import load_checkpoint, train
from tests.train.helpers import run_two_ranks, tiny_config

_WORKER = r"""
import sys
from pathlib import Path
from facebce.train import train
from tests.train.helpers import tiny_config
r = train(tiny_config(Path(sys.argv[1]), steps=2, head={"name": "bce_u_norm", "sample_rate": 0.5},
                      checkpoint={"every_steps": 0}))
print("RESULT", r.steps, r.threshold, r.loss)
"""


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_two_process_gloo_then_resume_on_one(tmp_path):
    results = run_two_ranks(_WORKER, tmp_path)
    assert len(results) == 2 and results[0] == results[1]  # same loss (all-reduced) and replicated threshold
    ck = load_checkpoint(tmp_path / "checkpoints" / "step_00000002.pt")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert ck["head"]["weight"].shape == (12, 16)  # both shards (6 + 6 rows) gathered
    assert ck["optimizer"]["head.weight"]["momentum_buffer"].shape == (12, 16)
    assert ck["epoch_samples"] == 2 * 2 * 4  # 2 steps x 2 processes x batch 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]

    # one process continues the two-process run: the head rows are re-split (here: all on one rank)
    result = train(tiny_config(tmp_path, steps=3, head={"name": "bce_u_norm", "sample_rate": 0.5},
                               checkpoint={"every_steps": 0}), resume=True)
    assert result.steps == 3
    final = load_checkpoint(tmp_path / "checkpoints" / "step_00000003.pt")
    assert final["world_size"] == 1 and final["epoch_samples"] == 16 + 4
    assert torch.isfinite(final["head"]["weight"]).all()
    assert not torch.equal(final["head"]["weight"], ck["head"]["weight"])

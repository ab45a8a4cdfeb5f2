"""Two gloo processes (torchrun's environment variables) with DDP + Partial-FC, then resume on one."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from facebce.train import load_checkpoint, train
from tests.train.helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]

_WORKER = r"""
import sys
from pathlib import Path
from facebce.train import train
from tests.train.helpers import tiny_config
r = train(tiny_config(Path(sys.argv[1]), steps=2, head={"name": "bce_u_norm", "sample_rate": 0.5},
                      checkpoint={"every_steps": 0}))
print("RESULT", r.steps, r.threshold, r.loss)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_two_process_gloo_then_resume_on_one(tmp_path):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=200)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [line.split() for out in outs for line in out.splitlines() if line.startswith("RESULT")]
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

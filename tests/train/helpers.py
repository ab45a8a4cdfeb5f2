"""Tiny training configs shared by the train tests (mbf, 16-d embeddings, batch 4, a dozen identities),
and a launcher for two gloo ranks."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from facebce.train import load_config
from facebce.train.config import merge


def tiny(run_dir: Path, **over) -> dict:
    cfg = {
        "steps": 4, "seed": 3, "deterministic": True, "num_threads": 1,
        "model": {"arch": "mbf", "embedding_size": 16},
        "data": {"kind": "synthetic", "batch_size": 4, "num_workers": 0,
                 "synthetic": {"identities": 12, "images": 2, "difficulty": 0.5}},
        "head": {"name": "bce_u_norm", "sample_rate": 0.5},
        "optim": {"lr": 0.05, "warmup_steps": 1},
        "checkpoint": {"dir": str(run_dir), "every_steps": 2, "keep": 0},
        "verification": {"every_steps": 0},
        "log": {"every_steps": 1, "progress": False, "tensorboard": False},
    }
    return merge(cfg, over)


def tiny_config(run_dir: Path, overrides=(), **over):
    return load_config(data=tiny(run_dir, **over), overrides=list(overrides))


REPO = Path(__file__).resolve().parents[2]


def run_two_ranks(worker: str, run_dir: Path, timeout: float = 200) -> list[list[str]]:
    """Run the Python source `worker` (argv[1] = run_dir) as ranks 0 and 1 of a gloo group, with
    torchrun's environment variables on a free loopback port; each must exit 0. Returns the split
    `RESULT ...` lines both printed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", worker, str(run_dir)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [line.split() for out in outs for line in out.splitlines() if line.startswith("RESULT")]

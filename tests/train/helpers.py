"""Tiny training configs shared by the train tests (mbf, 16-d embeddings, batch 4, a dozen identities)."""
from __future__ import annotations

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

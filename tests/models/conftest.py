"""Fixtures for the backbone tests: the insightface state_dict manifests and a weight randomiser."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch


@pytest.fixture
def manifest(shared_spec: Path):
    """`manifest(name) -> (parameter_count, {key: shape})` from shared/spec/state_dicts/<name>.txt."""
    def read(name: str) -> tuple[int, dict[str, tuple[int, ...]]]:
        header, *rows = (shared_spec / "state_dicts" / f"{name}.txt").read_text().splitlines()
        count = int(re.search(r"(\d+) parameters", header).group(1))
        shapes = {}
        for row in filter(None, rows):
            key, shape = row.split("\t")
            shapes[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
        return count, shapes
    return read


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every float tensor of the state_dict (BN running stats included) with random values
    of a sane scale, so that parity tests exercise every weight and activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if t.dim() > 1:  # conv / linear weight: unit gain
                t.normal_(0, t[0].numel() ** -0.5, generator=g)
            elif key.endswith("running_var"):
                t.uniform_(0.5, 1.5, generator=g)
            elif key.endswith(("running_mean", "bias")):
                t.normal_(0, 0.1, generator=g)
            else:  # BN scale, PReLU slope
                t.uniform_(0.5, 1.0, generator=g)
    return model


@pytest.fixture
def randomise():
    return randomise_

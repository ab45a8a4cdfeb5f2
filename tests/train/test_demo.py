"""The demo recipe learns: held-out synthetic identities verified clearly above chance (minutes: slow)."""
from __future__ import annotations

from pathlib import Path

import pytest

from facebce.train import train_from_recipe

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo_synthetic.yaml"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_recipe_reaches_70_percent_on_heldout_identities(tmp_path):
    result = train_from_recipe(RECIPE, ["log.progress=false"], out_dir=tmp_path)
    heldout = result.verification["heldout"]
    assert heldout["acc"] >= 0.70, heldout
    assert heldout["learned_acc"] >= 0.65, heldout  # one global threshold learned in training, no tuning
    assert (tmp_path / "backbone.pth").is_file()

"""Fuzz: mutated copies of a real recipe (recipes/demo_synthetic.yaml + base.yaml) and of a real model card.

Each mutated input must either load or fail with one FacebceError line; any other exception (a
traceback for the user) fails the test. Seeded, so a failure reproduces; each loop stops after a fixed
number of cases or a few seconds, whichever comes first, so the default suite stays fast.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from facebce.errors import FacebceError
from facebce.eval.model_loading import ModelSpec, load_classifier
from facebce.models import build_backbone
from facebce.models.card import MODEL_CARD, ModelCard, read_model_card, write_model_card
from facebce.train.config import load_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SECONDS = 4.0  # per loop
CASES = 300

HOSTILE = [None, True, False, 0, -1, 1, 2**31, 2**63, 2**70, -(2**70), 0.5, -5.0, 1e308, float("inf"),
           float("-inf"), float("nan"), "", "abc", "1e-3", "\u00e9\u4e2d", "../../etc/passwd", [], [1, 2], ["a"],
           {}, {"x": 1}, {"blocks": "abc"}, [[1]], "2**70", ".inf"]


def _paths(tree, prefix=()):
    """Every key path of a nested dict (lists are leaves)."""
    for key, value in tree.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


def _set(tree, path, value):
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _delete(tree, path):
    node = tree
    for key in path[:-1]:
        node = node[key]
    node.pop(path[-1], None)


def _mutate_tree(tree: dict, rng: random.Random) -> dict:
    tree = json.loads(json.dumps(tree))  # deep copy (recipes and cards are JSON-able)
    for _ in range(rng.randint(1, 3)):
        paths = list(_paths(tree))
        if not paths:
            break
        path = rng.choice(paths)
        action = rng.random()
        if action < 0.7:
            _set(tree, path, rng.choice(HOSTILE))
        elif action < 0.85:
            _delete(tree, path)
        else:
            _set(tree, (*path[:-1], rng.choice(["unknown", "Seed", "0", "base"])), rng.choice(HOSTILE))
    return tree


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        action = rng.random()
        pos = rng.randrange(len(data) + 1)
        if action < 0.4 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif action < 0.6:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif action < 0.8:
            del data[pos:pos + rng.randint(1, 40)]
        else:
            data[pos:pos] = rng.choice([b"\xff\xfe", b": [", b"{", b"\t", b"&a *a", b"!!python/object:os.system"])
    return bytes(data)


def _outcome(fn, what: str) -> str:
    """'ok', or the FacebceError's text; anything else fails with the input that caused it."""
    try:
        fn()
        return "ok"
    except FacebceError as e:
        text = str(e)
        assert "\n" not in text and text.strip(), f"{what}: multi-line or empty error {text!r}"
        return text


def _yaml(tree) -> str:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


def _loop(seed: int, case) -> list[str]:
    rng, outcomes, start = random.Random(seed), [], time.monotonic()
    for i in range(CASES):
        if time.monotonic() - start > SECONDS and i >= 20:
            break
        outcomes.append(case(rng, i))
    return outcomes


@pytest.fixture
def recipe_dir(tmp_path):
    for name in ("demo_synthetic.yaml", "base.yaml"):
        shutil.copy(RECIPES / name, tmp_path / name)
    return tmp_path


def test_fuzz_recipe_values(recipe_dir):
    demo = yaml.safe_load((recipe_dir / "demo_synthetic.yaml").read_text())
    base_text = (recipe_dir / "base.yaml").read_bytes()
    base = yaml.safe_load(base_text)

    def case(rng, i):
        if rng.random() < 0.5:
            (recipe_dir / "demo_synthetic.yaml").write_text(_yaml(_mutate_tree(demo, rng)))
            (recipe_dir / "base.yaml").write_bytes(base_text)
        else:  # mutate the base the demo inherits from
            (recipe_dir / "demo_synthetic.yaml").write_text(_yaml(demo))
            mutated = _mutate_tree(base, rng)
            (recipe_dir / "base.yaml").write_text(_yaml(mutated))
        return _outcome(lambda: load_config(recipe_dir / "demo_synthetic.yaml"), f"recipe case {i}")

    outcomes = _loop(1, case)
    assert "ok" in outcomes and any(o != "ok" for o in outcomes)  # both paths were exercised


def test_fuzz_recipe_bytes(recipe_dir):
    demo_bytes = (recipe_dir / "demo_synthetic.yaml").read_bytes()

    def case(rng, i):
        (recipe_dir / "demo_synthetic.yaml").write_bytes(_mutate_bytes(demo_bytes, rng))
        return _outcome(lambda: load_config(recipe_dir / "demo_synthetic.yaml"), f"recipe bytes case {i}")

    outcomes = _loop(2, case)
    assert any(o != "ok" for o in outcomes)


def test_fuzz_overrides(recipe_dir):
    keys = ["epochs", "seed", "steps", "model.options.blocks", "model.options.scale", "head.scale", "optim.lr",
            "data.batch_size", "model.embedding_size", "head.name", "optim.betas", "amp", "data.synthetic.seed"]
    texts = ["abc", "-1", ".inf", "nan", "2**70", str(2**70), "[1, 2", "{a: 1}", "", "null", "-5", "1e400", "0"]

    def case(rng, i):
        sets = [f"{rng.choice(keys)}={rng.choice(texts)}" for _ in range(rng.randint(1, 2))]
        return _outcome(lambda: load_config(recipe_dir / "demo_synthetic.yaml", sets), f"--set {sets}")

    outcomes = _loop(3, case)
    assert any(o != "ok" for o in outcomes)


@pytest.fixture
def run_folder(tmp_path):
    """A model card written by the write function, beside real weights and class centres."""
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    torch.save(build_backbone("mbf", embedding_size=16, scale=1, blocks=[1, 1, 1, 1]).state_dict(),
               run / "backbone.pth")
    torch.save(torch.randn(4, 16), run / "centres.pth")
    write_model_card(run, ModelCard(arch="mbf", embedding_size=16, options={"scale": 1, "blocks": [1, 1, 1, 1]},
                                    head="bce_u_norm", bias=-9.6, threshold=0.3, steps=3, scores="cosine",
                                    num_classes=4, centres="centres.pth"))
    return run


def _use_card(run: Path) -> None:
    read_model_card(run)
    spec = ModelSpec(run)
    spec.backbone()
    assert isinstance(spec.learned_threshold, (float, type(None)))
    if read_model_card(run).centres:
        load_classifier(run)


def test_fuzz_model_card(run_folder):
    good = json.loads((run_folder / MODEL_CARD).read_text())
    good_bytes = (run_folder / MODEL_CARD).read_bytes()
    assert _outcome(lambda: _use_card(run_folder), "the real card") == "ok"

    def case(rng, i):
        if rng.random() < 0.75:
            (run_folder / MODEL_CARD).write_text(json.dumps(_mutate_tree(good, rng)))
        else:
            (run_folder / MODEL_CARD).write_bytes(_mutate_bytes(good_bytes, rng))
        return _outcome(lambda: _use_card(run_folder), f"card case {i}: {(run_folder / MODEL_CARD).read_bytes()!r}")

    outcomes = _loop(4, case)
    assert any(o != "ok" for o in outcomes) and any(MODEL_CARD in o for o in outcomes)

"""Recipe loading: base inheritance, --set overrides, errors that name the full key."""
from __future__ import annotations

from pathlib import Path

import pytest

from facebce.errors import ConfigError
from facebce.heads import PartialFC
from facebce.train import load_config, parse_override, save_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("optim.lr=fast", "optim.lr"),
    ("data.synthetic.identities=1.5", "data.synthetic.identities"),
    ("data.batch_size=true", "data.batch_size"),
    ("channels_last=1", "channels_last"),
    ("head.scal=64", "head.scal"),
    ("nosection.x=1", "nosection"),
    ("amp=fp8", "amp"),
    ("optim.name=lamb", "optim.name"),
    ("head.sample_rate=1.5", "head.sample_rate"),
    ("data.kind=rec", "data.path"),
    ("steps=0", "steps"),
])
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(data={"steps": 10}, overrides=[override])
    assert str(e.value).startswith(key + ":"), str(e.value)


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=1", "optim.lr=[1"])
def test_bad_set_syntax(bad):
    with pytest.raises(ConfigError, match="optim.lr|--set"):
        parse_override(bad) if "[" not in bad else load_config(data={"steps": 1}, overrides=[bad])


def test_steps_and_epochs():
    assert load_config(data={"epochs": 2}, overrides=["steps=5"]).epochs is None  # an override replaces the other
    with pytest.raises(ConfigError, match="^steps: set exactly one"):
        load_config(data={"steps": 10, "epochs": 3})


def test_set_values_are_yaml():
    cfg = load_config(data={"steps": 5}, overrides=["optim.grad_clip=null", "verification.bins=[a.bin, b.bin]",
                                                    "optim.lr=1e-3", "head.margin=cosface", "deterministic=true"])
    assert cfg.optim.grad_clip is None and cfg.verification.bins == ["a.bin", "b.bin"]
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.head.options == {"margin": "cosface"} and cfg.deterministic is True


def test_base_inheritance_and_head_switch(tmp_path):
    write(tmp_path / "base.yaml", "steps: 100\noptim: {lr: 0.1, momentum: 0.9}\n"
                                  "head: {name: bce_u_norm, scale: 32, bias_init: 5.0, sample_rate: 0.5}\n")
    write(tmp_path / "mid.yaml", "base: base.yaml\noptim: {lr: 0.02}\n")
    child = write(tmp_path / "child.yaml", "base: mid.yaml\nhead: {name: softmax_norm, margin: arcface}\n")
    cfg = load_config(child)
    assert cfg.optim.lr == 0.02 and cfg.optim.momentum == 0.9 and cfg.steps == 100
    # switching head drops the other head's options but keeps Partial-FC's sample_rate
    assert cfg.head.name == "softmax_norm" and cfg.head.options == {"margin": "arcface"}
    assert cfg.head.sample_rate == 0.5
    same = load_config(write(tmp_path / "same.yaml", "base: base.yaml\nhead: {scale: 48}\n"))
    assert same.head.options == {"scale": 48, "bias_init": 5.0}


def test_base_loop_and_missing(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="^base: .*loops"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="^base: .*not found"):
        load_config(write(tmp_path / "c.yaml", "base: nope.yaml\n"))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(data={"steps": 7, "head": {"name": "uce", "m": 0.3}}, overrides=["model.arch=mbf"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_loads_and_builds(recipe):
    cfg = load_config(RECIPES / recipe, ["data.path=/placeholder"] if recipe == "base.yaml" else [])
    assert cfg.model.embedding_size > 0
    PartialFC({"name": cfg.head.name, **cfg.head.options}, cfg.model.embedding_size, 50, cfg.head.sample_rate,
              neg_rescale=cfg.head.neg_rescale)

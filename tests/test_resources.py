"""facebce.resources: the shipped protocols and recipes are found in the package, recipes by name, and a
user recipe's `base:` beside it first, else the shipped one (issue 12)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from facebce.errors import ConfigError
from facebce.resources import recipe_path, resolve_base, shipped_dir, shipped_file, shipped_names
from facebce.train.config import load_config
from tests.conftest import REPO


def test_shipped_folders_are_the_documented_top_level_ones():
    for kind, top in (("protocols", "eval_protocols"), ("recipes", "recipes")):
        folder = shipped_dir(kind)
        assert folder.parent.name == "_shipped" and folder.parent.parent.name == "facebce"
        assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(p.name for p in (REPO / top).glob("*.yaml"))
    assert {"demo_synthetic", "base"} <= set(shipped_names("recipes"))
    assert {"lfw", "custom_bin"} <= set(shipped_names("protocols"))


def test_resources_imports_nothing_of_facebce_but_errors_and_fileio():
    tree = ast.parse(Path(__import__("facebce.resources").resources.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("facebce")} <= {"facebce.errors", "facebce.fileio"}


def test_recipe_by_name_or_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty folder: no recipes/ here
    shipped = shipped_file("recipes", "demo_synthetic")
    assert recipe_path("demo_synthetic") == recipe_path("demo_synthetic.yaml") == shipped
    assert load_config("demo_synthetic").model.arch == "mbf"
    mine = tmp_path / "demo_synthetic.yaml"  # a file of the same name in the folder wins over the shipped one
    mine.write_text("base: base.yaml\ndata: {kind: synthetic}\nmodel: {arch: r18}\nsteps: 3\n")
    assert recipe_path("demo_synthetic.yaml") == Path("demo_synthetic.yaml")
    assert load_config("demo_synthetic.yaml").model.arch == "r18"
    assert shipped_file("recipes", "../recipes/base") is None
    with pytest.raises(ConfigError, match=r"^recipe: nope: no such file, nor a shipped recipe \(shipped: base, "):
        load_config("nope")


def test_user_recipe_base_beside_it_else_shipped(tmp_path):
    far = tmp_path / "somewhere" / "else"
    far.mkdir(parents=True)
    # base.yaml is not beside this recipe: the shipped base.yaml is used
    (far / "mine.yaml").write_text("base: base.yaml\ndata: {kind: synthetic}\nmodel: {arch: mbf}\nsteps: 5\n")
    cfg = load_config(far / "mine.yaml")
    shipped = load_config("base", ["data.path=/placeholder"])
    assert (cfg.steps, cfg.model.arch, cfg.optim.lr, cfg.head.name) == (5, "mbf", shipped.optim.lr, shipped.head.name)
    # a base.yaml beside the recipe wins; a relative path works
    (far / "base.yaml").write_text("optim: {lr: 0.0123}\n")
    assert load_config(far / "mine.yaml").optim.lr == 0.0123
    (far / "sub").mkdir()
    (far / "sub" / "child.yaml").write_text("base: ../mine.yaml\nsteps: 7\n")
    cfg = load_config(far / "sub" / "child.yaml")
    assert (cfg.steps, cfg.optim.lr) == (7, 0.0123)
    assert resolve_base("base.yaml", far / "sub" / "child.yaml") == shipped_file("recipes", "base")
    (far / "bad.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"^base: 'missing\.yaml' in .*bad\.yaml: not found beside the recipe"):
        load_config(far / "bad.yaml")

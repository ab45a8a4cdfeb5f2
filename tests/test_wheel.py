"""A wheel built from the repo works from any folder: installed outside the checkout, run from an empty
folder, it lists its protocols, evaluates a real model on a real .bin cut from LFW and trains the
shipped demo recipe by name (issue 12). The wheel goes into a `--target` folder with `--no-deps`; the
heavy packages (torch, onnxruntime, ...) come from this test's environment, and an editable install
of facebce there is switched off for the run, so nothing can be read from a checkout.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

MBF_PREPROCESS = ["--color", "rgb", "--mean", "123.675,116.28,103.53", "--std", "58.395,57.12,57.375"]
# a sitecustomize run by the installed facebce's Python: an editable install of facebce (a meta-path
# finder mapping `facebce` to a checkout) must not fill in anything the wheel lacks
_NO_EDITABLE = ("import sys\n"
                "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the repo's packaging files (the checkout gets no build/ folder)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("facebce", "eval_protocols", "recipes"):  # symlinks stay links: _shipped/* -> ../../<folder>
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = dist.glob("facebce-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """The wheel installed into a folder outside the checkout, and the environment that runs it."""
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    guard = tmp_path_factory.mktemp("guard")
    (guard / "sitecustomize.py").write_text(_NO_EDITABLE)
    home = tmp_path_factory.mktemp("home")
    env = {"PATH": f"{target / 'bin'}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
           "PYTHONPATH": f"{target}{os.pathsep}{guard}", "HOME": str(home), "PYTHONNOUSERSITE": "1",
           "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
    return {"target": target, "env": env, "work": tmp_path_factory.mktemp("empty")}


def facebce(installed, *args, timeout=300) -> str:
    """Run the installed console script from the empty folder; its output, checked to name no checkout path."""
    script = installed["target"] / "bin" / "facebce"
    done = subprocess.run([str(script), *args], cwd=installed["work"], env=installed["env"], capture_output=True,
                          text=True, timeout=timeout)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"facebce {' '.join(args)} failed:\n{out}"
    assert str(REPO) not in out, f"facebce {' '.join(args)} used the checkout:\n{out}"
    return out


def test_wheel_holds_the_protocols_and_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, shipped in (("eval_protocols", "protocols"), ("recipes", "recipes")):
        expected = {f"facebce/_shipped/{shipped}/{p.name}" for p in (REPO / folder).glob("*.yaml")}
        assert expected and expected <= names, sorted(expected - names)
    assert "facebce/resources.py" in names and "facebce/cli.py" in names
    assert not any(n.startswith(("tests/", "tools/")) for n in names)


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    code = ("import facebce, facebce.cli, facebce.resources as r; "
            "print(facebce.__file__); print(r.shipped_dir('protocols')); print(r.shipped_dir('recipes'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=installed["work"], env=installed["env"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    target = installed["target"].resolve()
    for line in done.stdout.split():
        assert Path(line).resolve().is_relative_to(target), line
    assert not (installed["target"] / "facebce" / "_shipped" / "protocols").is_symlink()


def test_eval_list_and_models_from_an_empty_folder(installed):
    out = facebce(installed, "eval", "--list")
    for name in ("lfw", "cfp_fp", "custom_bin", "ijbc", "open_set_folder"):
        assert f"\n{name} " in f"\n{out}", out
    assert str(installed["target"] / "facebce" / "_shipped" / "protocols") in out  # each protocol's [source]
    out = facebce(installed, "models")
    assert "mbf    MobileFaceNet     2,059,520" in out


def test_real_eval_on_a_cut_of_lfw(installed, shared_data):
    """120 LFW pairs (6 genuine + 6 impostor from each of the 10 folds, so every fold stays balanced)."""
    from facebce.data.verification_bin import load_bin, save_bin

    lfw = load_bin(shared_data / "lfw.bin")
    pairs = [fold * 600 + half * 300 + i for fold in range(10) for half in (0, 1) for i in range(6)]
    images = [img for k in pairs for img in lfw.images[2 * k: 2 * k + 2]]
    issame = lfw.issame[pairs]
    assert issame.sum() == 60
    cut = installed["work"].parent / "lfw_cut.bin"
    save_bin(cut, images, issame)
    model = shared_data / "models" / "mobilefacenet.onnx"
    out = facebce(installed, "eval", str(model), *MBF_PREPROCESS, f"custom_bin={cut}", "--no-flip", "--out", "report")
    assert "| custom_bin | 120 |" in out
    report = json.loads((installed["work"] / "report" / "report.json").read_text())
    (result,) = report["sets"]
    assert result["name"] == "custom_bin" and result["n_pairs"] == 120
    ten_fold = result["ten_fold"]["accuracy"]
    assert 0.93 <= ten_fold <= 1.0, ten_fold  # the model gives 99.50 % on all of LFW
    assert np.isfinite(report["threshold"]["value"])


def test_train_the_shipped_demo_recipe_by_name(installed):
    out = facebce(installed, "train", "demo_synthetic", "--out", "run", "--set", "steps=2",
                  "--set", "data.batch_size=8", "--set", "data.synthetic.identities=8",
                  "--set", "data.synthetic.images=3", "--set", "data.synthetic.heldout_identities=6",
                  "--set", "data.synthetic.heldout_images=3", "--set", "data.synthetic.heldout_pairs=20",
                  "--set", "model.embedding_size=16", "--set", "log.progress=false", "--set", "num_threads=1")
    assert "trained 2 steps" in out
    run = installed["work"] / "run"
    assert (run / "backbone.pth").is_file() and json.loads((run / "model.json").read_text())["arch"] == "mbf"
    config = (run / "config.yaml").read_text()
    assert "identities: 8" in config and "scale: 32" in config  # the recipe, its base and the overrides

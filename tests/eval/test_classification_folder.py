"""Closed-set uniform classification of a training run on a labelled image folder of its own classes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from facebce.cli import main
from facebce.data.synthetic import SyntheticFaces, write_image_folder
from facebce.eval.model_loading import ModelSpec
from facebce.eval.uniform import class_wise_accuracy, sample_wise_accuracy, uniform_accuracy
from facebce.heads import build_head
from facebce.train import latest_checkpoint

SYNTH = {"identities": 6, "images": 2, "seed": 0, "difficulty": 0.5}


def _train(tmp_path, head: str):
    recipe = tmp_path / f"{head}.yaml"
    recipe.write_text(yaml.safe_dump({
        "steps": 3, "seed": 1, "num_threads": 1, "model": {"arch": "mbf", "embedding_size": 16},
        "data": {"kind": "synthetic", "batch_size": 4, "num_workers": 0, "synthetic": SYNTH},
        "head": {"name": head}, "optim": {"lr": 0.05, "warmup_steps": 1},
        "verification": {"every_steps": 0}, "log": {"every_steps": 1, "progress": False, "tensorboard": False}}))
    run = tmp_path / f"run_{head}"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    return run


def _head_scores(run, head: str, folder):
    """S from the head's own scores(), rebuilt from the last checkpoint, on the folder's images."""
    card = json.loads((run / "model.json").read_text())
    head_state = latest_checkpoint(run / "checkpoints")[1]["head"]
    h = build_head(head, card["embedding_size"], card["num_classes"])
    h.load_state_dict(head_state)
    embedder = ModelSpec(run).build(flip=False, normalize=False)
    from facebce.data.image_folder import scan_image_folder
    import cv2
    _, paths, labels = scan_image_folder(folder)
    z = embedder.embed(np.stack([cv2.imread(str(p)) for p in paths]))
    with torch.no_grad():
        return h.eval().scores(torch.as_tensor(np.asarray(z, np.float32))).numpy(), labels, h


@pytest.mark.parametrize("head", ["bce_u_norm", "bce_d"])
def test_classification_folder_matches_the_heads_own_scores(tmp_path, head, capsys):
    run = _train(tmp_path, head)
    card = json.loads((run / "model.json").read_text())
    assert card["scores"] == ("cosine" if head == "bce_u_norm" else "linear")
    assert card["num_classes"] == 6 and (run / card["centres"]).is_file()
    folder = write_image_folder(SyntheticFaces(SYNTH["identities"], SYNTH["images"], seed=SYNTH["seed"],
                                               difficulty=SYNTH["difficulty"]), tmp_path / "val")
    threshold = ["--threshold", "bias"] if card["threshold"] is not None else ["--threshold", "fixed:0"]
    out = tmp_path / "r"
    assert main(["eval", str(run), f"classification_folder={folder}", *threshold, "--out", str(out)]) == 0
    assert "## Uniform classification" in capsys.readouterr().out
    u = json.loads((out / "report.json").read_text())["uniform"]

    s, y, h = _head_scores(run, head, folder)
    want = uniform_accuracy(s, y)
    assert u["n_samples"] == 12 and u["num_classes"] == 6
    assert u["sample_wise"] == pytest.approx(sample_wise_accuracy(s, y))
    assert u["uniform"]["accuracy"] == pytest.approx(want.accuracy)
    assert u["uniform"]["threshold"] == pytest.approx(want.threshold, abs=1e-5)
    assert u["uniform"]["segment"] == pytest.approx(list(want.segment), abs=1e-5)
    assert u["class_wise_opt"] >= u["uniform"]["accuracy"]
    if head == "bce_u_norm":
        assert u["bias"] == pytest.approx(h.threshold) and u["class_wise_learned"] is None
        assert u["gap"] == pytest.approx(h.threshold - want.threshold, abs=1e-5)
    else:  # per-class biases: class-wise accuracy at the learned thresholds b_j
        assert u["bias"] is None and u["gap"] is None
        assert u["class_wise_learned"] == pytest.approx(class_wise_accuracy(s, y, h.class_thresholds.numpy()).accuracy)


def test_classification_folder_errors(tmp_path, capsys):
    run = _train(tmp_path, "bce_u_norm")
    wrong = write_image_folder(SyntheticFaces(4, 1, seed=0), tmp_path / "four")

    def error(model, *options) -> str:
        capsys.readouterr()
        assert main(["eval", model, f"classification_folder={wrong}", *options]) != 0
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0  # one line
        return err

    assert "4 identity folders, but the run" in error(str(run), "--threshold", "bias")
    assert "has 6 classes" in error(str(run), "--threshold", "bias")
    assert "needs a facebce training run folder" in error(str(run / "backbone.pth"), "--arch", "mbf",
                                                          "--embedding-size", "16", "--threshold", "fixed:0")
    (run / "centres.pth").unlink()
    assert "class centres centres.pth are missing" in error(str(run), "--threshold", "bias")

"""Closed-set val on held-out images of the training identities (data.val_fraction) and results.json."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from facebce.data.verification_bin import load_bin, save_bin
from facebce.errors import ConfigError
from facebce.eval import best_threshold, ten_fold
from facebce.eval.model_loading import load_classifier
from facebce.eval.uniform import uniform_section
from facebce.models.embedder import TorchEmbedder
from facebce.train import Trainer, train
from facebce.train.loader import build_datasets, split_per_identity
from tests.train.helpers import tiny_config


def test_split_per_identity_keeps_every_identity_in_training():
    labels = np.repeat(np.arange(5), [1, 2, 5, 10, 3])
    train_idx, val_idx = split_per_identity(labels, 0.2, seed=4)
    assert np.intersect1d(train_idx, val_idx).size == 0
    assert np.array_equal(np.sort(np.r_[train_idx, val_idx]), np.arange(labels.size))
    assert set(labels[train_idx]) == set(range(5))  # at least one image of each stays in training
    assert np.bincount(labels[val_idx], minlength=5).tolist() == [0, 0, 1, 2, 1]  # round(0.2 n), n-1 at most
    again = split_per_identity(labels, 0.2, seed=4)
    assert np.array_equal(again[1], val_idx) and not np.array_equal(split_per_identity(labels, 0.5, seed=5)[1],
                                                                    split_per_identity(labels, 0.5, seed=6)[1])


def test_val_fraction_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="data.val_fraction"):
        tiny_config(tmp_path, data={"val_fraction": 1.0})


def test_val_split_trains_on_the_rest_and_reports_uniform_accuracy(tmp_path):
    cfg = tiny_config(tmp_path, steps=3, data={"val_fraction": 0.5, "synthetic": {"images": 4}},
                      checkpoint={"every_steps": 0})
    train_ds, val_ds = build_datasets(cfg.data)
    assert len(train_ds) == 24 and len(val_ds) == 24 and train_ds.num_classes == val_ds.num_classes == 12
    result = train(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["val"] == pytest.approx(result.val) and saved["steps"] == 3
    assert {"sw_acc", "uni_acc", "t_star", "bias", "bias_gap"} <= set(result.val)
    # the same numbers from the run folder alone, as `facebce eval RUN classification_folder=...` computes them
    classifier = load_classifier(tmp_path)
    trainer = Trainer(tiny_config(tmp_path / "again", steps=3, data={"val_fraction": 0.5, "synthetic": {"images": 4}}))
    trainer.backbone.load_state_dict(torch.load(tmp_path / "backbone.pth", weights_only=True))
    raw = TorchEmbedder(trainer.backbone, flip=False, normalize=False).embed(val_ds.images_bgr())
    u = uniform_section(classifier.class_scores(raw), val_ds.labels, bias=classifier.threshold)
    assert result.val["uni_acc"] == pytest.approx(u.uniform.accuracy)
    assert result.val["t_star"] == pytest.approx(u.uniform.threshold, nan_ok=True)
    assert result.val["bias"] == pytest.approx(classifier.threshold)
    assert result.val["bias_gap"] == pytest.approx(u.gap, nan_ok=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "val/uni_acc" in rows[-1] and "val/sw_acc" in (tmp_path / "metrics.csv").read_text().splitlines()[0]


def test_verification_embeds_each_stored_image_once(tmp_path, monkeypatch):
    """A .bin stores a repeated image once; verification embeds it once and scores every pair."""
    rng = np.random.default_rng(0)
    import cv2
    crops = [cv2.imencode(".png", rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))[1].tobytes() for _ in range(6)]
    first = rng.integers(0, 6, 20)
    second = (first + rng.integers(1, 6, 20)) % 6  # never the same crop twice in a pair (no cosine-1 ties)
    images = [crops[i] for pair in zip(first, second) for i in pair]  # 20 pairs over 6 distinct crops
    issame = rng.integers(0, 2, 20).astype(bool)
    save_bin(tmp_path / "rep.bin", images, issame)
    assert len({id(b) for b in load_bin(tmp_path / "rep.bin").images}) <= 6
    proj = np.random.default_rng(1).standard_normal((112 * 112 * 3, 8))
    calls = []

    def fake_embed(self, imgs):  # a fixed function of the pixels: the scores do not depend on the model
        calls.append(len(imgs))
        e = imgs.reshape(len(imgs), -1).astype(np.float64) @ proj
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)
    monkeypatch.setattr(TorchEmbedder, "embed", fake_embed)
    cfg = tiny_config(tmp_path / "run", steps=1, verification={"bins": [str(tmp_path / "rep.bin")]},
                      checkpoint={"every_steps": 0})
    result = train(cfg)
    assert calls == [6]  # the 6 distinct crops, once
    vs = load_bin(tmp_path / "rep.bin")
    emb = fake_embed(None, np.ascontiguousarray(vs.decode(progress=False)[..., ::-1]))  # all 40, as before
    scores = np.sum(emb[0::2].astype(np.float64) * emb[1::2], axis=1)
    assert result.verification["rep"]["acc"] == pytest.approx(ten_fold(emb[0::2], emb[1::2], issame).accuracy)
    assert result.verification["rep"]["best_acc"] == pytest.approx(best_threshold(scores, issame).accuracy)
    assert result.verification["rep"]["best_threshold"] == pytest.approx(best_threshold(scores, issame).threshold)

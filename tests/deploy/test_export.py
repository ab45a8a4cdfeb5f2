"""export_onnx: parity with torch, dynamic batch, metadata, insightface compatibility, variants, atomicity."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from insightface.model_zoo import get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from torch import nn

from facebce.deploy import OnnxEmbedder, export_onnx
from facebce.errors import ModelError
from facebce.models import build_backbone
from facebce.models.embedder import Preprocess, TorchEmbedder
from tests.conftest import SHARED_DATA
from tests.models.conftest import randomise_

METADATA = {"backbone": "r18", "head": "bce_u_norm", "bias": -12.5, "threshold": 0.31}


def _crops(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _real_crops(n: int = 4) -> np.ndarray | None:
    """A few aligned LFW crops (BGR) when the shared data is there; random crops cover the rest."""
    folder = SHARED_DATA / "lfw_aligned_10plus"
    paths = sorted(folder.glob("*/*_0001.jpg"))[:n]
    return np.stack([cv2.imread(str(p)) for p in paths]) if len(paths) == n else None


class Tiny(nn.Module):
    """A backbone-shaped module small enough to export in a blink (for the failure paths)."""

    embedding_size = 16
    input_size = (112, 112)

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 7, stride=8), nn.PReLU(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """r18 (512-d, real parity crops when available) and mbf (with fp16/int8 variants), exported once."""
    folder = tmp_path_factory.mktemp("export")
    out = {}
    for name, variants in (("r18", ()), ("mbf", ("fp16", "int8"))):
        model = randomise_(build_backbone(name)).eval()
        report = export_onnx(model, folder / f"{name}.onnx", metadata={**METADATA, "backbone": name},
                             parity_images=_real_crops(), variants=variants)
        out[name] = model, report
    return out


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_parity_with_torch_eager(exported, name):
    model, report = exported[name]
    fp32 = report.variants["fp32"]
    assert fp32.min_cosine >= 0.99999
    assert fp32.size_bytes == os.path.getsize(report.path)
    images = _crops(5, seed=7)  # fresh crops, not the ones export checked
    got = OnnxEmbedder(report.path).embed(images)
    ref = TorchEmbedder(model).embed(images)
    assert _cosine(got, ref).min() >= 0.99999
    assert json.loads(open(report.report_path).read()) == json.loads(report.to_json())


def test_dynamic_batch(exported):
    _, report = exported["r18"]
    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("data", "embedding")
    assert inp.shape[1:] == [3, 112, 112] and isinstance(inp.shape[0], str)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 3, 112, 112)).astype(np.float32)
    five = session.run(None, {"data": x})[0]
    one = session.run(None, {"data": x[:1]})[0]
    assert five.shape == (5, 512) and one.shape == (1, 512)
    assert _cosine(five[:1], one)[0] > 0.99999


def test_metadata_round_trips(exported):
    _, report = exported["r18"]
    emb = OnnxEmbedder(report.path)
    assert emb.metadata == report.metadata
    assert {k: emb.metadata[k] for k in ("backbone", "head", "embedding_size", "color_order")} == {
        "backbone": "r18", "head": "bce_u_norm", "embedding_size": "512", "color_order": "rgb"}
    assert float(emb.metadata["bias"]) == -12.5 and emb.threshold == 0.31
    assert emb.preprocess == Preprocess("rgb", 127.5, 127.5, (112, 112))


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_insightface_model_zoo_runs_it_as_we_do(exported, name):
    _, report = exported[name]
    model = get_model(report.path, providers=["CPUExecutionProvider"])
    assert isinstance(model, ArcFaceONNX)
    assert (model.input_mean, model.input_std) == (127.5, 127.5)
    images = _crops(3, seed=3)
    theirs = model.get_feat(list(images))
    ours = OnnxEmbedder(report.path).embed(images)
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    assert _cosine(theirs, ours).min() > 0.99999


def test_fp16_and_int8_variants(exported):
    _, report = exported["mbf"]
    fp32, fp16, int8 = (report.variants[v] for v in ("fp32", "fp16", "int8"))
    assert fp16.size_bytes < 0.6 * fp32.size_bytes and int8.size_bytes < 0.35 * fp32.size_bytes
    assert fp16.min_cosine > 0.999 and int8.min_cosine > 0.95
    images = _crops(6, seed=11)
    ref = OnnxEmbedder(fp32.path).embed(images)
    for variant, floor in ((fp16, 0.99), (int8, 0.9)):
        session = ort.InferenceSession(variant.path, providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].type == "tensor(float)" == session.get_outputs()[0].type
        assert _cosine(OnnxEmbedder(variant.path).embed(images), ref).min() > floor


def test_broken_parity_raises_and_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "tiny.onnx"
    export_onnx(Tiny(), out)
    before = out.read_bytes()
    real_run = OnnxEmbedder._run
    monkeypatch.setattr(OnnxEmbedder, "_run", lambda self, blob: real_run(self, blob)[:, ::-1].copy())
    with pytest.raises(ModelError, match=r"tiny\.onnx: fp32 export fails parity with torch eager: min cosine"):
        export_onnx(Tiny(), out, variants=("fp16",))
    assert out.read_bytes() == before  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny.onnx.json"]


def test_fixed_batch_export(tmp_path):
    model = Tiny()
    report = export_onnx(model, tmp_path / "b1.onnx", dynamic_batch=False)
    emb = OnnxEmbedder(report.path)
    assert emb.fixed_batch == 1
    images = _crops(3, seed=5)
    assert _cosine(emb.embed(images), TorchEmbedder(model).embed(images)).min() > 0.99999


def test_export_leaves_the_module_alone(tmp_path):
    model = Tiny().train()
    export_onnx(model, tmp_path / "t.onnx", check=False)
    assert model.training and next(model.parameters()).requires_grad


@pytest.mark.parametrize("kwargs, message", [
    ({"metadata": {"treshold": 0.3}}, r"unknown key\(s\) \['treshold'\]"),
    ({"metadata": {"threshold": 1.5}}, r"threshold=1\.5: a cosine threshold lies in \[-1, 1\]"),
    ({"metadata": {"bias": "high"}}, r"bias='high': expected a finite number"),
    ({"variants": ("fp8",)}, r"variants=\['fp8'\]: unknown \['fp8'\]"),
    ({"opset": 9}, r"opset=9: expected an int >= 11"),
    ({"parity_images": np.zeros((2, 96, 96, 3), np.uint8)}, r"parity_images: shape \(2, 96, 96, 3\)"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ModelError, match=message):
        export_onnx(Tiny(), tmp_path / "t.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# issue 12: file permissions (defect 2), variant placement (defect 5), the two thresholds (defect 4)


@pytest.fixture
def umask_002():
    """A umask other than the default, so a right answer cannot be 0600 or 0644 by accident."""
    old = os.umask(0o002)
    yield 0o002
    os.umask(old)


def test_written_files_get_the_umask_permissions(tmp_path, umask_002):
    """Was 0600 (mkstemp's mode kept through the rename): a service running as another user could not read it."""
    out = tmp_path / "tiny.onnx"
    report = export_onnx(Tiny(), out, variants=("fp16",))
    written = [Path(p) for p in (report.path, report.report_path, report.variants["fp16"].path)]
    for path in written:
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask_002, path
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(written)  # no temporary left
    from facebce.deploy.export import convert_variant
    dst = convert_variant(out, tmp_path / "other" / "tiny.int8.onnx", "int8")
    assert os.stat(dst).st_mode & 0o777 == 0o664


def test_a_folder_handed_to_insightface_loads_the_fp32_model(exported, shared_data, tmp_path):
    """insightface's FaceAnalysis loads the first *.onnx of a folder (sorted): mbf.fp16.onnx sorted before
    mbf.onnx when the variants lay beside it. They now live in variants/, out of the folder's glob."""
    from insightface.app import FaceAnalysis

    _, report = exported["mbf"]
    folder = os.path.dirname(report.path)
    os.symlink(shared_data / "models" / "scrfd_2.5g_bnkps.onnx", os.path.join(folder, "det.onnx"))
    try:
        app = FaceAnalysis(name=folder, allowed_modules=["detection", "recognition"],
                           providers=["CPUExecutionProvider"])
    finally:
        os.unlink(os.path.join(folder, "det.onnx"))
    assert os.path.realpath(app.models["recognition"].model_file) == os.path.realpath(report.path)
    assert {os.path.dirname(report.variants[v].path) for v in ("fp16", "int8")} == {os.path.join(folder, "variants")}


def test_learned_and_pair_thresholds_are_kept_apart(tmp_path):
    """Was: the head's b/γ was recorded as `threshold`, the pair threshold a gallery then used silently."""
    from facebce.deploy.export import pair_threshold_metadata, threshold_option

    report = export_onnx(Tiny(), tmp_path / "a.onnx", metadata={"head": "bce_u_norm", "learned_threshold": 0.12})
    emb = OnnxEmbedder(report.path)
    assert emb.threshold is None and emb.learned_threshold == 0.12
    assert emb.metadata["learned_threshold_kind"] == "class_centre"
    assert not {"threshold", "threshold_source"} & set(emb.metadata)
    assert "no pair threshold recorded" in report.summary()

    calibrated = {"source": "calibrated", "target_far": 1e-3, "ci": [0.41, 0.46], "calibration": "sha256:ab12"}
    report = export_onnx(Tiny(), tmp_path / "b.onnx", metadata={"learned_threshold": 0.12, "threshold": 0.43},
                         threshold_provenance=calibrated)
    meta = OnnxEmbedder(report.path).metadata
    assert {k: meta[k] for k in meta if k.startswith(("threshold", "learned"))} == {
        "threshold": "0.43", "threshold_source": "calibrated", "threshold_target_far": "0.001",
        "threshold_ci": "[0.41, 0.46]", "threshold_calibration": "sha256:ab12",
        "learned_threshold": "0.12", "learned_threshold_kind": "class_centre"}
    assert ("threshold 0.4300 (pair threshold, calibrated, target FAR 0.001, 95 % interval [0.4100, 0.4600])"
            in report.summary())

    assert threshold_option("0.43") == (0.43, None)
    assert pair_threshold_metadata(0.43) == {"threshold": "0.43", "threshold_source": "user"}
    for text in ("abc", "1.5", "nan"):
        with pytest.raises(ModelError, match=rf"--threshold '{text}': expected a cosine in \[-1, 1\]"):
            threshold_option(text)
    for bad, message in (({"source": "guess"}, "source='guess'"), ({"source": "calibrated"}, "missing"),
                         ({**calibrated, "ci": [0.5, 0.4]}, r"ci=\[0\.5, 0\.4\]"),
                         ({**calibrated, "target_far": 2}, "target_far=2")):
        with pytest.raises(ModelError, match=message):
            pair_threshold_metadata(0.43, bad)

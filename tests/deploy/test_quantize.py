"""Static int8 (QDQ, per-channel) export variant calibrated on real aligned faces."""
from __future__ import annotations

import cv2
import numpy as np
import onnx
import pytest
import torch

from facebce.deploy import OnnxEmbedder, export_onnx
from facebce.deploy.export import convert_variant
from facebce.deploy.quantize import calibration_images, quantize_static_int8
from facebce.errors import DataFormatError, ModelError
from facebce.models import build_backbone
from facebce.models.embedder import META_THRESHOLD, Preprocess
from tests.models.conftest import randomise_

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_calibration_images_from_a_folder_are_evenly_sampled(shared_data):
    folder = shared_data / "lfw_aligned_10plus"
    crops = calibration_images(folder, limit=12)
    assert crops.shape == (12, 112, 112, 3) and crops.dtype == np.uint8
    files = sorted(folder.rglob("*.jpg"))
    np.testing.assert_array_equal(crops[0], cv2.imread(str(files[0])))  # BGR, first file first
    np.testing.assert_array_equal(crops[-1], cv2.imread(str(files[-1])))  # ... and the last one last
    assert len({f.parent.name for f in np.asarray(files)[np.linspace(0, len(files) - 1, 12).round().astype(int)]}) > 8


def test_calibration_images_from_a_bin(shared_data):
    crops = calibration_images(shared_data / "lfw.bin", limit=5)
    assert crops.shape == (5, 112, 112, 3) and crops.dtype == np.uint8


def test_bad_calibration_sources_are_one_line_errors(tmp_path):
    with pytest.raises(DataFormatError, match="no calibration images"):
        calibration_images(tmp_path)
    cv2.imwrite(str(tmp_path / "big.png"), np.zeros((120, 100, 3), np.uint8))
    with pytest.raises(DataFormatError, match=r"big.png: calibration image is 100x120, expected an aligned 112x112"):
        calibration_images(tmp_path)
    with pytest.raises(DataFormatError, match="must be a folder of aligned crops or a verification .bin"):
        calibration_images(tmp_path / "missing.txt")
    with pytest.raises(DataFormatError, match="limit"):
        calibration_images(tmp_path, limit=0)


@pytest.fixture(scope="module")
def mbf_static(tmp_path_factory):
    """A randomised mbf exported with the int8-static variant, calibrated on 32 LFW faces."""
    from tests.conftest import SHARED_DATA

    folder = SHARED_DATA / "lfw_aligned_10plus"
    if not folder.is_dir():
        pytest.skip(f"real data not found: {folder}")
    calib = calibration_images(folder, limit=32)
    out = tmp_path_factory.mktemp("static")
    model = randomise_(build_backbone("mbf")).eval()
    report = export_onnx(model, out / "mbf.onnx", metadata={"backbone": "mbf", "threshold": 0.3},
                         parity_images=calib[:4], variants=["int8-static"], calib_images=calib)
    return report, calib


def test_int8_static_variant_is_qdq_per_channel_and_keeps_metadata(mbf_static):
    report, calib = mbf_static
    v = report.variants["int8-static"]
    assert v.min_cosine >= 0.95  # export_onnx's parity rule for int8 variants held
    # judged on the 4 parity faces alone (random pixels lie outside its calibrated ranges); fp32 on 4 + 8 random
    assert (v.n_images, report.variants["fp32"].n_images, report.n_parity_images) == (4, 12, 12)
    assert "int8-static" in report.summary() and "over 4 faces" in report.summary()
    model = onnx.load(v.path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 20 and ops.count("DequantizeLinear") > 20
    weights = {i.name: i for i in model.graph.initializer}
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                   and n.input[0] in weights and weights[n.input[0]].data_type == onnx.TensorProto.INT8
                   and len(weights[n.input[1]].dims) == 1 and weights[n.input[1]].dims[0] > 1]
    assert len(per_channel) > 20  # conv weights: int8, one scale per output channel
    props = {p.key: p.value for p in model.metadata_props}
    assert float(props[META_THRESHOLD]) == 0.3  # the fp32 model's metadata travels with the variant
    fp32 = OnnxEmbedder(report.path, providers=["CPUExecutionProvider"]).embed(calib[4:12])
    int8 = OnnxEmbedder(v.path, providers=["CPUExecutionProvider"]).embed(calib[4:12])  # reads the same metadata
    assert np.min(np.sum(fp32 * int8, axis=1)) > 0.95


def test_int8_static_without_parity_crops_is_judged_on_calibration_faces(tmp_path, mbf_static):
    _, calib = mbf_static
    torch.manual_seed(1)
    model = randomise_(build_backbone("mbf")).eval()
    report = export_onnx(model, tmp_path / "m.onnx", variants=["int8-static"], calib_images=calib[:20])
    v = report.variants["int8-static"]
    assert v.n_images == 20 and v.min_cosine >= 0.95 and report.variants["fp32"].n_images == 8  # random only


def test_int8_static_needs_calibration_and_preprocessing(tmp_path, mbf_static):
    report, calib = mbf_static
    with pytest.raises(ModelError, match="int8-static needs calibration images"):
        convert_variant(report.path, tmp_path / "x.onnx", "int8-static")
    assert not (tmp_path / "x.onnx").exists()
    bare = onnx.load(report.path)
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ModelError, match="no facebce preprocessing"):
        quantize_static_int8(tmp_path / "bare.onnx", tmp_path / "y.onnx", calib[:2])
    with pytest.raises(DataFormatError, match="expected uint8"):
        quantize_static_int8(report.path, tmp_path / "y.onnx", calib[:2].astype(np.float32), Preprocess())
    with pytest.raises(ModelError, match="calibration method"):
        quantize_static_int8(report.path, tmp_path / "y.onnx", calib[:2], Preprocess(), method="best")


def test_foreign_opset11_fixed_batch_model_quantizes(shared_data, tmp_path):
    """The shared MobileFaceNet (opset 11, batch fixed at 1, ImageNet preprocessing) is upgraded to
    opset 13 for per-channel scales and calibrated one face at a time; it still embeds the faces."""
    from facebce.eval.model_loading import IMAGENET_MEAN, IMAGENET_STD

    pre = Preprocess(color="rgb", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    faces = calibration_images(shared_data / "lfw_aligned_10plus", limit=8)
    src = shared_data / "models" / "mobilefacenet.onnx"
    dst = convert_variant(src, tmp_path / "mfn.int8-static.onnx", "int8-static", calib_images=faces, preprocess=pre)
    fp32 = OnnxEmbedder(src, preprocess=pre, providers=["CPUExecutionProvider"]).embed(faces)
    int8 = OnnxEmbedder(dst, preprocess=pre, providers=["CPUExecutionProvider"]).embed(faces)
    cosine = np.sum(fp32 * int8, axis=1)  # measured (8 calibration faces, ORT 1.32): mean 0.975, min 0.927
    assert cosine.mean() > 0.95 and cosine.min() > 0.9

"""OnnxEmbedder / TorchEmbedder: preprocessing rules, batching, parity, and the real MobileFaceNet on LFW."""
from __future__ import annotations

import warnings
from dataclasses import replace

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from onnx import TensorProto, helper

from facebce.data.verification_bin import load_bin
from facebce.errors import DataFormatError, ModelError
from facebce.eval.verification import best_threshold
from facebce.models import build_backbone
from facebce.models.embedder import OnnxEmbedder, Preprocess, TorchEmbedder, insightface_preprocess
from tests.models.conftest import randomise_

IMAGENET = Preprocess(color="rgb", mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


def _crops(n: int, seed: int = 0, side: int = 112) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _channel_mean_model(path, *, names=(), batch="N", input_shape=None, scale=None, metadata=None) -> str:
    """A tiny graph whose output is the per-channel mean of its input blob (so preprocessing is
    readable off the output). `names` are Identity nodes placed first (for the node-name sniffing);
    `scale` multiplies the output by a constant (NaN / 0 outputs)."""
    shape = input_shape or [batch, 3, 112, 112]
    nodes, last = [], "x"
    for i, name in enumerate(names):
        nodes.append(helper.make_node("Identity", [last], [f"t{i}"], name=name))
        last = f"t{i}"
    nodes += [helper.make_node("GlobalAveragePool", [last], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["y" if scale is None else "flat"], name="flatten")]
    inits = []
    if scale is not None:
        inits.append(helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]))
        nodes.append(helper.make_node("Mul", ["flat", "scale"], ["y"], name="post_scale"))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape[0], 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return str(path)


def _export(model: torch.nn.Module, path, dynamic: bool = True, batch: int = 1) -> str:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(batch, 3, 112, 112),), str(path), dynamo=False,
                          input_names=["data"], output_names=["out"],
                          dynamic_axes={"data": {0: "b"}, "out": {0: "b"}} if dynamic else None)
    return str(path)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mbf(tmp_path_factory):
    model = randomise_(build_backbone("mbf", embedding_size=128)).eval()
    return model, _export(model, tmp_path_factory.mktemp("embedder") / "mbf.onnx")


# ---- preprocessing ----------------------------------------------------------------------------------
def test_preprocess_is_colour_order_then_mean_std_per_channel(tmp_path):
    img = np.empty((1, 112, 112, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 20, 30  # B, G, R
    path = _channel_mean_model(tmp_path / "m.onnx")
    rgb = OnnxEmbedder(path, Preprocess("rgb", mean=(1, 2, 3), std=(2, 4, 8)), normalize=False).embed(img)
    bgr = OnnxEmbedder(path, Preprocess("bgr", mean=5, std=5), normalize=False).embed(img)
    np.testing.assert_allclose(rgb, [[(30 - 1) / 2, (20 - 2) / 4, (10 - 3) / 8]], rtol=1e-6)
    np.testing.assert_allclose(bgr, [[1, 3, 5]], rtol=1e-6)


@pytest.mark.parametrize("names, raw_pixels", [
    (["Sub_0", "Mul_1"], True),                     # MXNet-converted: normalises inside
    (["_minus0", "_mul0"], True),
    (["Sub_0"], False),                             # needs both
    (["Mul_1", *"abcdef", "Sub_9"], True),          # both within the first 8
    ([*"abcdefg", "Sub_0", "Mul_1"], False),        # the Mul is the 9th node: not seen
    (["/conv1/Conv", "/Mul"], False),               # torch exporter names start with '/'
])
def test_node_name_sniffing_matches_insightface(tmp_path, names, raw_pixels):
    path = _channel_mean_model(tmp_path / "m.onnx", names=names)
    sniffed = insightface_preprocess(onnx.load(path))
    theirs = ArcFaceONNX(model_file=path, session=ort.InferenceSession(path, providers=["CPUExecutionProvider"]))
    assert (sniffed.color, sniffed.mean, sniffed.std) == ("rgb", *((0.0, 1.0) if raw_pixels else (127.5, 127.5)))
    assert (sniffed.mean, sniffed.std) == (theirs.input_mean, theirs.input_std)
    assert OnnxEmbedder(path).preprocess == replace(sniffed, input_size=(112, 112))


def test_metadata_beats_sniffing_and_argument_beats_metadata(tmp_path):
    meta = IMAGENET.to_metadata()
    path = _channel_mean_model(tmp_path / "m.onnx", names=["Sub_0", "Mul_1"], metadata=meta)
    from_meta = OnnxEmbedder(path).preprocess
    assert (from_meta.color, from_meta.mean, from_meta.std) == ("rgb", IMAGENET.mean, IMAGENET.std)
    assert OnnxEmbedder(path, Preprocess("bgr", 0, 1)).preprocess.color == "bgr"
    bad = _channel_mean_model(tmp_path / "bad.onnx", metadata={"input_mean": "[1, 2]", "input_std": "1"})
    with pytest.raises(ModelError, match=r"bad\.onnx: bad preprocessing metadata"):
        OnnxEmbedder(bad)


# ---- shapes, batching, outputs ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [[1, 112, 112, 3], [1, 3, 112, 96], [1, 1, 112, 112], [3, 112, 112]])
def test_wrong_input_shape_names_file_and_shape(tmp_path, shape):
    path = _channel_mean_model(tmp_path / "nhwc.onnx", input_shape=shape) if len(shape) == 4 else None
    if path is None:  # rank 3: build by hand
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
        path = str(tmp_path / "nhwc.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    with pytest.raises(ModelError, match=rf"nhwc\.onnx: input shape \[{', '.join(map(str, shape))}\]"):
        OnnxEmbedder(path)


def test_fixed_batch_pads_the_last_chunk(tmp_path):
    path = _channel_mean_model(tmp_path / "b4.onnx", batch=4)
    emb = OnnxEmbedder(path, normalize=False, batch_size=64)
    images = _crops(7)
    assert emb.fixed_batch == 4
    expected = ((images[..., ::-1].astype(np.float64) - 127.5) / 127.5).mean(axis=(1, 2))
    np.testing.assert_allclose(emb.embed(images), expected, atol=1e-5)
    np.testing.assert_allclose(emb.embed(list(images[:2])), expected[:2], atol=1e-5)
    assert emb.embed([]).shape == (0, 3)


def test_bad_images_are_refused(tmp_path):
    emb = OnnxEmbedder(_channel_mean_model(tmp_path / "m.onnx"))
    with pytest.raises(DataFormatError, match="images: dtype float32"):
        emb.embed(_crops(2).astype(np.float32))
    with pytest.raises(DataFormatError, match=r"images: 96x96 crops, but .*m\.onnx expects 112x112"):
        emb.embed(_crops(2, side=96))
    with pytest.raises(DataFormatError, match=r"img\[None\]"):
        emb.embed(_crops(1)[0])


@pytest.mark.parametrize("scale, message", [(float("nan"), "NaN/Inf embedding for 3 of 3"),
                                            (0.0, "all-zero embedding for 3 of 3")])
def test_nan_and_zero_outputs_raise(tmp_path, scale, message):
    emb = OnnxEmbedder(_channel_mean_model(tmp_path / "m.onnx", scale=scale))
    with pytest.raises(ModelError, match=rf"m\.onnx: {message}"):
        emb.embed(_crops(3))


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such ONNX file"):
        OnnxEmbedder(tmp_path / "absent.onnx")


# ---- session layouts: one session, or one per core at once ------------------------------------------
@pytest.mark.parametrize("batch", [1, "N"])
def test_parallel_sessions_give_every_row_its_own_embedding_in_order(tmp_path, batch):
    path = _channel_mean_model(tmp_path / "m.onnx", batch=batch)
    images = _crops(23, seed=3)  # distinct rows: a row out of order or summed with the wrong mirror shows
    one = OnnxEmbedder(path, batch_size=4, flip=True, sessions=1)
    three = OnnxEmbedder(path, batch_size=4, flip=True, sessions=3)
    np.testing.assert_allclose(three.embed(images), one.embed(images), atol=1e-6)
    assert one.layout.startswith("1 session x ") and three.layout == "3 sessions x 1 thread"
    assert three.embed(images[:1]).shape == (1, 3) and three.embed([]).shape == (0, 3)


def test_auto_measures_both_layouts_on_a_long_job_and_keeps_the_faster(tmp_path, monkeypatch):
    import facebce.models.embedder as embedder

    monkeypatch.setattr(embedder, "available_cores", lambda: 2)
    monkeypatch.setattr(embedder, "_STRETCH_SECONDS", 0.02)
    path = _channel_mean_model(tmp_path / "m.onnx", batch=1)
    images = _crops(200, seed=4)
    auto = OnnxEmbedder(path, flip=True, progress=False)
    short = auto.embed(images[:31])  # 62 calls: below the 64 worth measuring, so one session
    assert auto.layout == "1 session x 2 threads" and auto.layout_rates == {}
    got = auto.embed(images)  # 400 calls: the short job decided nothing; two timed stretches of each, then the faster
    assert set(auto.layout_rates) == {"1 session x 2 threads", "2 sessions x 1 thread"}
    assert all(rate > 0 for rate in auto.layout_rates.values())
    assert auto.layout == max(auto.layout_rates, key=auto.layout_rates.get)
    expected = OnnxEmbedder(path, flip=True, sessions=1).embed(images)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(short, expected[:31], atol=1e-6)
    rates = dict(auto.layout_rates)
    auto.embed(images)  # a later job keeps the choice without measuring again
    assert auto.layout_rates == rates
    any_batch = OnnxEmbedder(_channel_mean_model(tmp_path / "n.onnx"), batch_size=1, flip=True)
    any_batch.embed(images)  # 400 calls, but a model that takes any batch fills the cores from one session
    assert any_batch.layout == "1 session x 2 threads" and any_batch.layout_rates == {}


def test_auto_goes_on_measuring_over_jobs_shorter_than_the_measurement(tmp_path, monkeypatch):
    # A job that ends mid-measurement (a fast CPU, chunked work such as evaluation's 256 images) must
    # not throw its timings away: the next job goes on from them, and the choice is made once both
    # layouts have had their time, even though no job ever reaches the end of the measuring.
    import facebce.models.embedder as embedder

    monkeypatch.setattr(embedder, "available_cores", lambda: 2)
    monkeypatch.setattr(embedder, "_STRETCH_SECONDS", 100.0)  # a reading is 1 s: a job (80 calls) ends first
    monkeypatch.setattr(embedder.time, "perf_counter", _clock := _SteppedClock(step=1.0))
    path = _channel_mean_model(tmp_path / "m.onnx", batch=1)
    images = _crops(40, seed=5)  # 80 calls a job
    auto = OnnxEmbedder(path, flip=True, progress=False)
    expected = OnnxEmbedder(path, flip=True, sessions=1).embed(images)
    for _ in range(20):  # each job is ~80 clock steps: 2 x 100 per layout takes ~5 jobs
        np.testing.assert_allclose(auto.embed(images), expected, atol=1e-6)
        if auto.layout_rates:
            break
    assert set(auto.layout_rates) == {"1 session x 2 threads", "2 sessions x 1 thread"}, _clock.now
    assert auto.layout == max(auto.layout_rates, key=auto.layout_rates.get)
    np.testing.assert_allclose(auto.embed(images), expected, atol=1e-6)


class _SteppedClock:
    """A perf_counter that moves `step` seconds at each reading (the measurement's clock, made cheap)."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.mark.parametrize("sessions", [0, -1, 1.5, True, "two"])
def test_bad_sessions_are_one_line(tmp_path, sessions):
    with pytest.raises(ModelError, match=r"sessions=.*expected a positive int or 'auto'"):
        OnnxEmbedder(_channel_mean_model(tmp_path / "m.onnx"), sessions=sessions)


def test_a_call_failing_on_a_parallel_session_stops_the_job_with_its_error(tmp_path, monkeypatch):
    path = _channel_mean_model(tmp_path / "m.onnx", batch=1)
    emb = OnnxEmbedder(path, sessions=2)
    calls, real = [], OnnxEmbedder._raw_run

    def fail_on_the_fifth(self, blob, rows, session=None):
        calls.append(session)
        if len(calls) == 5:
            raise ModelError(f"{self.name}: onnxruntime failed running it on a batch of 1 (boom)")
        return real(self, blob, rows, session)
    monkeypatch.setattr(OnnxEmbedder, "_raw_run", fail_on_the_fifth)
    with pytest.raises(ModelError, match=r"m\.onnx: onnxruntime failed .*\(boom\)"):
        emb.embed(_crops(40))
    assert len(calls) <= 5 + 2 * 2  # only the calls already queued ran after the failure
    assert len(set(map(id, calls))) == 2  # both sessions took calls


# ---- parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("flip", [False, True])
def test_onnx_matches_torch_on_an_exported_backbone(mbf, flip):
    model, path = mbf
    images = _crops(7, seed=1)
    ours = OnnxEmbedder(path, batch_size=3, flip=flip).embed(images)
    ref = TorchEmbedder(model, batch_size=4, flip=flip).embed(images)
    assert ours.shape == (7, 128) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert np.sum(ours * ref, axis=1).min() > 0.99999
    # the flip really is embedding(img) + embedding(mirror): differs from no flip
    if flip:
        plain = TorchEmbedder(model).embed(images)
        assert np.sum(plain * ref, axis=1).min() < 0.9999


def test_torch_embedder_restores_training_mode_and_channels_last_agrees(mbf):
    model, _ = mbf
    model.train()
    images = _crops(3, seed=2)
    a = TorchEmbedder(model).embed(images)
    assert model.training
    b = TorchEmbedder(model, channels_last=True).embed(images)
    model.eval()
    assert np.sum(a * b, axis=1).min() > 0.99999


# ---- the real MobileFaceNet (fixed batch 1) on LFW pairs ----------------------------------------------
def _lfw_pairs(shared_data, pairs):
    """BGR crops of the given pair indices (decoded here, only what the test needs) and their labels."""
    vs = load_bin(shared_data / "lfw.bin")
    idx = np.array([[2 * p, 2 * p + 1] for p in pairs]).ravel()
    images = np.stack([cv2.imdecode(np.frombuffer(vs.images[i], np.uint8), cv2.IMREAD_COLOR) for i in idx])
    return images, vs.issame[pairs]


def test_real_mobilefacenet_fixed_batch_on_lfw(shared_data):
    pairs = np.r_[0:50, 300:350]  # fold 1: 50 same-person and 50 different-person pairs
    images, issame = _lfw_pairs(shared_data, pairs)
    assert issame.sum() == 50
    path = shared_data / "models" / "mobilefacenet.onnx"
    emb = OnnxEmbedder(path, IMAGENET, flip=True, intra_op_threads=1)
    assert emb.fixed_batch == 1 and emb.embedding_size == 128
    feats = emb.embed(images)
    # an independent reference for two crops: the README's recipe written out by hand
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i in (0, 1):
        blobs = [((im[..., ::-1] - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375]))
                 .transpose(2, 0, 1)[None].astype(np.float32) for im in (images[i], images[i][:, ::-1])]
        ref = sum(session.run(None, {"input": b})[0][0] for b in blobs)
        np.testing.assert_allclose(feats[i], ref / np.linalg.norm(ref), atol=1e-5)
    scores = np.sum(feats[0::2] * feats[1::2], axis=1)
    result = best_threshold(scores, issame)
    assert result.accuracy > 0.95, result


_WITHOUT_TORCH = r"""
import sys
import numpy as np
import facebce.serve.app, facebce.serve.engine  # the service's modules, as `facebce serve` imports them
from facebce.deploy import open_gallery
from facebce.deploy.align import FaceAligner
from facebce.eval.model_loading import ModelSpec
model, gallery = sys.argv[1], sys.argv[2]
emb = ModelSpec(model, color="rgb", mean=127.5, std=127.5).build(flip=True, normalize=True)
rows = emb.embed(np.random.default_rng(0).integers(0, 256, (70, 112, 112, 3), dtype=np.uint8))
store = open_gallery(gallery, dim=rows.shape[1], create=True, threshold=0.5)
store.add(rows[:3], ["a", "b", "c"])
assert store.search(rows[:1], k=1)[0].identity == "a"
store.close()
print("torch" in sys.modules, type(emb).__name__)
"""


def test_the_onnx_path_never_imports_torch(tmp_path):
    """Embedding with an ONNX file (through ModelSpec, as eval and the service do), a gallery store,
    alignment and the service's modules run in a process that never loads torch: ~3.7 s and
    ~180 MB less for every `facebce serve` worker and `facebce gallery` command."""
    import subprocess
    import sys

    model = _channel_mean_model(tmp_path / "m.onnx")
    out = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, model, str(tmp_path / "g.faiss")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "OnnxEmbedder"]

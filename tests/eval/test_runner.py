"""evaluate(): every number equals the metric functions called directly; global threshold sources;
cached re-scoring without the model; bad embeddings and bad model files give one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facebce.data.verification_bin import load_bin
from facebce.errors import ConfigError, DataFormatError, ModelError
from facebce.eval.model_loading import ModelSpec
from facebce.eval.roc import Roc
from facebce.eval.runner import evaluate
from facebce.eval.tenfold import ten_fold
from facebce.eval.verification import accuracy_at_threshold, best_threshold
from tests.eval.fakes import BrokenEmbedder, ProjectionEmbedder, flatten_matmul_onnx, write_pair_sets

N_PAIRS = 60


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two synthetic .bin sets (different difficulty) and a protocol folder that declares them."""
    return write_pair_sets(tmp_path_factory.mktemp("pairs"), ("synth_a", "synth_b"), N_PAIRS, declare_pairs=True)


def _run(data, model, **kwargs):
    kwargs.setdefault("progress", False)
    return evaluate(model, [("synth_a", data / "synth_a.bin"), ("synth_b", data / "synth_b.bin")],
                    protocol_paths=[data / "protocols"], **kwargs)


def _direct_embeddings(path, embedder):
    bgr = np.ascontiguousarray(load_bin(path).decode(progress=False)[..., ::-1])
    e = embedder.embed(bgr) + embedder.embed(np.ascontiguousarray(bgr[:, :, ::-1]))
    return e / np.linalg.norm(e, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def direct(data):
    """Per set (embeddings, cosines, issame) computed without the runner."""
    out = {}
    for name in ("synth_a", "synth_b"):
        e = _direct_embeddings(data / f"{name}.bin", ProjectionEmbedder())
        cos = np.sum(e[0::2].astype(np.float64) * e[1::2].astype(np.float64), axis=1)
        out[name] = (e, cos, load_bin(data / f"{name}.bin").issame)
    return out


def test_every_number_is_the_metric_functions(data, direct):
    report = _run(data, ProjectionEmbedder())
    union = best_threshold(np.concatenate([direct[n][1] for n in direct]),
                           np.concatenate([direct[n][2] for n in direct]))
    assert report.threshold.source == "fit:union" and report.threshold.value == union.threshold
    assert report.threshold.fitted_accuracy == union.accuracy and report.threshold.fitted_on == ("synth_a", "synth_b")
    for s in report.sets:
        e, cos, issame = direct[s.name]
        np.testing.assert_array_equal(s.scores, cos)
        tf = ten_fold(e[0::2], e[1::2], issame)
        assert (s.ten_fold.accuracy, s.ten_fold.std) == (tf.accuracy, tf.std)
        assert (s.ten_fold.val, s.ten_fold.val_std, s.ten_fold.far) == (tf.val, tf.val_std, tf.far)
        np.testing.assert_array_equal(s.ten_fold.fold_accuracies, tf.fold_accuracies)
        assert s.best == best_threshold(cos, issame)
        assert s.at_global == accuracy_at_threshold(cos, issame, union.threshold)
        np.testing.assert_array_equal(s.tar_at_far.tar, Roc.from_labels(cos, issame).tar_at_far().tar)
        assert (s.n_pairs, s.n_genuine, s.embedding_size) == (N_PAIRS, N_PAIRS // 2, 32)
    # the point of the global threshold: no set beats its own best, the union fit is the pooled best
    assert all(s.at_global.accuracy <= s.best.accuracy for s in report.sets)
    assert report.sets[0].best.accuracy > report.sets[1].best.accuracy  # the easier set is easier


def test_threshold_sources(data, direct):
    b_best = best_threshold(direct["synth_b"][1], direct["synth_b"][2])
    r = _run(data, ProjectionEmbedder(), threshold="fit:synth_b")
    assert r.threshold.value == b_best.threshold and r.threshold.fitted_on == ("synth_b",)
    assert r.set("synth_b").at_global.accuracy == b_best.accuracy
    r = _run(data, ProjectionEmbedder(), threshold="fixed:0.3")
    assert r.threshold.value == 0.3 and r.threshold.fitted_on == ()
    assert r.set("synth_a").at_global == accuracy_at_threshold(direct["synth_a"][1], direct["synth_a"][2], 0.3)
    r = _run(data, ProjectionEmbedder(), threshold="bias", bias=0.25)
    assert r.threshold.value == 0.25 and r.bias == 0.25
    for bad, needle in (("bias", "needs the learned threshold"), ("fit:lfw", "no pairs set 'lfw'"),
                        ("fixed:x", "needs a finite number"), ("best", "expected fit:union")):
        with pytest.raises(ConfigError, match=needle):
            _run(data, ProjectionEmbedder(), threshold=bad)


def test_cached_rescoring_needs_no_model(data, tmp_path):
    spy = ProjectionEmbedder()
    first = _run(data, spy, cache_dir=tmp_path, model_name="proj32")
    assert spy.calls > 0
    cached = sorted(p.name for p in (tmp_path / "proj32").iterdir())
    assert len(cached) == 2 and all(n.endswith("-flip.npy") for n in cached)
    for name in cached:  # the cache holds the L2-normalised rows the report scored (the embedder's are not unit)
        rows = np.load(tmp_path / "proj32" / name, allow_pickle=False)
        assert rows.dtype == np.float32 and rows.shape == (2 * N_PAIRS, 32)
        np.testing.assert_allclose(np.linalg.norm(rows.astype(np.float64), axis=1), 1.0, rtol=0, atol=1e-6)
        assert name.startswith("synth_")
    raw = spy.embed(np.zeros((1, 112, 112, 3), np.uint8))
    assert abs(float(np.linalg.norm(raw)) - 1.0) > 1e-3
    again = _run(data, None, cache_dir=tmp_path, model_name="proj32")
    for a, b in zip(first.sets, again.sets):
        np.testing.assert_array_equal(a.scores, b.scores)
        assert (a.ten_fold.accuracy, a.best, a.at_global) == (b.ten_fold.accuracy, b.best, b.at_global)
    rescored = _run(data, None, cache_dir=tmp_path, model_name="proj32", threshold="fixed:0.5")
    assert rescored.threshold.value == 0.5
    with pytest.raises(ConfigError, match="no cached embeddings"):
        _run(data, None, cache_dir=tmp_path, model_name="other")
    with pytest.raises(ConfigError, match="cache_dir and model_name"):
        _run(data, None)


def test_bad_embeddings_name_the_set(data, direct):
    with pytest.raises(DataFormatError) as err:
        _run(data, BrokenEmbedder())
    assert str(err.value).startswith("synth_a: ") and "NaN or Inf" in str(err.value) and "\n" not in str(err.value)
    given = {n: direct[n][0].copy() for n in direct}
    assert _run(data, given).set("synth_a").best == best_threshold(direct["synth_a"][1], direct["synth_a"][2])
    given["synth_b"][5] = 0
    with pytest.raises(DataFormatError, match="synth_b: 1 embeddings have zero norm"):
        _run(data, given)
    given["synth_b"] = given["synth_b"][:10]
    with pytest.raises(DataFormatError, match=r"synth_b: embeddings of shape \(10, 32\)"):
        _run(data, given)


class TinyNet(torch.nn.Module):
    """A few-parameter backbone with the attributes TorchEmbedder reads."""

    input_size = (112, 112)
    embedding_size = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 8, stride=8)
        self.fc = torch.nn.Linear(4 * 14 * 14, 8)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_torch_embedder_flips_itself(data):
    from facebce.models.embedder import TorchEmbedder

    flipping = TorchEmbedder(TinyNet(), flip=True, normalize=False, progress=False)
    report = _run(data, flipping)
    e = flipping.embed(np.ascontiguousarray(load_bin(data / "synth_a.bin").decode(progress=False)[..., ::-1]))
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_allclose(report.set("synth_a").scores, np.sum(e[0::2] * e[1::2], 1), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="flip=False"):
        _run(data, flipping, flip=False)


def test_pairs_list_protocol_gives_the_bin_numbers(data, tmp_path):
    vs = load_bin(data / "synth_a.bin")
    (tmp_path / "img").mkdir()
    lines = []
    for k, same in enumerate(vs.issame):
        for j in (2 * k, 2 * k + 1):
            (tmp_path / "img" / f"{j}.jpg").write_bytes(vs.images[j])
        lines.append(f"img/{2 * k}.jpg,img/{2 * k + 1}.jpg,{'same' if same else 'diff'}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    listed = evaluate(ProjectionEmbedder(), [("custom_pairs", tmp_path / "pairs.csv"),
                                             ("synth_a", data / "synth_a.bin")],
                      protocol_paths=[data / "protocols"], progress=False)
    np.testing.assert_array_equal(listed.set("custom_pairs").scores, listed.set("synth_a").scores)
    (tmp_path / "pairs.csv").write_text("img/0.jpg,img/1.jpg,maybe\n")
    with pytest.raises(DataFormatError, match="pairs.csv: line 1 label 'maybe'"):
        evaluate(ProjectionEmbedder(), [("custom_pairs", tmp_path / "pairs.csv")], progress=False)


def test_bad_protocol_list_and_missing_file(data):
    with pytest.raises(ConfigError, match="given twice"):
        evaluate(ProjectionEmbedder(), [("lfw", data / "synth_a.bin"), ("lfw", data / "synth_b.bin")])
    with pytest.raises(DataFormatError, match="no such lfw file"):
        evaluate(ProjectionEmbedder(), [("lfw", data / "missing.bin")])
    with pytest.warns(UserWarning, match="60 pairs, but protocol lfw has 6000"):
        evaluate(ProjectionEmbedder(), [("lfw", data / "synth_a.bin")], progress=False)


def test_model_files_give_one_line_errors(data, tmp_path):
    wrong = flatten_matmul_onnx(tmp_path / "wrong.onnx", [1, 1, 16, 16])
    with pytest.raises(ModelError, match=r"input shape \[1, 1, 16, 16\], expected \[batch, 3, S, S\]"):
        _run(data, ModelSpec(wrong))
    (tmp_path / "r50.pth").write_bytes(b"x")
    with pytest.raises(ModelError, match="needs its architecture"):
        _run(data, ModelSpec(tmp_path / "r50.pth"))
    (tmp_path / "run.ckpt").write_bytes(b"x")
    with pytest.raises(ModelError, match="unknown model file type .ckpt; expected .onnx, .pth or a training run"):
        _run(data, ModelSpec(tmp_path / "run.ckpt"))
    (tmp_path / "unfinished_run").mkdir()
    with pytest.raises(ModelError, match="unfinished_run: not a finished facebce training run"):
        _run(data, ModelSpec(tmp_path / "unfinished_run"))
    with pytest.raises(ModelError, match="no such model file"):
        _run(data, ModelSpec(tmp_path / "none.onnx"))
    with pytest.raises(ModelError, match="give both mean and std"):
        ModelSpec(wrong, mean=127.5)


def test_onnx_spec_is_built_only_when_needed(data, tmp_path):
    model = flatten_matmul_onnx(tmp_path / "ok.onnx", ["N", 3, 112, 112])
    spec = ModelSpec(model, mean=127.5, std=127.5)
    first = _run(data, spec, cache_dir=tmp_path / "cache")
    assert first.model.startswith("ok.onnx") and (tmp_path / "cache" / spec.key).is_dir()
    assert first.inference.startswith("1 session x ")  # a short job: the one session, not measured
    assert _run(data, spec, cache_dir=tmp_path / "cache").inference is None  # from the cache: nothing ran
    model.write_bytes(b"")  # the file changes: its digest, so the cache key, changes too
    with pytest.raises(ModelError, match="onnxruntime cannot load it"):
        _run(data, spec, cache_dir=tmp_path / "cache")

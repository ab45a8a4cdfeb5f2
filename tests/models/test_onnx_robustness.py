"""OnnxEmbedder on graphs insightface's tools and careless users produce: a batch baked at 1 behind a
dynamic input label (arcface_torch's torch2onnx.py), non-float32 inputs, scalar outputs, graphs that
fail at run time, the wrong crop size, and `--mean abc`: each runs correctly or is one ModelError line
naming the model file."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from facebce.cli import main
from facebce.errors import ConfigError, DataFormatError, ModelError
from facebce.models.embedder import OnnxEmbedder, parse_channel_values

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIDE = 16


def _crops(n: int, seed: int = 0, side: int = SIDE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


class _BakedBatch(torch.nn.Module):
    """MobileFaceNet's tail as arcface_torch writes it for export: a Reshape that bakes batch 1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(4 * (SIDE // 2) ** 2, 8)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(1, -1))  # torch2onnx traces at batch 1: the 1 becomes a constant

    def reference(self, x):
        return self.fc(self.conv(x).flatten(1))


def _export_baked(path, output_dynamic: bool) -> str:
    model = _BakedBatch().eval()
    axes = {"data": {0: "batch"}}
    if output_dynamic:
        axes["out"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, SIDE, SIDE),), str(path), dynamo=False,
                          input_names=["data"], output_names=["out"], dynamic_axes=axes)
    return str(path)


@pytest.mark.parametrize("output_dynamic", [False, True])
def test_batch_baked_at_one_runs_at_batch_one(tmp_path, output_dynamic):
    """Today: 'GEMM: Dimension mismatch' traceback from onnxruntime at batch 64."""
    path = _export_baked(tmp_path / "baked.onnx", output_dynamic)
    shapes = onnx.load(path).graph
    assert shapes.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # the input says dynamic
    emb = OnnxEmbedder(path, normalize=False, batch_size=64)
    assert emb.fixed_batch == 1
    images = _crops(5)
    got = emb.embed(images)
    blob = emb.preprocess.to_blob(images)
    with torch.no_grad():
        expected = _BakedBatch().eval().reference(torch.from_numpy(blob)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_dynamic_batch_model_keeps_batching(tmp_path):
    path = _graph(tmp_path / "dyn.onnx")
    emb = OnnxEmbedder(path, batch_size=64)
    assert emb.fixed_batch is None and emb.embedding_size == 3


def _graph(path, *, in_type=TensorProto.FLOAT, out_shape=("N", 3), nodes=None, inits=(), in_shape=None,
           out_type=TensorProto.FLOAT) -> str:
    """x [N,3,S,S] -> per-channel mean (GlobalAveragePool + Flatten), or the given nodes."""
    nodes = nodes or [helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Flatten", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", in_type, in_shape or
                                                                         ["N", 3, SIDE, SIDE])],
                              [helper.make_tensor_value_info("y", out_type, list(out_shape))], list(inits))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return str(path)


@pytest.mark.parametrize("elem", [TensorProto.DOUBLE, TensorProto.FLOAT16])
def test_float64_and_float16_inputs_run(tmp_path, elem):
    """Today: onnxruntime's INVALID_ARGUMENT traceback (a float32 blob fed to a double input)."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)]  # has a double kernel
    path = _graph(tmp_path / "wide.onnx", in_type=elem, out_type=elem, nodes=nodes)
    emb = OnnxEmbedder(path, normalize=False)
    images = _crops(3)
    expected = ((images[..., ::-1].astype(np.float64) - 127.5) / 127.5).mean(axis=(1, 2))
    got = emb.embed(images)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-2 if elem == TensorProto.FLOAT16 else 1e-5)


def _one_line(e: pytest.ExceptionInfo, name: str) -> str:
    text = str(e.value)
    assert "\n" not in text and name in text
    return text


def test_uint8_input_is_one_line_naming_the_model(tmp_path):
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("GlobalAveragePool", ["xf"], ["g"]), helper.make_node("Flatten", ["g"], ["y"])]
    path = _graph(tmp_path / "bytes.onnx", in_type=TensorProto.UINT8, nodes=nodes)
    with pytest.raises(ModelError) as e:
        OnnxEmbedder(path)
    assert "tensor(uint8), expected a float tensor" in _one_line(e, "bytes.onnx")


def test_scalar_output_is_one_line_naming_the_model(tmp_path):
    nodes = [helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0)]
    path = _graph(tmp_path / "scalar.onnx", nodes=nodes, out_shape=())
    with pytest.raises(ModelError) as e:
        OnnxEmbedder(path)
    assert "expected 1 x D floats (one embedding per image)" in _one_line(e, "scalar.onnx")


def test_undeclared_scalar_output_is_caught_by_the_probe(tmp_path):
    nodes = [helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = str(tmp_path / "unknown.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    with pytest.raises(ModelError) as e:
        OnnxEmbedder(path)
    assert "expected 1 x D floats" in _one_line(e, "unknown.onnx")


def test_graph_failing_at_run_time_is_one_line_naming_the_model(tmp_path):
    """A Reshape to a size no batch can have: loads fine, fails on every run."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [7, 11])
    nodes = [helper.make_node("Reshape", ["x"], ["y"])]
    nodes[0].input.append("shape")
    path = _graph(tmp_path / "broken.onnx", nodes=nodes, inits=[shape], out_shape=(7, 11))
    with pytest.raises(ModelError) as e:
        OnnxEmbedder(path)
    assert "onnxruntime failed running it" in _one_line(e, "broken.onnx")


def test_wrong_crop_size_names_the_model(tmp_path):
    emb = OnnxEmbedder(_graph(tmp_path / "small.onnx"))
    with pytest.raises(DataFormatError) as e:
        emb.embed(_crops(2, side=64))
    assert f"64x64 crops, but {tmp_path / 'small.onnx'} expects {SIDE}x{SIDE}" in _one_line(e, "small.onnx")


@pytest.mark.parametrize("text, option", [("abc", "--mean"), ("1,2", "--mean"), ("nan", "--std"), ("0", "--std"),
                                          ("1,,2", "--std")])
def test_channel_options_are_parsed_in_the_api(text, option):
    with pytest.raises(ConfigError, match=rf"^{option} '{text}': "):
        parse_channel_values(text, option)


def test_channel_options_values():
    assert parse_channel_values(None) is None
    assert parse_channel_values("127.5") == 127.5
    assert parse_channel_values("123.675, 116.28,103.53", "--mean") == (123.675, 116.28, 103.53)


def test_cli_mean_abc_is_one_line(tmp_path, capsys):
    """Today: ValueError traceback from float('abc') in cli.py."""
    path = _graph(tmp_path / "m.onnx")
    assert main(["eval", path, f"custom_bin={tmp_path / 'x.bin'}", "--mean", "abc", "--std", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("facebce: error: --mean 'abc': expected one number") and "\n" not in err

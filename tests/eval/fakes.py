"""Test-only embedders with the facebce embedder interface: `.embed(uint8 N x H x W x 3 BGR) -> N x D`."""
from __future__ import annotations

import cv2
import numpy as np


class ProjectionEmbedder:
    """A fixed random projection of the 16x16 grey image: raw (not normalised), deterministic, fast."""

    def __init__(self, dim: int = 32, seed: int = 0):
        self.proj = np.random.default_rng(seed).normal(size=(256, dim)).astype(np.float32) / 16
        self.calls = 0

    def embed(self, images_bgr: np.ndarray) -> np.ndarray:
        self.calls += 1
        small = np.stack([cv2.resize(cv2.cvtColor(im, cv2.COLOR_BGR2GRAY), (16, 16), interpolation=cv2.INTER_AREA)
                          for im in images_bgr]).reshape(len(images_bgr), -1)
        # einsum's own loop, not BLAS: each row's bits do not depend on how many rows are in the batch
        return np.einsum("nk,kd->nd", (small.astype(np.float32) - 128) / 64, self.proj)


class BrokenEmbedder(ProjectionEmbedder):
    """Returns NaN for every 7th image (a diverged model)."""

    def embed(self, images_bgr: np.ndarray) -> np.ndarray:
        out = super().embed(images_bgr)
        out[::7] = np.nan
        return out


def flatten_matmul_onnx(path, input_shape, out_dim: int = 4, seed: int | None = None):
    """A minimal ONNX embedder, Flatten -> MatMul, with the given input shape; weights all ones, or
    normal random ones drawn from `seed`. ModelSpec loads it like any model."""
    import onnx
    from onnx import TensorProto, helper

    n = int(np.prod(input_shape[1:]))
    w = (np.ones((n, out_dim), np.float32) if seed is None
         else np.random.default_rng(seed).normal(size=(n, out_dim)).astype(np.float32))
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["data"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["out"])], "g",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [input_shape[0], out_dim])],
        [helper.make_tensor("w", TensorProto.FLOAT, [n, out_dim], w.ravel().tolist())])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), path)
    return path


def write_pair_sets(root, names, n_pairs: int, *, declare_pairs: bool = False):
    """Two synthetic .bin pairs sets of different difficulty (names[0] easier) under `root`, and
    `root/protocols/` declaring them (with `pairs: n_pairs` when `declare_pairs`); returns root."""
    from facebce.data.synthetic import SyntheticFaces, make_pairs
    from facebce.data.verification_bin import save_bin

    (root / "protocols").mkdir()
    for name, seed, difficulty in ((names[0], 1, 0.3), (names[1], 2, 0.8)):
        faces = SyntheticFaces(12, 4, seed=seed, first_identity=100 * seed, difficulty=difficulty)
        images, issame = make_pairs(faces, n_pairs, seed=seed)
        save_bin(root / f"{name}.bin", images, issame)
        declared = f"pairs: {n_pairs}\n" if declare_pairs else ""
        (root / "protocols" / f"{name}.yaml").write_text(f"name: {name}\nkind: pairs_bin\nfile: {name}.bin\n{declared}")
    return root

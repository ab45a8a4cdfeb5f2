"""tools/bench/peer_arcface.py and suite.py's --peer-arcface rows, against a tiny stand-in folder.

The stand-in is written here (not arcface_torch's code): the same file and callable names the bench
imports, CUDA-style calls (`.cuda()`, `torch.cuda.amp.autocast(False)`, collectives) that only run on
a CPU through the bench's shims, and a relative import inside `backbones/`.
"""
from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.distributed as dist

from tests.tools.loading import REPO, load_tool

BACKBONES = '''
from .tiny import Tiny


def get_model(name, **kwargs):
    if name not in ("mbf", "r50"):
        raise ValueError(name)
    return Tiny(kwargs.get("fp16", False), kwargs.get("num_features", 512))
'''
TINY = '''
import torch


class Tiny(torch.nn.Module):
    def __init__(self, fp16, num_features):
        super().__init__()
        self.fp16 = fp16
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4)
        self.fc = torch.nn.Linear(4, num_features)

    def forward(self, x):
        with torch.cuda.amp.autocast(self.fp16):
            x = self.conv(x).mean(dim=(2, 3))
        return self.fc(x)
'''
LOSSES = '''
import torch


class CombinedMarginLoss(torch.nn.Module):
    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m2 = s, m2

    def forward(self, logits, labels):
        rows = torch.arange(len(labels)).cuda()
        logits = logits.clone()
        logits[rows, labels.view(-1)] = logits[rows, labels.view(-1)] - self.m2
        return logits * self.s
'''
PFC = '''
import torch
from torch import distributed
from torch.nn.functional import linear, normalize


class PartialFC_V2(torch.nn.Module):
    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False):
        super().__init__()
        assert distributed.is_initialized()
        self.margin = margin_loss
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))

    def forward(self, embeddings, labels):
        labels = labels.squeeze_().long().cuda()
        gathered = [torch.zeros_like(labels).cuda()]
        distributed.all_gather(gathered, labels)
        with torch.cuda.amp.autocast(False):
            logits = linear(normalize(embeddings), normalize(self.weight)).clamp(-1, 1)
        return torch.nn.functional.cross_entropy(self.margin(logits, gathered[0]), gathered[0])
'''


def fake_arcface_torch(root, skip=(), broken=False):
    files = {"backbones/__init__.py": BACKBONES, "backbones/tiny.py": TINY, "losses.py": LOSSES,
             "partial_fc_v2.py": PFC if not broken else "import no_such_module_here\n"}
    for name, text in files.items():
        if name in skip:
            continue
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture(scope="module")
def peer_arcface():
    return load_tool(REPO / "tools" / "bench" / "peer_arcface.py")


@pytest.fixture(scope="module")
def suite():
    return load_tool(REPO / "tools" / "bench" / "suite.py")


def test_peer_step_trains_through_the_cuda_shims_and_undoes_them(tmp_path, peer_arcface):
    cuda_methods = (torch.Tensor.cuda, torch.nn.Module.cuda, torch.cuda.amp.autocast)
    peer = peer_arcface.load_peer(fake_arcface_torch(tmp_path / "arcface_torch"))
    group = peer_arcface.ProcessGroup()
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1
        x, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 1])
        step = peer_arcface.PeerStep(peer, "mbf", 3, x, y, embedding_size=8)
        before = [p.detach().clone() for p in step.backbone.parameters()] + [step.pfc.weight.detach().clone()]
        losses = [step.step(), step.step()]
        after = list(step.backbone.parameters()) + [step.pfc.weight]
    finally:
        group.close()
    assert not dist.is_initialized()
    assert all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # SGD moved every parameter
    assert all(p.grad is None or not p.grad.any() for p in after)  # zero_grad after the step
    assert (torch.Tensor.cuda, torch.nn.Module.cuda, torch.cuda.amp.autocast) == cuda_methods
    assert y.tolist() == [0, 1, 2, 1]  # the peer's in-place squeeze_ works on a copy


@pytest.mark.parametrize("case, expected", [
    ("absent", "no such folder"),
    ("parent", "missing backbones/__init__.py, losses.py, partial_fc_v2.py"),
    ("no losses", "missing losses.py"),
    ("broken", "importing arcface_torch failed: ModuleNotFoundError: No module named 'no_such_module_here'"),
])
def test_a_wrong_folder_is_one_line_and_the_bench_goes_on(tmp_path, capsys, suite, case, expected):
    folder = tmp_path / "arcface_torch"
    if case == "parent":
        fake_arcface_torch(folder)
        folder = tmp_path
    elif case == "no losses":
        fake_arcface_torch(folder, skip=("losses.py",))
    elif case == "broken":
        fake_arcface_torch(folder, broken=True)
    args = argparse.Namespace(peer_arcface=folder, archs=["mbf"], train_batch=2, peer_classes=5, peer_rounds=4,
                              peer_steps=1, threads=1)
    assert suite.bench_peer_arcface(args) == []
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"[train] --peer-arcface {folder}: {out[0].split(': ', 1)[1]}"]
    assert expected in out[0] and out[0].endswith("; no arcface_torch rows")
    assert not dist.is_initialized()


def test_suite_peer_rows_interleave_both_steps(tmp_path, capsys, suite):
    args = argparse.Namespace(peer_arcface=fake_arcface_torch(tmp_path / "arcface_torch"), archs=["mbf"],
                              train_batch=2, peer_classes=5, peer_rounds=2, peer_steps=1, threads=1)
    rows = suite.bench_peer_arcface(args)
    out = capsys.readouterr().out
    assert "torch.Tensor.cuda and torch.nn.Module.cuda return self" in out  # the shims are said
    assert out.count("mbf vs arcface_torch, round") == 2
    (row,) = rows
    assert row.figure.startswith("mbf + ArcFace step, batch 2, 5 classes: facebce ")
    assert row.facebce > 0 and row.baseline > 0 and row.target == 3.0
    ratios = [float(v) for v in row.note.rsplit("per-round ratios ", 1)[1].split(", ")]
    assert len(ratios) == 2 and row.ratio == pytest.approx(sum(ratios) / 2, rel=0.01)  # median of two
    assert not dist.is_initialized()
    assert "facebce auto -> " in row.figure and "autotune: amp " in out  # the Trainer chose, and the row says what

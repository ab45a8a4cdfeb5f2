"""Partial-FC: equal to the full head at r = 1 (one process, and 2 gloo processes), sampling rules at
r < 1, the BCE rescaling option, and world-size-independent checkpoints."""
from __future__ import annotations

import math
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from facebce.errors import ConfigError
from facebce.heads import PartialFC, build_head
from tests.heads import dist_worker

CENTRE_CASES = [
    ("softmax", {}), ("softmax_norm", {"scale": 16.0, "margin": "arcface"}),
    ("softmax_norm", {"scale": 16.0, "bias": "per_class", "margin": "cosface"}),
    ("bce_u", {}), ("bce_d", {}), ("bce_u_norm", {"scale": 32.0}), ("bce_d_norm", {"scale": 32.0}),
    ("uce", {"scale": 32.0}),
]


def randomised(head):
    with torch.no_grad():
        head.weight.copy_(torch.randn_like(head.weight))
        if head.bias is not None:
            head.bias.add_(0.3 * torch.randn_like(head.bias))
    return head


@pytest.mark.parametrize("name, cfg", CENTRE_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CENTRE_CASES)])
def test_single_process_rate_one_equals_full_head(name, cfg):
    torch.manual_seed(0)
    full = randomised(build_head(name, 5, 13, **cfg).double())
    pfc = PartialFC(name, 5, 13, 1.0, **cfg).double()
    pfc.load_full_state_dict(full.state_dict())
    z = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(0, 13, (8,))
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    a, b = full(z1, y), pfc(z2, y)
    a.loss.backward()
    b.loss.backward()
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-12)
    assert torch.allclose(z1.grad, z2.grad, rtol=1e-10, atol=1e-13)
    assert torch.allclose(full.weight.grad, pfc.head.weight.grad, rtol=1e-10, atol=1e-13)
    if full.bias is not None:
        assert torch.allclose(full.bias.grad, pfc.head.bias.grad, rtol=1e-10, atol=1e-13)
    assert torch.equal(b.extras["class_index"], torch.arange(13))


def test_sampling_keeps_every_positive_and_the_right_count():
    torch.manual_seed(0)
    pfc = PartialFC("bce_u_norm", 6, 50, 0.3).double()  # k = 15
    z = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([3, 3, 17, 49, 0, 22, 17, 3, 8, 8, 49, 0, 22, 31, 31, 3])  # 8 distinct classes
    for _ in range(5):
        pfc.head.weight.grad = None
        out = pfc(z, y)
        kept = out.extras["class_index"]
        assert kept.numel() == pfc.num_sample == 15
        assert torch.equal(kept, torch.unique(kept))  # sorted, no repeats
        assert set(y.tolist()) <= set(kept.tolist())
        assert torch.equal(kept[out.extras["labels"]], y)  # remapped labels point at the right centre
        assert out.scores.shape == (16, 15)
        out.loss.backward()
        grad_rows = pfc.head.weight.grad.abs().sum(dim=1)
        dropped = torch.ones(50, dtype=torch.bool)
        dropped[kept] = False
        assert torch.count_nonzero(grad_rows[dropped]) == 0  # non-sampled centres get no gradient
        assert torch.count_nonzero(grad_rows[kept]) == 15
    # fewer slots than positives: keep exactly the positives
    small = PartialFC("softmax_norm", 6, 50, 0.1)  # k = 5 < 8
    out = small(z.float(), y)
    assert out.extras["class_index"].tolist() == sorted(set(y.tolist()))


def test_sampled_step_equals_full_head_on_the_kept_columns():
    torch.manual_seed(0)
    for name, cfg in [("softmax_norm", {"scale": 16.0, "margin": "arcface"}), ("bce_d_norm", {"scale": 32.0})]:
        pfc = PartialFC(name, 6, 40, 0.25, **cfg).double()
        randomised(pfc.head)
        z = torch.randn(10, 6, dtype=torch.float64)
        y = torch.randint(0, 40, (10,))
        z1 = z.clone().requires_grad_(True)
        out = pfc(z1, y)
        out.loss.backward()
        kept = out.extras["class_index"]
        sub = build_head(name, 6, kept.numel(), **cfg).double()
        sub.load_state_dict({k: v[kept] for k, v in pfc.head.state_dict().items()})
        z2 = z.clone().requires_grad_(True)
        ref = sub(z2, torch.searchsorted(kept, y))
        ref.loss.backward()
        assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)
        assert torch.allclose(z1.grad, z2.grad, rtol=1e-10, atol=1e-13)
        assert torch.allclose(pfc.head.weight.grad[kept], sub.weight.grad, rtol=1e-10, atol=1e-13)
        if sub.bias is not None:
            assert torch.allclose(pfc.head.bias.grad[kept], sub.bias.grad, rtol=1e-10, atol=1e-13)


def test_bce_sampling_shrinks_the_negative_sum_unless_rescaled():
    torch.manual_seed(0)
    n, draws = 40, 300
    cfg = {"scale": 32.0, "bias_init": 2.0}
    plain = randomised(PartialFC("bce_u_norm", 6, n, 0.25, **cfg).double().head)
    z = torch.randn(12, 6, dtype=torch.float64)
    y = torch.tensor([1, 1, 2, 5, 5, 5, 9, 9, 30, 30, 2, 1])
    full = build_head("bce_u_norm", 6, n, **cfg).double()
    full.load_state_dict(plain.state_dict())
    target = full(z, y).loss.item()
    means = {}
    for rescale in (False, True):
        pfc = PartialFC("bce_u_norm", 6, n, 0.25, neg_rescale=rescale, **cfg).double()
        pfc.head.load_state_dict(plain.state_dict())
        with torch.no_grad():
            means[rescale] = sum(pfc(z, y).loss.item() for _ in range(draws)) / draws
    # k = 10 of 40 columns, 6 of them positives: the unweighted sum sees ~4/34 of the other negatives
    assert means[False] < 0.6 * target
    assert means[True] == pytest.approx(target, rel=0.03)  # inverse inclusion weights: unbiased


def test_uce_bias_init_follows_the_sample_rate():
    pfc = PartialFC("uce", 4, 1000, 0.1)
    assert pfc.head.bias.item() == pytest.approx(math.log(10 * 0.1 * 1000))
    assert PartialFC({"name": "bce_u_norm"}, 4, 1000).head.bias.item() == pytest.approx(math.log(999))


def test_full_state_dict_round_trip():
    torch.manual_seed(0)
    full = randomised(build_head("bce_d_norm", 4, 9))
    pfc = PartialFC("bce_d_norm", 4, 9, 0.5)
    pfc.load_full_state_dict(full.state_dict())
    state = pfc.full_state_dict()
    assert set(state) == set(full.state_dict())
    assert all(torch.equal(state[k], v) for k, v in full.state_dict().items())
    plain = build_head("bce_d_norm", 4, 9)
    plain.load_state_dict(state)
    momentum = torch.randn(9, 4)
    assert torch.equal(pfc.gather_rows(pfc.split_rows(momentum)), momentum)
    with pytest.raises(ConfigError, match="missing"):
        pfc.load_full_state_dict({"weight": full.weight})


def test_partial_fc_config_errors():
    with pytest.raises(ConfigError, match="class-centre"):
        PartialFC("dismax", 4, 10)
    with pytest.raises(ConfigError, match="neg_rescale"):
        PartialFC("softmax_norm", 4, 10, 0.5, neg_rescale=True)
    with pytest.raises(ConfigError, match="sample_rate"):
        PartialFC("softmax_norm", 4, 10, 0.0)
    with pytest.raises(ConfigError, match="sample_rate"):
        PartialFC("softmax_norm", 4, 10, 1.5)
    with pytest.raises(ConfigError, match="bogus"):
        PartialFC("softmax_norm", 4, 10, bogus=1)
    with pytest.raises(ConfigError, match="unknown head"):
        PartialFC("nope", 4, 10)


# ----------------------------------------------------------------------------- 2 processes, gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(outdir: str, timeout: float = 90.0) -> None:
    ctx = mp.start_processes(dist_worker.worker, args=(2, _free_port(), outdir), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gloo workers did not finish in {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def two_rank_results():
    with tempfile.TemporaryDirectory() as tmp:
        _run_two_ranks(tmp)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.dist
@pytest.mark.parametrize("key", list(dist_worker.CASES))
def test_two_gloo_ranks_rate_one_equal_full_head(two_rank_results, key):
    name, cfg = dist_worker.CASES[key]
    full = dist_worker.full_head(name, cfg)
    z_all, y_all = dist_worker.global_batch(2)
    z = z_all.clone().requires_grad_(True)
    ref = full(z, y_all)
    ref.loss.backward()
    b = dist_worker.BATCH
    for rank, res in enumerate(r[key] for r in two_rank_results):
        start, n = res["start"], res["num_local"]
        assert (start, n) == [(0, 6), (6, 5)][rank]
        assert res["loss"] == pytest.approx(ref.loss.item(), rel=1e-12)
        # each rank's embedding gradient is W × the full-head gradient of its rows (DDP then averages)
        assert torch.allclose(res["z_grad"] / 2, z.grad[rank * b:(rank + 1) * b], rtol=1e-10, atol=1e-13)
        assert torch.allclose(res["w_grad"], full.weight.grad[start:start + n], rtol=1e-10, atol=1e-13)
        if full.bias is not None and full.bias.numel() == 1:  # replicated shared bias: all-reduced gradient
            assert torch.allclose(res["b_grad"], full.bias.grad, rtol=1e-10, atol=1e-13)
        elif full.bias is not None:
            assert torch.allclose(res["b_grad"], full.bias.grad[start:start + n], rtol=1e-10, atol=1e-13)
        state = res["full_state"]  # gathered checkpoint = the unsharded head
        assert all(torch.equal(state[k], v) for k, v in full.state_dict().items())


@pytest.mark.dist
def test_two_gloo_ranks_sampling(two_rank_results):
    for rank, res in enumerate(r["sampled"] for r in two_rank_results):
        assert res["labels_ok"]
        assert len(res["kept"]) == res["num_sample"] == [3, 2][rank]
        assert set(res["positives"]) <= set(res["kept"])
        assert res["positives"] == [[0, 1], [7]][rank]
    assert two_rank_results[0]["sampled"]["loss"] == two_rank_results[1]["sampled"]["loss"]

"""Worker for the 2-process gloo Partial-FC test (spawned; results are written with torch.save)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from facebce.heads import PartialFC, build_head

BATCH, DIM, CLASSES = 6, 5, 11  # 11 classes over 2 ranks: shards of 6 and 5

CASES = {
    "softmax_norm_arcface": ("softmax_norm", {"scale": 16.0, "margin": "arcface"}),
    "bce_u_norm": ("bce_u_norm", {"scale": 32.0}),
    "uce": ("uce", {"scale": 32.0}),
    "bce_d_norm_cosface": ("bce_d_norm", {"scale": 32.0, "margin": "cosface"}),
    "softmax": ("softmax", {}),
}


def global_batch(world: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(BATCH * world, DIM, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (BATCH * world,), generator=g)
    return z, y


def full_head(name: str, cfg: dict) -> torch.nn.Module:
    torch.manual_seed(123)
    head = build_head(name, DIM, CLASSES, **cfg).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn_like(head.weight))
        if head.bias is not None:
            head.bias.add_(0.3 * torch.randn_like(head.bias))
    return head


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = {}
    z_all, y_all = global_batch(world)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    for key, (name, cfg) in CASES.items():
        full = full_head(name, cfg)
        pfc = PartialFC(name, DIM, CLASSES, 1.0, **cfg).double()
        pfc.load_full_state_dict(full.state_dict())
        z = z_all[rows].clone().requires_grad_(True)
        out = pfc(z, y_all[rows])
        out.loss.backward()
        results[key] = {
            "loss": out.loss.item(), "z_grad": z.grad.clone(), "w_grad": pfc.head.weight.grad.clone(),
            "b_grad": None if pfc.head.bias is None else pfc.head.bias.grad.clone(),
            "start": pfc.class_start, "num_local": pfc.num_local, "full_state": pfc.full_state_dict(),
        }
    # sampling across ranks: every positive of the global batch present on its owner
    torch.manual_seed(1000 + rank)
    pfc = PartialFC("bce_u_norm", DIM, CLASSES, 0.5).double()
    y_all = torch.tensor([0, 1, 7])[torch.arange(BATCH * world) % 3]  # few classes: k >= |P| on both ranks
    out = pfc(z_all[rows].clone(), y_all[rows])
    ids, labels = out.extras["class_index"], out.extras["labels"]
    mine = (y_all >= pfc.class_start) & (y_all < pfc.class_start + pfc.num_local)
    results["sampled"] = {
        "kept": ids.tolist(), "num_local": pfc.num_local, "num_sample": pfc.num_sample,
        "positives": sorted(set(y_all[mine].tolist())),
        "labels_ok": bool(torch.equal(ids[labels[mine]], y_all[mine])) and bool((labels[~mine] == -1).all()),
        "loss": out.loss.item(),
    }
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()

"""Collectives used by the losses and Partial-FC; every helper is a no-op for a single process.

`group=None` means "no collectives" (single process, or torch.distributed not initialised).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function


def resolve_group(process_group=None):
    """-> (group or None, rank, world size).  None when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1:
        return None, 0, 1
    return group, dist.get_rank(group), world


def all_reduce_(t: Tensor, group, op=None) -> Tensor:
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t


def all_reduce_max_(t: Tensor, group) -> Tensor:
    return all_reduce_(t, group, dist.ReduceOp.MAX if group is not None else None)


def all_gather_nograd(x: Tensor, group) -> Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0 (no autograd)."""
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


class _AllGatherRows(Function):
    """Forward: concatenation of every rank's rows.  Backward: each rank receives the SUM over ranks
    of the gradient of its own rows, times the world size W (arcface_torch), so that DDP's 1/W
    averaging of backbone gradients yields the gradient of the global-mean loss."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.world = dist.get_world_size(group)
        ctx.rows = x.shape[0]
        return all_gather_nograd(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty((ctx.rows,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        else:  # gloo has no reduce_scatter: reduce everything, keep our rows
            grad = grad.clone()
            dist.all_reduce(grad, group=ctx.group)
            out = grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
        return out * ctx.world, None


def all_gather_rows(x: Tensor, group) -> Tensor:
    if group is None:
        return x
    return _AllGatherRows.apply(x, group)


class _SumGradAcrossRanks(Function):
    """Identity forward; backward all-reduces (SUM) the gradient.  For parameters replicated on
    every rank but outside DDP (Partial-FC's shared bias), whose per-rank gradient is partial."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_grad_across_ranks(x: Optional[Tensor], group) -> Optional[Tensor]:
    if group is None or x is None:
        return x
    return _SumGradAcrossRanks.apply(x, group)

"""Partial FC: class centres sharded over ranks, a sampled fraction of negatives per step (docs/heads.md §7;
arcface_torch `partial_fc_v2.py`, An et al. CVPR 2022), for every class-centre head.

Per step: all-gather the embeddings (autograd-aware) and labels -> global batch of B·W rows; labels
outside this rank's shard become −1, the others are shifted by −start; with sample_rate ρ < 1 keep
the local positives plus ⌊ρ·n_r⌋ − |P| uniformly drawn other local classes (only P when that is
negative), sorted, labels remapped by a sorted search; the head's own `_step` computes scores, margin,
bias and loss on the kept columns.

Losses across shards:
- softmax heads: exact softmax CE over all kept columns of all ranks (MAX / SUM all-reduces).
- BCE heads (bce_u/bce_d[_norm], uce): every rank sums its own terms over the B·W rows, divided by
  B·W; the returned value is all-reduced (SUM) for logging, the gradient is the local one.  The shared
  bias b is replicated and outside DDP: its gradient is all-reduced (SUM).
Embedding gradients: each rank gets the SUM over ranks of the gradients of its own rows, times W,
so that DDP's 1/W averaging of backbone gradients gives the gradient of the global-mean loss.

BCE/UCE under sampling (ρ < 1): by default (`neg_rescale=False`, UniFace parity) the negative sum runs
over the kept columns only, so the loss and the stationary bias correspond to ≈ρN negatives per
sample — UniFace's init ln(10·ρ·N) (the `uce` head gets r = ρ) accounts for this; the learned b then
sits roughly ½·ln(1/ρ) below the full-head value (docs/heads.md §2's b* with rN classes).  With
`neg_rescale=True` each randomly drawn negative column is weighted (n_r − |P|)/(k − |P|) (inverse
inclusion probability; the always-kept positive columns weigh 1), making loss and gradients unbiased
estimates of the full head's, so b keeps its full-head meaning.

Optimiser-state policy (arcface_torch's): the shard is one dense Parameter; non-sampled rows get an
exactly-zero gradient but still see weight decay and momentum.  Plain `optimizer.state_dict()`
resumes exactly at the same world size; for a different world size use `gather_rows`/`split_rows` on
each per-row state tensor (momentum, Adam moments) and `full_state_dict`/`load_full_state_dict` for
the weights (world-size-independent, same keys as the unsharded head).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from facebce.errors import ConfigError
from facebce.heads._dist import all_gather_nograd, all_gather_rows, all_reduce_, resolve_group, sum_grad_across_ranks
from facebce.heads.base import ClassCentreHead, HeadOutput
from facebce.heads.bce import BCEHead
from facebce.heads.checks import check_bool, check_number
from facebce.heads.registry import check_config, head_class


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """-> (start, size): `n_r = ⌊N/W⌋ + [r < N mod W]`, `start_r = r⌊N/W⌋ + min(r, N mod W)`."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + int(rank < extra)


def num_sampled(sample_rate: float, num_local: int) -> int:
    """⌊ρ·n⌋ with ρ taken as the decimal it was written as (0.29·100 = 29, not int(28.999…))."""
    return math.floor(Fraction(repr(float(sample_rate))) * num_local)


class PartialFC(nn.Module):
    """`PartialFC(head, embedding_size, num_classes, sample_rate=1.0, process_group=None, neg_rescale=False,
    **head_cfg)`; `head` is a registered class-centre head name or a `{"name": ..., **cfg}` mapping.

    Works without torch.distributed (world size 1: only sampling).  Local batch sizes must be equal on
    every rank.  `forward` returns a HeadOutput whose logits/scores cover the kept local columns
    (global class ids in extras["class_index"]).
    """

    def __init__(self, head: Union[str, Mapping[str, Any]], embedding_size: int, num_classes: int,
                 sample_rate: float = 1.0, process_group=None, *, neg_rescale: bool = False,
                 **head_cfg: Any) -> None:
        super().__init__()
        if isinstance(head, Mapping):
            cfg = {k: v for k, v in head.items() if k != "name"}
            if "name" not in head:
                raise ConfigError("head.name: missing")
            name = head["name"]
        else:
            name, cfg = head, {}
        cfg.update(head_cfg)
        cls = head_class(name)
        if not issubclass(cls, ClassCentreHead):
            raise ConfigError(f"head: Partial-FC needs a class-centre head, {name!r} is not one "
                              "(supported: softmax, softmax_norm, bce_u, bce_d, bce_u_norm, bce_d_norm, uce)")
        check_config(name, cfg)
        self.sample_rate = check_number("sample_rate", sample_rate, positive=True, high=1.0)
        self.neg_rescale = check_bool("neg_rescale", neg_rescale)
        if neg_rescale and not issubclass(cls, BCEHead):
            raise ConfigError("neg_rescale: only applies to BCE-family heads (bce_*, uce)")
        if name == "uce" and "r" not in cfg:
            cfg["r"] = self.sample_rate
        self.group, self.rank, self.world_size = resolve_group(process_group)
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        if num_classes < self.world_size:
            raise ConfigError(f"num_classes: {num_classes} classes cannot be sharded over {self.world_size} ranks")
        self.class_start, self.num_local = shard_range(num_classes, self.world_size, self.rank)
        self.num_sample = num_sampled(self.sample_rate, self.num_local)
        self.head: ClassCentreHead = cls(embedding_size, self.num_local, _total_classes=num_classes, **cfg)
        self.generator: Optional[torch.Generator] = None  # sampling RNG; None = torch's global RNG
        self.last_index: Optional[Tensor] = None  # local indices kept in the last step

    # -------------------------------------------------------------------------- training step
    @torch.no_grad()
    def sample(self, local_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (kept local indices, sorted; remapped labels; boolean 'is a positive' per kept column)."""
        valid = local_labels >= 0
        positive = torch.unique(local_labels[valid], sorted=True)
        if self.num_sample >= positive.numel():
            perm = torch.rand(self.num_local, generator=self.generator, device=local_labels.device)
            perm[positive] = 2.0
            index = torch.topk(perm, self.num_sample, sorted=False).indices.sort().values
        else:
            index = positive
        remapped = local_labels.clone()
        remapped[valid] = torch.searchsorted(index, local_labels[valid])
        return index, remapped, torch.isin(index, positive)

    def forward(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        head, group = self.head, self.group
        labels = labels.reshape(-1).long()
        z = all_gather_rows(embeddings, group)
        y = all_gather_nograd(labels, group)
        local = y - self.class_start
        local = torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))
        index, neg_weight = None, None
        if self.sample_rate < 1.0:
            index, local, is_pos = self.sample(local)
            if self.neg_rescale:
                n_pos = int(is_pos.sum())
                drawn = index.numel() - n_pos
                factor = (self.num_local - n_pos) / drawn if drawn > 0 else 1.0
                neg_weight = torch.where(is_pos, 1.0, factor).to(head.weight.dtype)
        self.last_index = index
        weight = head.weight if index is None else head.weight[index]
        bias = head._bias_cols(index)
        if head.bias_mode == "unified":
            bias = sum_grad_across_ranks(bias, group)
        loss, logits, scores = head._step(z, local, weight, bias, denom=z.shape[0], group=group,
                                          neg_weight=neg_weight)
        if group is not None and isinstance(head, BCEHead):
            total = all_reduce_(loss.detach().clone(), group)
            loss = loss + (total - loss.detach())
        ids = torch.arange(self.num_local, device=labels.device) if index is None else index
        return HeadOutput(loss=loss, logits=logits, scores=scores,
                          bias=None if head.bias is None else head.bias.detach(),
                          extras={"class_index": ids + self.class_start, "labels": local})

    def scores(self, embeddings: Tensor) -> Tensor:
        """Bias-free scores against this rank's classes [class_start, class_start + num_local)."""
        return self.head.scores(embeddings)

    @property
    def bias(self) -> Optional[Tensor]:
        return self.head.bias

    @property
    def threshold(self) -> Optional[float]:
        return self.head.threshold

    # -------------------------------------------------------------------------- checkpoints
    def gather_rows(self, local: Tensor) -> Tensor:
        """Full (N, ...) tensor from every rank's (n_r, ...) rows (weights or per-row optimiser state)."""
        if local.shape[0] != self.num_local:
            raise ValueError(f"gather_rows: expected {self.num_local} rows, got {local.shape[0]}")
        if self.group is None:
            return local.detach().clone()
        width = shard_range(self.num_classes, self.world_size, 0)[1]
        padded = local.new_zeros((width,) + tuple(local.shape[1:]))
        padded[: self.num_local] = local.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        sizes = [shard_range(self.num_classes, self.world_size, r)[1] for r in range(self.world_size)]
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def split_rows(self, full: Tensor) -> Tensor:
        """This rank's rows of a full (N, ...) tensor."""
        if full.shape[0] != self.num_classes:
            raise ValueError(f"split_rows: expected {self.num_classes} rows, got {full.shape[0]}")
        return full[self.class_start:self.class_start + self.num_local].clone()

    def full_state_dict(self) -> dict[str, Tensor]:
        """World-size-independent state: the unsharded head's keys (e.g. 'weight', 'bias').  A
        collective: call it on every rank."""
        sharded = set(self.head.sharded_names())
        return {k: (self.gather_rows(v) if k in sharded else v.detach().clone())
                for k, v in self.head.state_dict().items()}

    def load_full_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load an unsharded head's state (from `full_state_dict` at any world size, or a plain head)."""
        sharded = set(self.head.sharded_names())
        own = self.head.state_dict()
        missing = set(own) - set(state)
        unexpected = set(state) - set(own)
        if missing or unexpected:
            raise ConfigError(f"state_dict: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        self.head.load_state_dict({k: (self.split_rows(v) if k in sharded else v) for k, v in state.items()})

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, sample_rate={self.sample_rate:g}, rank={self.rank}, "
                f"world_size={self.world_size}, class_start={self.class_start}, num_local={self.num_local}, "
                f"num_sample={self.num_sample}, neg_rescale={self.neg_rescale}")

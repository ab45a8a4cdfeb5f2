"""arcface_torch's own training step as the peer of facebce's (`make bench --peer-arcface DIR`, issue 17).

DIR is a copy of insightface's `recognition/arcface_torch` folder; nothing of it lives in facebce. Its
modules are loaded from DIR by file path (backbones/, losses.py, partial_fc_v2.py) and one step is made
as train_v2.py makes it: `get_model(network, dropout=0.0, fp16=False, num_features=512)`,
`CombinedMarginLoss(64, *margin_list, interclass_filtering_threshold)` with configs/base.py's ArcFace
margins (1.0, 0.5, 0.0), `PartialFC_V2(margin_loss, 512, num_classes, sample_rate=1.0, fp16=False)`,
SGD over both (lr 0.1, momentum 0.9, weight decay 5e-4), then per step: forward, Partial-FC loss,
backward, `clip_grad_norm_(backbone, 5)`, `opt.step()`, `opt.zero_grad()`, `loss.item()`.

Their code is written for CUDA; on a CPU the step runs under SHIMS (printed by the bench):
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist

SHIMS = (
    "torch.Tensor.cuda and torch.nn.Module.cuda return self (their code moves every tensor and module with .cuda())",
    "torch.cuda.amp.autocast(False) is a no-op context (their fp16=False path: fp32 throughout, no fp16 autocast, "
    "no GradScaler)",
    "torch.distributed is a single-process gloo group (world size 1) for PartialFC_V2's all_gather/all_reduce",
    "the backbone is not wrapped in DistributedDataParallel (train_v2.py does; with one process DDP only adds an "
    "all-reduce of the gradients, so the peer is if anything faster than train_v2.py's)",
)
__doc__ += "".join(f"\n  - {s}" for s in SHIMS) + "\n"

# what the bench imports from DIR (the names train_v2.py imports)
REQUIRED = {"backbones/__init__.py": "get_model", "losses.py": "CombinedMarginLoss",
            "partial_fc_v2.py": "PartialFC_V2"}
MARGIN_LIST = (1.0, 0.5, 0.0)  # configs/base.py: ArcFace
SCALE = 64                     # train_v2.py passes 64
LR, MOMENTUM, WEIGHT_DECAY, CLIP = 0.1, 0.9, 5e-4, 5.0  # configs/base.py, train_v2.py


class PeerError(Exception):
    """DIR is not a usable arcface_torch folder; the message is one line naming DIR."""


@dataclass
class Peer:
    folder: Path
    get_model: object
    CombinedMarginLoss: type
    PartialFC_V2: type


def _load(name: str, path: Path, package_dir: Path | None = None) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_peer(folder) -> Peer:
    """Import arcface_torch's backbones, losses and partial_fc_v2 from `folder` (under private module
    names, so they cannot collide with anything else called `losses` or `backbones`)."""
    folder = Path(folder)
    where = f"--peer-arcface {folder}"
    if not folder.is_dir():
        raise PeerError(f"{where}: no such folder (give a copy of insightface's recognition/arcface_torch)")
    missing = [f for f in REQUIRED if not (folder / f).is_file()]
    if missing:
        raise PeerError(f"{where}: not an arcface_torch folder: missing {', '.join(missing)}")
    prefix = f"_peer_arcface_{abs(hash(str(folder.resolve())))}"
    sys.path.insert(0, str(folder))  # for whatever else their modules import from their own folder
    try:
        with cuda_shims():  # their modules may touch CUDA at import time
            backbones = _load(f"{prefix}_backbones", folder / "backbones" / "__init__.py", folder / "backbones")
            losses = _load(f"{prefix}_losses", folder / "losses.py")
            pfc = _load(f"{prefix}_partial_fc_v2", folder / "partial_fc_v2.py")
    except Exception as e:  # their code, any failure: one line, the bench goes on without the peer
        first = (str(e).strip().splitlines() or [""])[0]
        raise PeerError(f"{where}: importing arcface_torch failed: {type(e).__name__}: {first}") from None
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))
    got = {}
    for (file, attr), module in zip(REQUIRED.items(), (backbones, losses, pfc)):
        if not hasattr(module, attr):
            raise PeerError(f"{where}: {file} has no {attr}")
        got[attr] = getattr(module, attr)
    return Peer(folder, got["get_model"], got["CombinedMarginLoss"], got["PartialFC_V2"])


@contextlib.contextmanager
def cuda_shims():
    """The CPU shims of SHIMS (the first two), undone on exit so nothing else in the process sees them."""
    saved = (torch.Tensor.cuda, torch.nn.Module.cuda, torch.cuda.amp.autocast)

    def no_autocast(enabled=True, *args, **kwargs):
        if enabled:
            raise RuntimeError("the peer bench runs arcface_torch in fp32 (fp16=False); fp16 autocast needs CUDA")
        return contextlib.nullcontext()
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.amp.autocast = no_autocast
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda, torch.cuda.amp.autocast = saved


class ProcessGroup:
    """A single-process gloo group (file:// rendezvous in a temp folder, no port to pick), or the
    caller's group when one exists and has one process."""

    def __init__(self):
        self.created = False
        self._tmp = None
        if dist.is_initialized():
            if dist.get_world_size() != 1:
                raise PeerError("--peer-arcface: torch.distributed already has "
                                f"{dist.get_world_size()} processes; the peer bench needs one")
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="peer_arcface_")
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(self._tmp.name, 'rendezvous')}",
                                rank=0, world_size=1)
        self.created = True

    def close(self):
        if self.created:
            dist.destroy_process_group()
            self.created = False
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class PeerStep:
    """arcface_torch's model, margin loss, Partial-FC and SGD for `network` at `num_classes`, and its
    train_v2.py step on the fixed batch (images, labels). Needs a torch.distributed group (ProcessGroup)."""

    def __init__(self, peer: Peer, network: str, num_classes: int, images: torch.Tensor, labels: torch.Tensor,
                 embedding_size: int = 512):
        self.images, self.labels = images, labels
        with cuda_shims():
            self.backbone = peer.get_model(network, dropout=0.0, fp16=False, num_features=embedding_size).cuda()
            self.backbone.train()
            margin_loss = peer.CombinedMarginLoss(SCALE, *MARGIN_LIST, 0)
            self.pfc = peer.PartialFC_V2(margin_loss, embedding_size, num_classes, 1.0, False)
            self.pfc.train().cuda()
            self.opt = torch.optim.SGD(params=[{"params": self.backbone.parameters()},
                                               {"params": self.pfc.parameters()}],
                                       lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step(self) -> float:
        """One optimizer step; returns the loss (train_v2.py reads loss.item() every step too)."""
        with cuda_shims():
            embeddings = self.backbone(self.images)
            loss = self.pfc(embeddings, self.labels.clone())  # PartialFC_V2 squeezes its labels in place
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), CLIP)
            self.opt.step()
            self.opt.zero_grad()
            return loss.item()

"""Training checkpoints: atomic, world-size independent, loadable with `torch.load(weights_only=True)`.

A checkpoint (`<run>/checkpoints/step_00001000.pt`) holds everything `--resume` needs to continue
exactly: the backbone's state_dict (insightface layout), the FULL head (Partial-FC shards gathered,
so any world size can load it), the optimizer state keyed by parameter name with per-class rows
gathered the same way (momentum / Adam moments of every class: arcface_torch's policy, where
unsampled rows keep decaying and carrying momentum), the GradScaler, the step and data position,
every rank's RNG states (python, numpy, torch, CUDA, Partial-FC's sampling generator) and the
resolved config. Only plain containers, numbers, strings and tensors are stored.

Writes go through `facebce.fileio.atomic_open` (a temporary file in the same folder, fsynced and
renamed over the final name), so a crash mid-write leaves the previous checkpoints intact and never
a half-written file under a checkpoint name. Reads go through `facebce.fileio.torch_load_weights_only`:
a damaged or malicious file is one line naming it, never torch's multi-line text.
"""
from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from facebce.errors import FacebceError, ModelError
from facebce.fileio import atomic_open, torch_load_weights_only
from facebce.models import load_insightface_weights

FORMAT = "facebce-train-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")


# ------------------------------------------------------------------------------------ files
def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """torch.save through `facebce.fileio.atomic_open`: temp file beside `path`, fsync, rename, fsync the folder."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return path


def checkpoint_path(folder: Union[str, os.PathLike], step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.pt"


def list_checkpoints(folder: Union[str, os.PathLike]) -> list[Path]:
    """Checkpoint files in `folder`, oldest step first (temp files are never listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """Read a training checkpoint safely (weights_only); one-line FacebceError naming the file otherwise
    ('not a weights-only checkpoint: it contains posix.system', 'truncated or not a torch file')."""
    path = Path(path)
    if not path.is_file():
        raise FacebceError(f"{path}: no such checkpoint")
    ckpt = torch_load_weights_only(path, what="checkpoint")
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != FORMAT:
        raise FacebceError(f"{path}: not a facebce training checkpoint")
    if not isinstance(ckpt.get("version", 0), int) or ckpt.get("version", 0) > VERSION:
        raise FacebceError(f"{path}: checkpoint version {ckpt['version']!r} is newer than this facebce ({VERSION})")
    return dict(ckpt)


def latest_checkpoint(folder: Union[str, os.PathLike], *, older: bool = False,
                      report: Optional[Callable[[str], None]] = None) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint in `folder` and its contents, or None when there is none.

    A newest checkpoint that does not load (truncated, malicious, not facebce's) is never skipped
    silently: by default it is a one-line FacebceError naming it and why, which points at
    `--resume-older`; with `older=True` the newest one that loads is used and each skipped one is
    passed to `report` (default: a line on stderr) with the reason.
    """
    skipped: list[str] = []
    for path in reversed(list_checkpoints(folder)):
        try:
            found = path, load_checkpoint(path)
        except FacebceError as e:
            if not older:
                older_ones = len(list_checkpoints(folder)) - 1
                raise FacebceError(f"--resume: newest checkpoint refused: {e}; not resuming from an older one "
                                   f"silently ({older_ones} older in {Path(folder)}): remove it or pass "
                                   f"--resume-older") from None
            skipped.append(f"skipped checkpoint {e}")
            continue
        for line in skipped:
            (report or _stderr)(f"{line}; resuming from {path.name}")
        return found
    for line in skipped:
        (report or _stderr)(line)
    return None


def _stderr(line: str) -> None:
    print(f"facebce: {line}", file=sys.stderr)


def prune_checkpoints(folder: Union[str, os.PathLike], keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep=0: delete nothing)."""
    if keep > 0:
        for path in list_checkpoints(folder)[:-keep]:
            path.unlink(missing_ok=True)


def load_backbone_init(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """`--init-backbone`: an insightface-layout .pth (plain state_dict) or a facebce training checkpoint."""
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise ModelError(f"{where}: no such checkpoint file")
    state = torch_load_weights_only(where, what="checkpoint")
    if isinstance(state, Mapping) and state.get("format") == FORMAT:
        state = state["backbone"]
    load_insightface_weights(model, state, where=where)


# ------------------------------------------------------------------------------------ RNG
def rng_state(generator: Optional[torch.Generator] = None) -> dict:
    """This process's RNG states as tensors and numbers (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "sampler": generator.get_state() if generator is not None else None,
    }
    return state


def set_rng_state(state: Mapping, generator: Optional[torch.Generator] = None) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["gauss"])))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state.get("sampler") is not None:
        generator.set_state(state["sampler"])


def gather_objects(obj: Any, group) -> list:
    """[obj of rank 0, obj of rank 1, ...] (a collective), or [obj] on one process."""
    if group is None:
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# ------------------------------------------------------------------------------ optimizer
def _is_row_state(value: Any, param: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == param.shape


def optimizer_state(optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, nn.Parameter]],
                    sharded: Mapping[str, Any]) -> dict:
    """{param name: {state key: value}}, per-class rows of `sharded` params (name -> PartialFC)
    gathered to all classes. A collective when `sharded` is: every rank must call it."""
    out: dict = {}
    for name, p in named_params:
        st = optimizer.state.get(p)
        if not st:
            continue
        pfc = sharded.get(name)
        out[name] = {k: (pfc.gather_rows(v) if pfc is not None and _is_row_state(v, p)
                         else (v.detach().cpu().clone() if torch.is_tensor(v) else v))
                     for k, v in st.items()}
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, nn.Parameter]],
                         sharded: Mapping[str, Any], state: Mapping[str, Mapping]) -> None:
    """Inverse of `optimizer_state` (this rank's rows of sharded params); hyper-parameters stay the config's."""
    params = dict(named_params)
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise FacebceError(f"checkpoint: optimizer state for unknown parameters {unknown[:5]}")
    for name, st in state.items():
        p, pfc = params[name], sharded.get(name)
        restored = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                if pfc is not None and v.dim() > 0 and v.shape[0] == pfc.num_classes and v.shape[1:] == p.shape[1:]:
                    v = pfc.split_rows(v)
                if v.dim() > 0 and v.shape != p.shape:
                    raise FacebceError(f"checkpoint: optimizer state {name}.{k} has shape {tuple(v.shape)}, "
                                       f"parameter has {tuple(p.shape)}")
                v = v.to(p.device) if k != "step" else v  # Adam's step counter stays where torch keeps it
            restored[k] = v
        optimizer.state[p] = restored

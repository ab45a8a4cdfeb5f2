"""The backbone registry (`register_backbone`, `build_backbone`, `list_backbones`,
`describe_backbones`) with facebce's own backbones registered, and loading of insightface
arcface_torch checkpoints (`load_insightface_weights`). `facebce.models` exposes these names and
loads this module, and torch with it, on first use."""
from __future__ import annotations

import inspect
import numbers
import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

from facebce.errors import FacebceError, ModelError
from facebce.fileio import torch_load_weights_only
from facebce.models.iresnet import IResNet, iresnet18, iresnet34, iresnet50, iresnet100, iresnet200
from facebce.models.mobilefacenet import MobileFaceNet, mobilefacenet

__all__ = ["IResNet", "MobileFaceNet", "build_backbone", "describe_backbones", "list_backbones",
           "load_insightface_weights", "register_backbone"]

# What a builder raises on an option value it cannot use; build_backbone turns them into one ModelError line.
BUILD_ERRORS = (TypeError, ValueError, RuntimeError, OverflowError, KeyError, IndexError, ZeroDivisionError,
                AttributeError, MemoryError)
_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}


def register_backbone(name: str, *aliases: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a builder `f(embedding_size=512, dropout=0.0, **options) -> nn.Module` as `name`.

    `aliases` (e.g. insightface's function names) are accepted by `build_backbone` but not listed.
    """
    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        for n in (name, *aliases):
            if n in _BUILDERS or n in _ALIASES:
                raise ModelError(f"backbone name {n!r} is already registered")
        _BUILDERS[name] = builder
        _ALIASES.update(dict.fromkeys(aliases, name))
        return builder
    return decorate


def list_backbones() -> list[str]:
    """The registered backbone names (without aliases), in registration order."""
    return list(_BUILDERS)


def build_backbone(name: str, embedding_size: int = 512, dropout: float = 0.0, **kwargs) -> nn.Module:
    """A freshly initialised backbone; `kwargs` are the family's options (e.g. `zero_init_residual`)."""
    key = _ALIASES.get(name, name)
    if key not in _BUILDERS:
        raise ModelError(f"unknown backbone {name!r}; valid names: {', '.join(list_backbones())}")
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, numbers.Integral) or embedding_size <= 0:
        raise ModelError(f"embedding_size={embedding_size!r}: expected a positive int")
    if not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout={dropout!r}: expected a probability in [0, 1)")
    builder = _BUILDERS[key]
    try:
        inspect.signature(builder).bind(embedding_size=embedding_size, dropout=dropout, **kwargs)
    except TypeError as e:
        raise ModelError(f"backbone {key!r}: bad option(s) {sorted(kwargs)}: {e}") from None
    try:
        return builder(embedding_size=int(embedding_size), dropout=float(dropout), **kwargs)
    except BUILD_ERRORS as e:  # an option of the right name but an unusable value (a string, a negative size)
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:160]
        raise ModelError(f"backbone {key!r}: options {kwargs} refused by its builder "
                         f"({type(e).__name__}: {first})") from None


register_backbone("r18", "iresnet18")(iresnet18)
register_backbone("r34", "iresnet34")(iresnet34)
register_backbone("r50", "iresnet50")(iresnet50)
register_backbone("r100", "iresnet100")(iresnet100)
register_backbone("r200", "iresnet200")(iresnet200)
register_backbone("mbf", "mobilefacenet", "get_mbf")(mobilefacenet)


def _first(items: list[str], n: int = 5) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_insightface_weights(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping, *,
                             where: str | None = None) -> nn.Module:
    """Load an arcface_torch backbone checkpoint (a plain state_dict `.pth`) into `model`, strictly.

    Reads with `weights_only=True` (no arbitrary unpickling), strips the `module.` prefix that
    DistributedDataParallel adds, and raises ModelError naming the missing / unexpected keys and
    shape mismatches, which is what tells a wrong architecture or embedding size apart.
    `where` names the state_dict's file in errors when a mapping is passed (e.g. read from a
    training checkpoint). A file that is not weights-only (a pickle referencing code) or not a
    torch file at all is one ModelError line naming it. Returns `model`.
    """
    if isinstance(path_or_state_dict, Mapping):
        where, state = where or "state_dict", path_or_state_dict
    else:
        where = os.fspath(path_or_state_dict)
        try:
            state = torch_load_weights_only(where, what="checkpoint")
        except FacebceError as e:
            raise ModelError(str(e)) from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        keys = _first([repr(k) for k in state]) if isinstance(state, Mapping) else type(state).__name__
        raise ModelError(f"{where}: expected a state_dict (parameter name -> tensor), got {keys}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        problems = [f"{label} ({len(items)}): {_first(items)}"
                    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                         ("shape mismatches", mismatched)) if items]
        raise ModelError(f"{where} does not fit {type(model).__name__}"
                         f"(embedding_size={getattr(model, 'embedding_size', '?')}): " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model


def describe_backbones(embedding_size: int = 512) -> list[dict]:
    """Name, class and parameter count of every registered backbone (built on the meta device: no memory)."""
    rows = []
    for name in list_backbones():
        with torch.device("meta"):
            model = build_backbone(name, embedding_size=embedding_size)
        rows.append({"name": name, "class": type(model).__name__, "embedding_size": embedding_size,
                     "parameters": sum(p.numel() for p in model.parameters())})
    return rows

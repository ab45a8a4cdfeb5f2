"""Training recipes: YAML -> typed `TrainConfig`, with `base:` inheritance and `--set a.b=value` overrides.

A recipe is a few lines over a base (arcface_torch style)::

    base: base.yaml            # beside this file, else the shipped one; bases may have bases
    model: {arch: r50}
    head: {name: bce_u_norm, scale: 64, sample_rate: 0.2}

Merging is per key, recursively; lists are replaced, not merged. One exception: when a recipe
changes `head.name`, the base's head options are dropped (they belong to the other head), while
`sample_rate` and `neg_rescale` (Partial-FC's) are kept; likewise setting `steps` drops an
inherited `epochs` and vice versa. Every key is checked once, here: an
unknown key or a wrong type raises ConfigError naming the full dotted key (`optim.lr`), and the
head's own options are checked by the head registry.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

import torch

from facebce.errors import ConfigError, DataFormatError, FacebceError, ModelError
from facebce.fileio import atomic_write_text, load_yaml_file
from facebce.heads import build_head, check_config, list_heads
from facebce.models import BUILD_ERRORS, build_backbone
from facebce.resources import recipe_path, resolve_base

DATA_KINDS = ("synthetic", "rec", "folder")
OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("none", "bf16", "fp16", "auto")  # auto: timed at the start (facebce.train.autotune)
PFC_KEYS = ("sample_rate", "neg_rescale")  # head-section keys that belong to Partial-FC, not the head
MAX_INT = 2**63  # every int of a recipe fits an int64 (torch, numpy)
MAX_SEED = 2**32  # seeds feed numpy's legacy seeding (< 2**32) and torch.manual_seed


@dataclass
class SyntheticConfig:
    """Built-in procedural identities (facebce.data.synthetic); `heldout_*` make a verification
    set of identities never trained on, written to `<run dir>/heldout_pairs.bin` and verified on."""

    identities: int = 100
    images: int = 20
    seed: int = 0
    difficulty: float = 1.0
    heldout_identities: int = 0
    heldout_images: int = 10
    heldout_pairs: int = 0


@dataclass
class DataConfig:
    kind: str = "synthetic"
    path: Optional[str] = None          # rec: folder with train.rec/train.idx/property; folder: root/<id>/*.jpg
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    batch_size: int = 128               # per process
    num_workers: int = 2
    cache: bool = False                 # keep decoded samples in memory (small sets: synthetic demo)
    # closed-set val: per identity this fraction of its images is held out of training (at least one
    # stays) and scored against the class centres at every verification (SW/Uni accuracy, t*, bias - t*)
    val_fraction: float = 0.0
    val_seed: int = 0


@dataclass
class ModelConfig:
    arch: str = "r50"
    embedding_size: int = 512
    dropout: float = 0.0
    options: dict = field(default_factory=dict)  # the family's extra options (mbf: scale, blocks)
    init_backbone: Optional[str] = None  # insightface-layout .pth or a facebce checkpoint
    freeze_backbone_steps: int = 0       # train only the head for this many steps (backbone in eval mode)


@dataclass
class HeadConfig:
    """`name` + the head's own options (`options`, flat in YAML) + Partial-FC's `sample_rate`/`neg_rescale`."""

    name: str = "bce_u_norm"
    sample_rate: float = 1.0
    neg_rescale: bool = False
    options: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # adamw
    warmup_steps: Optional[int] = None  # takes precedence over warmup_epochs
    warmup_epochs: float = 0.0
    power: float = 2.0                  # polynomial decay to 0 at the last step (arcface_torch PolyScheduler)
    grad_clip: Optional[float] = 5.0    # max L2 norm of the backbone gradient (arcface_torch: 5); null = off
    grad_accum: int = 1


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None           # the run directory; default runs/<recipe name>
    every_steps: int = 1000
    keep: int = 2                       # newest periodic checkpoints kept (0 = all)


@dataclass
class VerificationConfig:
    bins: list = field(default_factory=list)  # .bin paths (lfw.bin, cfp_fp.bin, agedb_30.bin, ...)
    every_steps: int = 2000
    flip: bool = True
    batch_size: int = 64


@dataclass
class LogConfig:
    every_steps: int = 50
    tensorboard: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    log: LogConfig = field(default_factory=LogConfig)
    steps: Optional[int] = None         # optimizer steps; or
    epochs: Optional[float] = None
    amp: str = "auto"                   # none | bf16 | fp16 | auto (the fastest that keeps fp32's gradient)
    channels_last: Union[bool, str] = "auto"  # true | false | auto
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    num_threads: Optional[int] = None   # torch intra-op threads per process (CPU)

    def to_dict(self) -> dict:
        """Plain YAML-able dict, head options flat again (the format `load_config` reads)."""
        d = dataclasses.asdict(self)
        d["head"] = {k: v for k, v in d["head"].items() if k != "options"} | dict(self.head.options)
        return d


# --------------------------------------------------------------------------------------- loading
def load_config(path: Union[str, os.PathLike, None] = None, overrides: Optional[list[str]] = None, *,
                data: Optional[Mapping] = None) -> TrainConfig:
    """Read a recipe (following `base:` links), apply `key.path=value` overrides, validate."""
    raw: dict = {}
    if path is not None:
        raw = _read_recipe(recipe_path(path), ())
    if data is not None:
        raw = merge(raw, _plain(data, "<dict>"))
    for item in overrides or []:
        raw = merge(raw, parse_override(item))
    cfg = _build(TrainConfig, raw, "")
    validate(cfg)
    return cfg


def _read_recipe(path: Path, chain: tuple) -> dict:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"base: recipe inheritance loops: {' -> '.join(str(p) for p in chain + (path,))}")
    if not path.is_file():
        raise ConfigError(f"base: recipe file not found: {path}" if chain else f"recipe: file not found: {path}")
    try:
        doc = load_yaml_file(path, what="recipe")  # one line: not UTF-8, YAML syntax (line, column)
    except DataFormatError as e:
        raise ConfigError(f"recipe: {e}") from None
    doc = _plain({} if doc is None else doc, str(path))
    base = doc.pop("base", None)
    if base is None:
        return doc
    if not isinstance(base, str):
        raise ConfigError(f"base: expected a recipe file name, got {base!r} in {path}")
    return merge(_read_recipe(resolve_base(base, path), chain + (path,)), doc)


def _plain(doc: Any, where: str) -> dict:
    if not isinstance(doc, Mapping):
        raise ConfigError(f"recipe: {where} must be a mapping of sections, got {type(doc).__name__}")
    return dict(doc)


def merge(base: Mapping, override: Mapping) -> dict:
    """Recursive dict merge; a changed `head.name` drops the base head's options."""
    out = dict(base)
    for key, value in override.items():
        other = "epochs" if key == "steps" else "steps"
        if key in ("steps", "epochs") and value is not None and other not in override:
            out.pop(other, None)  # the run length is one or the other: an override replaces the inherited one
        if key == "head" and isinstance(value, Mapping) and isinstance(out.get("head"), Mapping) \
                and "name" in value and value["name"] != out["head"].get("name"):
            out["head"] = {k: v for k, v in out["head"].items() if k in PFC_KEYS}
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> dict:
    """`optim.lr=0.05` -> {'optim': {'lr': 0.05}}; the value is read as YAML (`[a, b]`, `null`, `true`)."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{key}: --set value {text!r} is not valid YAML ({problem})") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


# ------------------------------------------------------------------------------- typed building
def _build(cls, raw: Any, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict = {}
    if cls is HeadConfig:  # flat in YAML: everything else is the head's own option
        kwargs["options"] = {k: v for k, v in raw.items() if k not in names or k == "options"}
        raw = {k: v for k, v in raw.items() if k in names and k != "options"}
        for k in kwargs["options"]:
            if not isinstance(k, str):
                raise ConfigError(f"{prefix}{k!r}: keys must be strings")
    for key, value in raw.items():
        if key not in names:
            valid = ", ".join(n for n in names)
            raise ConfigError(f"{prefix}{key}: unknown key; valid: {valid}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp, value: Any, key: str):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for tp in inner[:-1]:  # several types (channels_last: bool or "auto"): the first that takes the value
            try:
                return _coerce(tp, value, key)
            except ConfigError:
                pass
        try:
            return _coerce(inner[-1], value, key)
        except ConfigError:
            if len(inner) == 1:
                raise
        names = " or ".join(getattr(a, "__name__", str(a)) for a in inner)
        raise ConfigError(f"{key}: expected {names}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= MAX_INT:
                raise ConfigError(f"{key}: {value} is out of range (|value| < 2**63)")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
        if isinstance(value, str):  # PyYAML reads `5e-4` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:  # pragma: no cover - a field type this module forgot to handle
        raise TypeError(f"{key}: unsupported field type {tp}")
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key}: expected {name}, got {value!r} ({type(value).__name__})")


# -------------------------------------------------------------------------------- validation
def _need(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: TrainConfig) -> None:
    """Value checks that types alone cannot express; every message names its key."""
    d, s = cfg.data, cfg.data.synthetic
    _need(d.kind in DATA_KINDS, "data.kind", f"{d.kind!r} is not one of {', '.join(DATA_KINDS)}")
    _need(d.kind == "synthetic" or bool(d.path), "data.path", f"required for data.kind={d.kind!r}")
    _need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    _need(0 <= d.val_seed < MAX_SEED, "data.val_seed", f"must be in [0, 2**32), got {d.val_seed}")
    if d.kind == "synthetic":
        _need(s.identities >= 2, "data.synthetic.identities", f"must be >= 2, got {s.identities}")
        _need(s.images >= 1, "data.synthetic.images", f"must be >= 1, got {s.images}")
        _need(s.difficulty >= 0, "data.synthetic.difficulty", f"must be >= 0, got {s.difficulty}")
        _need(0 <= s.seed < MAX_SEED, "data.synthetic.seed", f"must be in [0, 2**32), got {s.seed}")
        if s.heldout_pairs:
            _need(s.heldout_pairs >= 20 and s.heldout_pairs % 2 == 0, "data.synthetic.heldout_pairs",
                  f"must be even and >= 20 (10 folds), got {s.heldout_pairs}")
            _need(s.heldout_identities >= 2, "data.synthetic.heldout_identities",
                  f"must be >= 2 when heldout_pairs is set, got {s.heldout_identities}")
            _need(s.heldout_images >= 2, "data.synthetic.heldout_images", f"must be >= 2, got {s.heldout_images}")
    m = cfg.model
    _need(m.embedding_size >= 1, "model.embedding_size", f"must be >= 1, got {m.embedding_size}")
    _need(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _need(m.freeze_backbone_steps >= 0, "model.freeze_backbone_steps", "must be >= 0")
    _check_backbone(m)
    h = cfg.head
    _need(h.name in list_heads(), "head.name", f"unknown head {h.name!r}; valid: {', '.join(list_heads())}")
    check_config(h.name, h.options)  # ConfigError "head.<key>: unknown key for head ..."
    _check_head(h, m.embedding_size)
    _need(0.0 < h.sample_rate <= 1.0, "head.sample_rate", f"must be in (0, 1], got {h.sample_rate}")
    o = cfg.optim
    _need(o.name in OPTIMIZERS, "optim.name", f"{o.name!r} is not one of {', '.join(OPTIMIZERS)}")
    _need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _need(o.momentum >= 0, "optim.momentum", f"must be >= 0, got {o.momentum}")
    _need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _need(len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas),
          "optim.betas", f"expected two numbers in [0, 1), got {o.betas}")
    _need(o.warmup_steps is None or o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _need(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    _need(o.power >= 0, "optim.power", "must be >= 0")
    _need(o.grad_clip is None or o.grad_clip > 0, "optim.grad_clip", f"must be > 0 or null, got {o.grad_clip}")
    _need(o.grad_accum >= 1, "optim.grad_accum", f"must be >= 1, got {o.grad_accum}")
    _need((cfg.steps is None) != (cfg.epochs is None), "steps",
          "set exactly one of steps and epochs" + (f" (got steps={cfg.steps}, epochs={cfg.epochs})"))
    _need(cfg.steps is None or cfg.steps >= 1, "steps", f"must be >= 1, got {cfg.steps}")
    _need(cfg.epochs is None or (math.isfinite(cfg.epochs) and cfg.epochs > 0), "epochs",
          f"must be a finite number > 0, got {cfg.epochs}")
    _need(0 <= cfg.seed < MAX_SEED, "seed", f"must be in [0, 2**32), got {cfg.seed}")
    _need(cfg.amp in AMP_MODES, "amp", f"{cfg.amp!r} is not one of {', '.join(AMP_MODES)}")
    _need(cfg.channels_last in (True, False, "auto"), "channels_last",
          f"{cfg.channels_last!r} is not one of true, false, auto")
    _need(cfg.num_threads is None or cfg.num_threads >= 1, "num_threads", "must be >= 1 or null")
    c = cfg.checkpoint
    _need(c.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0 = only at the end)")
    _need(c.keep >= 0, "checkpoint.keep", "must be >= 0")
    v = cfg.verification
    _need(all(isinstance(b, str) for b in v.bins), "verification.bins", f"expected a list of paths, got {v.bins}")
    _need(v.every_steps >= 0, "verification.every_steps", "must be >= 0 (0 = only at the end)")
    _need(v.batch_size >= 1, "verification.batch_size", "must be >= 1")
    _need(cfg.log.every_steps >= 1, "log.every_steps", f"must be >= 1, got {cfg.log.every_steps}")


_BUILD_ERRORS = BUILD_ERRORS


def _check_backbone(m: ModelConfig) -> None:
    """Build the backbone on the meta device (no memory): arch and options are checked by the code
    that uses them. A builder refusing a value (TypeError, negative sizes, ...) names the option."""
    def build(options: Mapping) -> None:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch: "Initializing zero-element tensors is a no-op"
            model = build_backbone(m.arch, embedding_size=m.embedding_size, dropout=m.dropout, **options)
        empty = next((name for name, p in model.named_parameters() if p.numel() == 0), None)
        if empty is not None:
            raise ValueError(f"they make an empty layer ({empty} has no weights)")

    try:
        build(m.options)
    except (ModelError, *_BUILD_ERRORS) as e:
        culprit = None
        if m.options and not _fails(build, {}):  # the arch builds: find the option that does not
            culprit = next((k for k in m.options if _fails(build, {k: m.options[k]})), None)
        if culprit is None:
            raise ConfigError(f"model: {_first_line(e)}") from None
        raise ConfigError(f"model.options.{culprit}: {m.options[culprit]!r} is refused by backbone {m.arch!r} "
                          f"({_first_line(e)})") from None


def _check_head(h: HeadConfig, embedding_size: int) -> None:
    """Build the head on the meta device with 2 classes: its own value checks name the key (`head.scale`)."""
    try:
        with torch.device("meta"):
            build_head(h.name, embedding_size, 2, **h.options)
    except FacebceError as e:
        text = str(e)
        raise ConfigError(text if text.startswith("head.") else f"head.{text}") from None
    except _BUILD_ERRORS as e:
        raise ConfigError(f"head: options {dict(h.options)} are refused by head {h.name!r} "
                          f"({type(e).__name__}: {_first_line(e)})") from None


def _fails(build, options: Mapping) -> bool:
    try:
        build(options)
    except (ModelError, *_BUILD_ERRORS):
        return True
    return False


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]


def save_config(cfg: TrainConfig, path: Union[str, os.PathLike]) -> None:
    """Write the resolved recipe (what `load_config` reads back to the same config)."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

"""The model card: `model.json` in a training run folder, one typed, versioned record (`ModelCard`).

A run writes it when it ends (facebce.train's checkpointer, through `write_model_card`); evaluation,
export and the gallery read it (through `read_model_card`) to rebuild the backbone and know the
head's learned threshold, without importing the training code. A run folder may come from anyone,
so the file is untrusted input: every field is checked, and a bad one is one ModelError line naming
`model.json` and the field.

Versions: 1 = the cards facebce wrote before the `version` key existed (read as they are);
2 = this type. Unknown keys are kept out of the type but do not fail the read (a newer facebce may
add some); a `version` newer than this code knows is refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facebce.errors import ModelError
from facebce.fileio import atomic_write_text

__all__ = ["CARD_FORMAT", "CARD_VERSION", "CENTRES_FILE", "CLASS_THRESHOLDS_FILE", "MODEL_CARD", "ModelCard",
           "WEIGHTS_FILE", "card_path", "read_model_card", "write_model_card"]

MODEL_CARD = "model.json"  # the card's file name in a run folder (defined here only)
WEIGHTS_FILE = "backbone.pth"  # the backbone state_dict a run writes beside it
CENTRES_FILE = "centres.pth"  # the head's class centres, a plain N x d float tensor
CLASS_THRESHOLDS_FILE = "class_thresholds.pth"  # per-class learned thresholds (b_j or b_j/γ), N floats
CARD_FORMAT = "facebce-model"
CARD_VERSION = 2
SCORE_KINDS = ("cosine", "linear")
_MAX_CARD_BYTES = 1 << 20  # a card is a few hundred bytes; refuse to parse a huge file


@dataclass(frozen=True)
class ModelCard:
    """What a finished run says about its model.

    arch, embedding_size, options: rebuild the backbone (facebce.models.build_backbone).
    weights: the backbone state_dict file, relative to the run folder.
    head, bias, threshold: the training head's name, its unified bias b and the learned unified
    threshold (b or b/γ, on the cosine / score scale) — a class-centre threshold, not a calibrated
    pair threshold. scores, num_classes, centres, class_thresholds: what closed-set evaluation needs
    (how the head scores its classes and the files holding its centres and per-class thresholds).
    """

    arch: str
    embedding_size: int
    options: dict[str, Any] = field(default_factory=dict)
    weights: str = WEIGHTS_FILE
    head: str | None = None
    bias: float | None = None
    threshold: float | None = None
    steps: int | None = None
    scores: str | None = None
    num_classes: int | None = None
    centres: str | None = None
    class_thresholds: str | None = None
    version: int = CARD_VERSION

    def __post_init__(self):
        _check_fields(self, "model card")

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style read of a field (`card.get("threshold")`), for callers written against the
        pre-typed card (a plain dict); new code reads the attributes."""
        return getattr(self, key, default) if key in self.__dataclass_fields__ else default

    def to_dict(self) -> dict[str, Any]:
        """The JSON object `write_model_card` writes (format and version first)."""
        d = {"format": CARD_FORMAT, "version": self.version}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "version"})
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str = MODEL_CARD) -> ModelCard:
        """Validate a parsed card (`where` names it in errors); version absent = 1 (pre-versioned cards)."""
        if not isinstance(data, Mapping):
            raise ModelError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != CARD_FORMAT:
            raise ModelError(f"{where}: format: expected {CARD_FORMAT!r}, got {data.get('format')!r} "
                             "(not a facebce model card)")
        version = data.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ModelError(f"{where}: version: expected a positive int, got {version!r}")
        if version > CARD_VERSION:
            raise ModelError(f"{where}: version: {version} is newer than this facebce reads ({CARD_VERSION}); "
                             "upgrade facebce")
        for key in ("arch", "embedding_size"):
            if key not in data:
                raise ModelError(f"{where}: {key}: missing")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names and k != "version"}
        if values.get("options", {}) is None:
            values["options"] = {}
        if values.get("weights", WEIGHTS_FILE) is None:
            values["weights"] = WEIGHTS_FILE
        card = object.__new__(cls)  # validate before constructing, so errors name `where`
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            object.__setattr__(card, f.name, values.get(f.name, default))
        object.__setattr__(card, "version", CARD_VERSION)
        _check_fields(card, where)
        return card


def _check_fields(card: ModelCard, where: str) -> None:
    """Every field's type and range; ModelError '<where>: <field>: ...'."""
    def bad(name: str, expected: str) -> ModelError:
        return ModelError(f"{where}: {name}: expected {expected}, got {getattr(card, name)!r}")

    def file_name(name: str, optional: bool) -> None:
        value = getattr(card, name)
        if value is None and optional:
            return
        if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value \
                or "\0" in value:
            raise bad(name, "a file name inside the run folder" + (" or null" if optional else ""))

    if not isinstance(card.arch, str) or not card.arch:
        raise bad("arch", "a backbone name (string)")
    if not _is_int(card.embedding_size) or card.embedding_size <= 0:
        raise bad("embedding_size", "a positive int")
    if not isinstance(card.options, Mapping) or not all(isinstance(k, str) for k in card.options):
        raise bad("options", "an object of backbone options")
    object.__setattr__(card, "options", dict(card.options))
    file_name("weights", optional=False)
    if card.head is not None and not isinstance(card.head, str):
        raise bad("head", "a head name or null")
    for name in ("bias", "threshold"):
        value = getattr(card, name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise bad(name, "a finite number or null")
            object.__setattr__(card, name, float(value))
    if card.steps is not None and (not _is_int(card.steps) or card.steps < 0):
        raise bad("steps", "a non-negative int or null")
    if card.scores is not None and card.scores not in SCORE_KINDS:
        raise bad("scores", f"one of {', '.join(SCORE_KINDS)} or null")
    if card.num_classes is not None and (not _is_int(card.num_classes) or card.num_classes <= 0):
        raise bad("num_classes", "a positive int or null")
    file_name("centres", optional=True)
    file_name("class_thresholds", optional=True)
    if not _is_int(card.version) or card.version < 1:
        raise bad("version", "a positive int")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def card_path(run_dir: str | os.PathLike) -> Path:
    """Where a run folder's card lives."""
    return Path(run_dir) / MODEL_CARD


def read_model_card(run_dir: str | os.PathLike) -> ModelCard:
    """The run folder's validated `ModelCard`; one ModelError line naming model.json and the field otherwise."""
    path = card_path(run_dir)
    if not path.is_file():
        raise ModelError(f"{run_dir}: not a finished facebce training run (no {MODEL_CARD}; "
                         f"a run writes it with {WEIGHTS_FILE} when it ends)")
    try:
        if path.stat().st_size > _MAX_CARD_BYTES:
            raise ModelError(f"{path}: {path.stat().st_size} bytes, too large for a model card")
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text, parse_constant=_no_constant)
    except OSError as e:
        raise ModelError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path}: not valid JSON ({str(e).splitlines()[0][:200]})") from None
    return ModelCard.from_dict(data, str(path))


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def write_model_card(run_dir: str | os.PathLike, card: ModelCard) -> Path:
    """Write `card` as the run folder's model.json, atomically (temp file, fsync, rename); returns the path."""
    if not isinstance(card, ModelCard):
        raise ModelError(f"write_model_card: expected a ModelCard, got {type(card).__name__}")
    path = card_path(run_dir)
    atomic_write_text(path, json.dumps(card.to_dict(), indent=2, allow_nan=False) + "\n")
    return path

"""What an evaluation returns: the global threshold, one result per set, and the report that holds them.

Plain frozen records, no behaviour: `facebce.eval.runner` fills them and `facebce.eval.report` writes
them, and both import them from here (neither imports the other's module for its types).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import numpy as np

from facebce import __version__
from facebce.eval.ijb import IjbResult
from facebce.eval.open_set import OpenSetSetResult
from facebce.eval.roc import TarAtFar
from facebce.eval.tenfold import TenFoldResult
from facebce.eval.uniform import UniformSection
from facebce.eval.verification import ThresholdResult

__all__ = ["EvalReport", "GlobalThreshold", "PairSetResult", "UniformSection"]


@dataclass(frozen=True)
class GlobalThreshold:
    source: str  # as given: fit:union, fit:<set>, fixed:<t>, bias
    value: float  # cosine; a pair is accepted iff its score > value
    fitted_on: tuple[str, ...] = ()  # the sets a fit:* source was fitted on
    fitted_accuracy: float | None = None  # its accuracy on them


@dataclass(frozen=True)
class PairSetResult:
    name: str
    path: str
    n_pairs: int
    n_genuine: int
    embedding_size: int
    scores: np.ndarray  # cosine per pair (float64), kept for plots; not written to JSON
    issame: np.ndarray
    best: ThresholdResult  # the set's own best single threshold
    at_global: ThresholdResult  # the global threshold applied to this set
    ten_fold: TenFoldResult | None  # None when the protocol does not list it
    tar_at_far: TarAtFar | None  # None when not listed, or the set lacks genuine or impostor pairs


@dataclass
class EvalReport:
    model: str
    flip: bool
    tar_mode: str
    threshold: GlobalThreshold
    sets: list[PairSetResult] = field(default_factory=list)
    ijb: list[IjbResult] = field(default_factory=list)
    open_set: list[OpenSetSetResult] = field(default_factory=list)
    uniform: UniformSection | None = None
    bias: float | None = None
    inference: str | None = None  # how the model ran (sessions x threads, measured rates); None when cached
    facebce_version: str = __version__
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"))

    def set(self, name: str) -> PairSetResult:
        for s in self.sets:
            if s.name == name:
                return s
        raise KeyError(name)

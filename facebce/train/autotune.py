"""`amp: auto` / `channels_last: auto`: time the candidate settings on the real model and batch, keep the
fastest whose gradient matches fp32.

Which precision and memory layout make a CPU training step fastest depends on the CPU (AMX, AVX-512
bf16, none), on the model and on what else the machine is doing: the same r50 step was faster in bf16 +
channels_last on one run and in fp32 NCHW on another. So nothing here is a table of CPU flags: `choose`
runs a few forward + backward passes of every candidate on DEEP COPIES of the backbone and head (the
run's weights, optimizer and random streams are untouched) with the run's first batch, takes the
median wall time of the timed passes (the first pass is a warm-up, and gives the gradient), and
compares each candidate's flattened backbone gradient with the fp32 NCHW one from the same weights,
batch and random draws. The fastest candidate whose cosine is >= `min_cosine` wins; fp32 NCHW is
always eligible. The optimizer step is not timed: it is the same fp32 update in every candidate. A
candidate that cannot win is dropped early, to keep the tuning cheap (bf16 on a CPU without native
bf16 is often 5-10x slower, and one r50 pass of it at batch 32 took ~4 min on a Zen 1 core pair):
every candidate first runs twice on a slice of the batch (PROBE_FRACTION of it, at least 2 images),
and one whose second slice pass takes ABANDON times the fastest candidate's is not run on the whole
batch at all ("probe only": its time is the slice's, scaled to the batch; no gradient cosine); a
candidate whose warm-up pass on the whole batch takes ABANDON times the best timed pass so far is
not timed further ("warm-up only").

On CUDA precision is not timed: bf16 where the device supports it, else fp16 (the engine adds a
GradScaler); only the layout is timed (`candidate_settings`).
"""
from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TUNED_AMP = ("none", "bf16", "fp16")  # what a tuned or recorded `amp` may be
RUN_FRACTION = 0.1  # tune only when the tuning passes are at most this fraction of the run's passes
ABANDON = 3.0  # a candidate whose warm-up pass is this many times the best timed pass so far is not timed further
PROBE_FRACTION = 1 / 16  # of the batch: the slice every candidate is first timed on
FP16_LOSS_SCALE = 1024.0  # fp16 gradients of a small loss underflow; the cosine does not see the scale


@dataclass(frozen=True)
class Candidate:
    amp: str                    # none | bf16 | fp16
    channels_last: bool
    compile: bool = False

    @property
    def label(self) -> str:
        precision = "fp32" if self.amp == "none" else self.amp
        return f"{precision} {'channels_last' if self.channels_last else 'NCHW'}" + (" compile" if self.compile else "")


REFERENCE = Candidate("none", False)


@dataclass
class AutotuneResult:
    amp: str
    channels_last: bool
    timings: dict = field(default_factory=dict)   # label -> seconds per forward + backward (median)
    cosines: dict = field(default_factory=dict)   # label -> backbone-gradient cosine to fp32 NCHW
    chosen_label: str = ""
    min_cosine: float = 0.99
    seconds: float = 0.0                          # wall time of the whole tuning
    note: str = ""                                # why the choice was not the fastest eligible one
    warmup_only: list = field(default_factory=list)  # labels abandoned after a slow warm-up (time = warm-up's)
    probe_only: list = field(default_factory=list)   # labels dropped after the batch slice (time = slice's, scaled)

    def as_dict(self) -> dict:
        def num(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return {"amp": self.amp, "channels_last": self.channels_last, "chosen": self.chosen_label,
                "seconds_per_step": {k: num(v) for k, v in self.timings.items()},
                "gradient_cosine": {k: num(v) for k, v in self.cosines.items()},
                "warmup_only": list(self.warmup_only), "probe_only": list(self.probe_only),
                "min_cosine": num(self.min_cosine),
                "tuning_seconds": round(self.seconds, 2), "note": self.note}

    def summary(self) -> str:
        """One line: every candidate's time (ms per forward + backward) and cosine, the chosen one marked."""
        parts = []
        for label, t in self.timings.items():
            mark = "*" if label == self.chosen_label else ""
            slow = (" (warm-up only)" if label in self.warmup_only else
                    " (batch slice only)" if label in self.probe_only else "")
            parts.append(f"{mark}{label} {t * 1e3:.0f} ms{slow} (cos {self.cosines.get(label, math.nan):.4f})")
        return "; ".join(parts)


def low_precision() -> str:
    """CUDA's autocast precision: bf16 where the device supports it, else fp16."""
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def candidate_settings(device: Union[str, torch.device], amp: Optional[str] = None,
                       channels_last: Optional[bool] = None, *, compile: bool = False) -> list[Candidate]:
    """The settings to time: `amp`/`channels_last` None = tuned, else fixed at the given value. CPU:
    fp32 and bf16; CUDA: only its low precision (not timed against fp32). `compile`: every candidate
    is timed compiled, as the run will run it."""
    device = torch.device(device)
    if amp is None:
        precisions = ["none", "bf16"] if device.type != "cuda" else [low_precision()]
    else:
        precisions = [amp]
    layouts = [False, True] if channels_last is None else [bool(channels_last)]
    return [Candidate(a, cl, compile) for a in precisions for cl in layouts]


def worth_tuning(run_passes: int, n_candidates: int, steps: int) -> bool:
    """Tuning costs about `n_candidates * steps + 1` forward + backward passes; tune only when that
    is at most RUN_FRACTION of the run's passes (a tiny run keeps the plain setting instead)."""
    return n_candidates * steps + 1 <= RUN_FRACTION * run_passes


def choose(backbone: nn.Module, head: nn.Module, images: torch.Tensor, labels: torch.Tensor,
           device: Union[str, torch.device], *, candidates: Optional[Iterable] = None, steps: int = 3,
           min_cosine: float = 0.99, compile: bool = False, say: Callable[[str], None] = print) -> AutotuneResult:
    """Time `steps` forward + backward passes of every candidate (the first is the untimed warm-up)
    on copies of `backbone` and `head` (`head(embeddings, labels).loss`, a PartialFC or a bare head),
    and return the fastest whose backbone-gradient cosine to fp32 NCHW is >= `min_cosine`.
    `candidates`: `Candidate`s or (amp, channels_last) pairs; default `candidate_settings(device, compile=compile)`."""
    device = torch.device(device)
    if steps < 2:
        raise ValueError(f"steps: need a warm-up and at least one timed pass, got {steps}")
    cands = _as_candidates(candidates) if candidates is not None else candidate_settings(device, compile=compile)
    if not cands:
        raise ValueError("candidates: none given")
    start = time.perf_counter()
    images = images.to(device)
    labels = labels.to(device)
    timings, cosines, warmup_only, probe_only, probes = {}, {}, [], [], {}
    probe_rows = max(2, int(len(images) * PROBE_FRACTION))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        head_copy = _copy(head).train()
        generators = _generators(head_copy)
        generator_states = [g.get_state() for g in generators]

        def model_for(c: Candidate) -> tuple[nn.Module, list[nn.Parameter]]:
            model = _copy(backbone).train()
            if c.channels_last:
                model = model.to(memory_format=torch.channels_last)
            params = list(model.parameters())
            return (torch.compile(model) if c.compile else model), params

        def run(model, params, c: Candidate, grads: bool, rows: Optional[int] = None) -> Optional[torch.Tensor]:
            """One forward + backward from the same random draws (on the first `rows` images: the
            probe slice); the flat backbone gradient if asked."""
            torch.manual_seed(0)
            for g, state in zip(generators, generator_states):
                g.set_state(state)
            for p in params:
                p.grad = None
            head_copy.zero_grad(set_to_none=True)
            x, y = (images, labels) if rows is None else (images[:rows], labels[:rows])
            x = x.contiguous(memory_format=torch.channels_last) if c.channels_last else x.contiguous()
            dtype = AMP_DTYPES[c.amp]
            ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with ctx:
                loss = head_copy(model(x), y).loss
            (loss * FP16_LOSS_SCALE if c.amp == "fp16" else loss).backward()
            if not grads:
                return None
            return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double()
                              for p in params])

        reference = None
        if REFERENCE not in cands:  # fp32 NCHW is not timed (CUDA, a fixed amp): its gradient only
            model, params = model_for(REFERENCE)
            reference = run(model, params, REFERENCE, True)
            del model, params
        for c in sorted(cands, key=lambda c: c != REFERENCE):  # the reference first: its gradient is compared
            model, params = model_for(c)
            if not c.compile and probe_rows < len(images):  # two passes on the slice; the second is timed
                for _ in range(2):
                    _sync(device)
                    t0 = time.perf_counter()
                    run(model, params, c, False, probe_rows)
                    _sync(device)
                probe = time.perf_counter() - t0
                fastest = min(probes.values(), default=math.inf)
                probes[c.label] = probe
                if c != REFERENCE and probe > ABANDON * fastest:  # cannot win: not run on the whole batch
                    timings[c.label], cosines[c.label] = probe * len(images) / probe_rows, math.nan
                    probe_only.append(c.label)
                    del model, params
                    continue
            _sync(device)
            t0 = time.perf_counter()
            grad = run(model, params, c, True)  # warm-up (and compilation)
            _sync(device)
            warm = time.perf_counter() - t0
            if c == REFERENCE:
                reference = grad
            cos = (float(torch.nn.functional.cosine_similarity(grad, reference, dim=0))
                   if bool(torch.isfinite(grad).all()) else math.nan)
            times = []
            best = min(timings.values(), default=math.inf)
            if not c.compile and warm > ABANDON * best:  # cannot win: spare the timed passes
                times, _ = [warm], warmup_only.append(c.label)
            for _ in range(steps - 1 if not times else 0):
                _sync(device)
                t0 = time.perf_counter()
                run(model, params, c, False)
                _sync(device)
                times.append(time.perf_counter() - t0)
            timings[c.label], cosines[c.label] = statistics.median(times), cos
            del model, params, grad
    order = {c.label: c for c in cands}
    eligible = [c for c in cands if c == REFERENCE or cosines[c.label] >= min_cosine]
    note = ""
    if eligible:
        chosen = min(eligible, key=lambda c: timings[c.label])
    else:
        chosen = REFERENCE
        note = f"no candidate reached gradient cosine {min_cosine}: fp32 NCHW"
        say(f"autotune: {note}")
    result = AutotuneResult(chosen.amp, chosen.channels_last, {k: timings[k] for k in order},
                            {k: cosines[k] for k in order}, chosen.label, min_cosine,
                            time.perf_counter() - start, note, warmup_only, probe_only)
    return result


def recorded(config: dict, device: torch.device) -> tuple[Optional[str], Optional[bool]]:
    """A run's recorded (resolved) amp and channels_last from its checkpoint's config; None where the
    record holds no usable value (then the setting is tuned again)."""
    amp = config.get("amp")
    if amp not in TUNED_AMP or (amp == "fp16" and device.type != "cuda"):
        amp = None
    layout = config.get("channels_last")
    return amp, layout if isinstance(layout, bool) else None


def broadcast(amp: str, channels_last: bool, device: torch.device, group=None) -> tuple[str, bool]:
    """Rank 0's choice on every rank (a 2-element tensor); unchanged without a process group."""
    if group is None or not dist.is_initialized():
        return amp, channels_last
    t = torch.tensor([TUNED_AMP.index(amp), int(channels_last)], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0, group=group)
    return TUNED_AMP[int(t[0])], bool(t[1])


def _as_candidates(items: Iterable) -> list[Candidate]:
    out = []
    for item in items:
        c = item if isinstance(item, Candidate) else Candidate(*item)
        if c.amp not in AMP_DTYPES:
            raise ValueError(f"candidates: amp {c.amp!r} is not one of {', '.join(AMP_DTYPES)}")
        if c not in out:
            out.append(c)
    return out


def _copy(module: nn.Module) -> nn.Module:
    """A deep copy that shares process groups (they cannot be copied) and clones RNG generators."""
    memo: dict = {}
    if dist.is_available():
        for m in module.modules():
            for value in vars(m).values():
                if isinstance(value, dist.ProcessGroup):
                    memo[id(value)] = value
    return copy.deepcopy(module, memo)


def _generators(module: nn.Module) -> list[torch.Generator]:
    return [v for m in module.modules() for v in vars(m).values() if isinstance(v, torch.Generator)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ("AutotuneResult", "Candidate", "candidate_settings", "choose", "recorded", "broadcast",
                          "worth_tuning", "RUN_FRACTION")

"""The training loop: backbone (DDP when several processes) + Partial-FC head, one recipe.

`train_from_recipe(path, overrides)` is what `facebce train RECIPE.yaml [--set k=v] [--resume]
[--init-backbone PTH]` calls; `train(cfg)` takes a `TrainConfig`. Several processes are started by
`torchrun` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT): gloo on CPU, NCCL on CUDA.
The head stays outside DDP (Partial-FC shards the classes over the ranks and all-gathers the
embeddings itself).

One optimizer step = `grad_accum` micro-batches of `data.batch_size` per process. Learning rate
per step: linear warmup, then polynomial decay (power 2) to 0 (arcface_torch). Weight decay only on
weights with >= 2 dimensions and the class centres: never on biases, BN/PReLU parameters or the
head's bias (the learned threshold; decay would pull it toward 0). Gradient clipping applies to the
backbone (arcface_torch: norm 5), whose gradient DDP has already averaged.

`amp: auto` / `channels_last: auto` (the defaults) are resolved before the first step: a resumed run
reuses its checkpoint's recorded choice; otherwise `facebce.train.autotune.choose` times the
candidates on copies of the model with the first batch (a run too short to pay for that keeps fp32
NCHW), and the choice is applied exactly as the explicit settings are.

The module is over 450 lines because it is one class: the Trainer's builders (runtime, data, model,
optimizer, loop state, callbacks), its loop and its resume logic share the trainer's state, and
splitting them across files would scatter one object's methods.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import random
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from facebce.data.synthetic import SyntheticFaces, make_pairs
from facebce.data.verification_bin import save_bin
from facebce.errors import ConfigError, FacebceError
from facebce.heads import PartialFC
from facebce.models import build_backbone
from facebce.train import autotune
from facebce.train import checkpoint as ckpt
from facebce.train.callbacks import (Callback, Checkpointer, ClassificationVal, MetricsLogger, ModelFiles,
                                     ProgressBar, Verification, write_json_atomic)
from facebce.train.config import TrainConfig, load_config, save_config
from facebce.train.loader import (RING_SLOTS, EpochBatchSampler, SeededSamples, batch_collate, batches_per_epoch,
                                  build_datasets, normalise_batch, raise_worker_errors)


AUTOTUNE_STEPS = 3  # forward + backward passes per candidate (1 warm-up + 2 timed)


class TrainingDiverged(FacebceError):
    """The loss (or the gradient) became NaN/Inf; no checkpoint is written after it."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    loss: float                        # mean loss of the last logged interval
    threshold: Optional[float]         # learned unified threshold (b/γ, or b), None for softmax heads
    checkpoint: Optional[Path]         # the last checkpoint written (rank 0)
    verification: dict = field(default_factory=dict)  # {set name: {acc, acc_std, best_acc, ...}} at the end
    seconds: float = 0.0
    val: dict = field(default_factory=dict)  # closed-set val at the end (data.val_fraction): sw_acc, uni_acc, ...

    def to_json(self) -> dict:
        """What `results.json` in the run folder holds (NaN as null)."""
        def clean(v):
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return clean({"steps": self.steps, "loss": float(self.loss), "threshold": self.threshold,
                      "seconds": round(self.seconds, 1), "verification": self.verification, "val": self.val})


def train_from_recipe(path: Union[str, os.PathLike], overrides: Sequence[str] = (), resume: bool = False,
                      init_backbone: Optional[str] = None, out_dir: Optional[str] = None,
                      callbacks: Sequence[Callback] = (), resume_older: bool = False) -> TrainResult:
    """Load a recipe (+ `key=value` overrides) and train; `resume` continues from the run folder's
    newest checkpoint; `init_backbone` starts the backbone from a .pth; `out_dir` is the run folder."""
    extra = list(overrides)
    if init_backbone is not None:
        extra.append(f"model.init_backbone={init_backbone}")
    cfg = load_config(path, extra)
    if out_dir is not None:
        cfg.checkpoint.dir = os.fspath(out_dir)
    elif cfg.checkpoint.dir is None:
        cfg.checkpoint.dir = str(Path("runs") / Path(path).stem)
    return train(cfg, resume=resume, callbacks=callbacks, resume_older=resume_older)


def train(cfg: TrainConfig, *, resume: bool = False, callbacks: Sequence[Callback] = (),
          resume_older: bool = False) -> TrainResult:
    """`resume_older`: when the newest checkpoint does not load, resume from the newest that does
    (saying on stderr which was skipped and why) instead of refusing."""
    trainer = Trainer(cfg, resume=resume, callbacks=callbacks, resume_older=resume_older)
    try:
        return trainer.fit()
    finally:
        trainer.close()


# -------------------------------------------------------------------------------- processes
def init_distributed() -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, whether this call created the process group) from torchrun's
    variables; an already initialised group (a caller's) is used as it is."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=30))
        created = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, local, created


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int, power: float = 2.0) -> float:
    """Learning rate of the optimizer step with 0-based index `step`: linear warmup (reaching
    base_lr on its last step), then `base·(1 − (step − warmup)/(total − warmup))^power`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    return base_lr * max(1.0 - (step - warmup_steps) / span, 0.0) ** power


# ----------------------------------------------------------------------------------- trainer
class Trainer:
    """Builds everything a recipe describes; `fit()` runs the loop. Attributes callbacks use:
    `cfg`, `step`, `total_steps`, `epoch`, `rank`, `world_size`, `is_main`, `backbone` (the bare
    module), `head` (PartialFC), `run_dir`, `amp`, `channels_last`, `autocast_dtype` (the resolved
    settings: `auto` is tuned on the first batch, before `on_train_start`), `last_record`, `log()`, `say()`."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, callbacks: Sequence[Callback] = (),
                 resume_older: bool = False):
        self.cfg = cfg
        self._build_runtime()
        resume_from = self._find_resume(resume_older) if resume or resume_older else None
        self._build_data()
        if self.is_main:  # only once the data loaded: a bad recipe leaves no run folder behind
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self._resolve_settings(resume_from)
        self._build_model()
        self._build_optimizer()
        self._build_loop_state(resume_from)
        self._build_callbacks(callbacks)

    def _build_runtime(self) -> None:
        """Processes, device, autocast dtype, threads and where the run folder goes (made once the data
        loaded); bad paths fail on every rank."""
        cfg = self.cfg
        self.rank, self.world_size, self.local_rank, self._owns_group = init_distributed()
        self.is_main = self.rank == 0
        self.group = dist.group.WORLD if self.world_size > 1 else None
        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("amp: fp16 needs CUDA (GradScaler); use bf16 on CPU")
        self._set_threads_and_determinism()
        self.run_dir = Path(cfg.checkpoint.dir or "runs/train")
        self.ckpt_dir = self.run_dir / "checkpoints"
        for path in cfg.verification.bins:  # checked on every rank: a rank-0-only failure would hang the others
            if not Path(path).is_file():
                raise ConfigError(f"verification.bins: {path}: no such file")

    def _build_data(self) -> None:
        """Datasets, per-sample seeded streams, and the step counts they give."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.dataset, self.val_dataset = build_datasets(cfg.data)
        self.num_classes = int(self.dataset.num_classes)
        # uint8 batches, normalised on the device (normalise_batch), in recycled worker buffers
        self.samples = SeededSamples(self.dataset, cfg.seed, uint8=True, recycle=RING_SLOTS)
        b, w, accum = cfg.data.batch_size, self.world_size, cfg.optim.grad_accum
        self.micro_per_epoch = batches_per_epoch(len(self.dataset), b, w)
        if self.micro_per_epoch == 0:
            raise ConfigError(f"data.batch_size: {b} x {w} processes is more than the {len(self.dataset)} samples")
        steps_per_epoch = self.micro_per_epoch / accum
        self.total_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
        self.warmup_steps = (cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None
                             else int(cfg.optim.warmup_epochs * steps_per_epoch))

    def _resolve_settings(self, resume_from: Optional[tuple[Path, dict]]) -> None:
        """`amp`/`channels_last`: explicit values as given; `auto` takes a resumed run's recorded choice,
        on CUDA bf16 (fp16 without bf16 support), else is tuned on the first batch (None until then),
        unless tuning would cost more than a tenth of a short run (then fp32 NCHW; on CUDA its precision)."""
        cfg = self.cfg
        self.amp: Optional[str] = None if cfg.amp == "auto" else cfg.amp
        self.channels_last: Optional[bool] = None if cfg.channels_last == "auto" else cfg.channels_last
        self.autotune_source = "given"
        if resume_from is not None and (self.amp is None or self.channels_last is None):
            amp, layout = autotune.recorded(resume_from[1].get("config") or {}, self.device)
            self.amp = self.amp if self.amp is not None else amp
            self.channels_last = self.channels_last if self.channels_last is not None else layout
            self.autotune_source = "recorded"
        if self.amp is None and self.device.type == "cuda":  # precision is not timed on CUDA
            self.amp, self.autotune_source = autotune.low_precision(), "CUDA (precision not timed)"
        if self.amp is None or self.channels_last is None:
            n = len(autotune.candidate_settings(self.device, self.amp, self.channels_last, compile=cfg.compile))
            passes = (self.total_steps - (int(resume_from[1]["step"]) if resume_from else 0)) * cfg.optim.grad_accum
            self.autotune_source = "tuned"
            if not autotune.worth_tuning(passes, n, AUTOTUNE_STEPS):
                self.autotune_source = f"not tuned: a {passes}-pass run (tuning costs ~{n * AUTOTUNE_STEPS + 1})"
                self.amp = self.amp if self.amp is not None else "none"
                self.channels_last = bool(self.channels_last)
        self.autocast_dtype = autotune.AMP_DTYPES[self.amp] if self.amp is not None else None

    def resolved_config(self) -> TrainConfig:
        """The config with `auto` replaced by what this run uses (config.yaml, checkpoints: a resume reuses it)."""
        return dataclasses.replace(self.cfg, amp=self.amp if self.amp is not None else self.cfg.amp,
                                   channels_last=(self.channels_last if self.channels_last is not None
                                                  else self.cfg.channels_last))

    def _build_model(self) -> None:
        """Backbone (identical on every rank; DDP and compile when asked), then the head shard and
        per-rank RNG streams."""
        cfg = self.cfg
        m = cfg.model
        self.backbone = build_backbone(m.arch, embedding_size=m.embedding_size, dropout=m.dropout, **m.options)
        if m.init_backbone:
            ckpt.load_backbone_init(self.backbone, m.init_backbone)
        self.backbone.to(self.device)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        seed_everything(cfg.seed + 1009 * self.rank + 1)
        head_cfg = {"name": cfg.head.name, **cfg.head.options}
        self.head = PartialFC(head_cfg, m.embedding_size, self.num_classes, cfg.head.sample_rate,
                              neg_rescale=cfg.head.neg_rescale).to(self.device)
        self.head.generator = torch.Generator(self.device).manual_seed(cfg.seed * 7919 + self.rank)
        self._wrap_model()

    def _wrap_model(self) -> None:
        """`model` = the backbone, in DDP when several processes, compiled when asked (again after autotune
        changes the backbone's memory format: DDP's buckets follow the parameters' layout)."""
        self.model: nn.Module = self.backbone
        self.ddp: Optional[DistributedDataParallel] = None
        if self.world_size > 1:
            self.ddp = DistributedDataParallel(self.backbone,
                                               device_ids=[self.local_rank] if self.device.type == "cuda" else None)
            self.model = self.ddp
        if self.cfg.compile:
            self.model = torch.compile(self.model)

    def _build_optimizer(self) -> None:
        """SGD or AdamW; no weight decay on 1-D parameters (biases, BN, PReLU) nor on the head's bias."""
        cfg = self.cfg
        self.named_params = ([(f"backbone.{n}", p) for n, p in self.backbone.named_parameters()]
                             + [(f"head.{n}", p) for n, p in self.head.head.named_parameters()])
        decay = [p for n, p in self.named_params if p.dim() > 1]
        no_decay = [p for n, p in self.named_params if p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        o = cfg.optim
        if o.name == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))
        self.sharded = {f"head.{n}": self.head for n in self.head.head.sharded_names()}
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None  # fp16 is CUDA-only (checked above)

    def _build_loop_state(self, resume_from: Optional[tuple[Path, dict]]) -> None:
        """Step counters and timers; restore a checkpoint, or refuse a folder that holds another run's
        checkpoints; save the recipe."""
        self.step, self.epoch, self.epoch_samples = 0, 0, 0
        self.last_record: dict = {}
        self._pending: dict = {}
        self._loss_sum, self._loss_n = 0.0, 0
        self._tick = (time.perf_counter(), 0)
        self._hook_seconds = 0.0  # time spent in callbacks (verification, checkpoints): not training speed
        if resume_from is not None:
            self._restore(*resume_from)
        elif ckpt.list_checkpoints(self.ckpt_dir):  # never mix two runs' checkpoints in one folder
            raise FacebceError(f"{self.ckpt_dir} already has checkpoints: continue that run with --resume, "
                               f"or choose another run folder (--set checkpoint.dir=...)")
        if self.is_main:
            save_config(self.resolved_config(), self.run_dir / "config.yaml")

    def _build_callbacks(self, callbacks: Sequence[Callback]) -> None:
        """Progress, verification, the caller's callbacks, checkpoints, the run's model files, then the
        metrics files (they write what the others logged)."""
        cfg = self.cfg
        bins = [(Path(p).stem, Path(p)) for p in cfg.verification.bins]
        heldout = self._heldout_pairs()
        if heldout is not None:
            bins.append(("heldout", heldout))
        self.progress = ProgressBar(cfg.log.progress)
        self.verification = Verification(bins, cfg.verification.every_steps, cfg.verification.flip,
                                         cfg.verification.batch_size)
        self.checkpointer = Checkpointer(self.ckpt_dir, cfg.checkpoint.every_steps, cfg.checkpoint.keep)
        self.model_files = ModelFiles()
        extra = list(callbacks)
        self.val = None
        if self.val_dataset is not None and len(self.val_dataset):
            self.val = ClassificationVal(self.val_dataset, cfg.verification.every_steps, cfg.verification.batch_size)
            extra.insert(0, self.val)
        columns = [c for cb in [self.verification, *extra] for c in cb.columns()]
        self.metrics = MetricsLogger(self.run_dir, columns, cfg.log.tensorboard)
        self.callbacks = [self.progress, self.verification, *extra, self.checkpointer, self.model_files,
                          self.metrics]

    # ------------------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        start = time.perf_counter()
        batches = self._batches()
        if self.amp is None or self.channels_last is None:
            first = next(batches)
            self.tune_settings(*first)
            batches = itertools.chain([first], batches)
        elif self.cfg.amp == "auto" or self.cfg.channels_last == "auto":
            self.say(f"autotune: {self.autotune_source}: amp {self.amp}, channels_last {self.channels_last}")
        self._call("on_train_start")
        self._tick = (time.perf_counter(), self.step)
        accum = self.cfg.optim.grad_accum
        self.model.train()
        while self.step < self.total_steps:
            lr = lr_at(self.step, self.cfg.optim.lr, self.total_steps, self.warmup_steps, self.cfg.optim.power)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            frozen = self.step < self.cfg.model.freeze_backbone_steps
            self.model.train(not frozen)
            self.optimizer.zero_grad(set_to_none=True)
            for micro in range(accum):
                images, labels = next(batches)
                self._forward_backward(images, labels, frozen, sync=micro == accum - 1)
            self._optimizer_step(frozen)
            self.step += 1
            self._record(lr)
            hooks = time.perf_counter()
            self._call("on_step_end")
            self._hook_seconds += time.perf_counter() - hooks
        self._call("on_train_end")
        if self.world_size > 1:
            dist.barrier()
        result = TrainResult(run_dir=self.run_dir, steps=self.step, loss=self.last_record.get("loss", math.nan),
                             threshold=self.head.threshold, checkpoint=self.checkpointer.last_path,
                             verification=dict(self.verification.results), seconds=time.perf_counter() - start,
                             val=dict(self.val.result) if self.val is not None else {})
        if self.is_main:
            write_json_atomic(self.run_dir / "results.json", result.to_json())
        return result

    def tune_settings(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Resolve `auto` on this batch (`fit` calls it with the first one): every rank times the
        candidates in step (the head's collectives keep them together); rank 0's choice is broadcast,
        applied as the explicit settings are, logged and recorded (autotune.json, config.yaml)."""
        cands = autotune.candidate_settings(self.device, self.amp, self.channels_last, compile=self.cfg.compile)
        result = autotune.choose(self.backbone, self.head, self._device_images(images), labels.to(self.device),
                                 self.device, candidates=cands, steps=AUTOTUNE_STEPS,
                                 min_cosine=0.99 if self.cfg.amp == "auto" else -math.inf, say=self.say)
        amp = self.amp if self.amp is not None else result.amp  # a given setting stays as given
        layout = self.channels_last if self.channels_last is not None else result.channels_last
        self.amp, self.channels_last = autotune.broadcast(amp, layout, self.device, self.group)
        self.autocast_dtype = autotune.AMP_DTYPES[self.amp]
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
            self._wrap_model()
        if self.amp == "fp16" and self.scaler is None:
            self.scaler = torch.amp.GradScaler("cuda")
        self.say(f"autotune ({result.seconds:.0f} s, ms per forward + backward, gradient cosine to fp32): "
                 f"{result.summary()}")
        self.say(f"autotune: amp {self.amp}, channels_last {self.channels_last}")
        if self.is_main:
            record = {**result.as_dict(), "amp": self.amp, "channels_last": self.channels_last,
                      "device": str(self.device), "world_size": self.world_size, "batch_size": self.cfg.data.batch_size}
            write_json_atomic(self.run_dir / "autotune.json", record)
            save_config(self.resolved_config(), self.run_dir / "config.yaml")

    def _device_images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8 and self.samples.uint8_batches:
            images = normalise_batch(images)  # bit-identical to normalising in the workers
        return images

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor, frozen: bool, sync: bool) -> None:
        images = self._device_images(images)
        labels = labels.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        else:
            images = images.contiguous()
        no_sync = self.ddp.no_sync() if (self.ddp is not None and not sync) else contextlib.nullcontext()
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with no_sync, autocast:
            with torch.no_grad() if frozen else contextlib.nullcontext():
                embeddings = self.model(images)
            loss = self.head(embeddings, labels).loss
        value = float(loss.detach())
        if not math.isfinite(value):
            self._diverged(f"loss is {value}")
        loss = loss / self.cfg.optim.grad_accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self._loss_sum += value
        self._loss_n += 1

    def _optimizer_step(self, frozen: bool) -> None:
        clip = self.cfg.optim.grad_clip
        if clip is not None and not frozen:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), clip)
            if self.scaler is None and not math.isfinite(float(norm)):
                self._diverged(f"backbone gradient norm is {float(norm)}")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _diverged(self, what: str) -> None:
        last = ckpt.list_checkpoints(self.ckpt_dir)
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}: {what}; stopped without writing a checkpoint "
            f"(last good checkpoint: {last[-1] if last else 'none'}). Lower optim.lr, enable optim.grad_clip "
            f"or use amp: bf16/none.")

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches forever, epoch after epoch, tracking (epoch, samples consumed) for checkpoints.
        One DataLoader over `EpochBatchSampler` serves the whole run: its workers keep decoding across
        epoch boundaries instead of being forked again for every epoch."""
        d = self.cfg.data
        n, global_batch = len(self.dataset), d.batch_size * self.world_size
        sampler = EpochBatchSampler(n, d.batch_size, rank=self.rank, world_size=self.world_size, seed=self.cfg.seed,
                                    epoch=self.epoch, start=self.epoch_samples)
        loader = DataLoader(self.samples, batch_sampler=sampler, num_workers=d.num_workers, collate_fn=batch_collate,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator(),
                            persistent_workers=False)
        left = batches_per_epoch(n, d.batch_size, self.world_size, self.epoch_samples)  # in the sampler's epoch
        for batch in raise_worker_errors(loader, self.samples):
            if left == 0:  # the sampler has moved on to the next epoch
                self.epoch, self.epoch_samples = self.epoch + 1, 0
                left = batches_per_epoch(n, d.batch_size, self.world_size)
            left -= 1
            self.epoch_samples += global_batch
            yield batch

    # ------------------------------------------------------------------------------ logging
    def log(self, **values) -> None:
        """Add values to this step's metrics record (written by MetricsLogger at the end of the step)."""
        self._pending.update(values)

    def pop_pending(self) -> dict:
        out, self._pending = self._pending, {}
        return out

    def say(self, line: str) -> None:
        if self.is_main:
            self.progress.write(line) if hasattr(self, "progress") else print(line)

    def _record(self, lr: float) -> None:
        n = self.cfg.log.every_steps
        if self.step % n and self.step != self.total_steps:
            return
        now = time.perf_counter()
        t0, s0 = self._tick
        samples = (self.step - s0) * self.cfg.optim.grad_accum * self.cfg.data.batch_size * self.world_size
        self._tick = (now, self.step)
        seconds, self._hook_seconds = now - t0 - self._hook_seconds, 0.0
        bias = self.head.bias
        rec = {"loss": self._loss_sum / max(self._loss_n, 1), "lr": lr,
               "samples_per_s": samples / max(seconds, 1e-9), "threshold": self.head.threshold,
               "bias": float(bias.detach()[0]) if bias is not None and bias.numel() == 1 else None}
        self._loss_sum, self._loss_n = 0.0, 0
        self.last_record = rec
        self.log(**rec)

    def _call(self, hook: str) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self)

    def close(self) -> None:
        for cb in getattr(self, "callbacks", []):
            cb.close()
        if getattr(self, "_owns_group", False) and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    # -------------------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict:
        """Everything `--resume` needs (a collective: gathers head rows and RNG states on every rank)."""
        rng = ckpt.gather_objects(ckpt.rng_state(self.head.generator), self.group)
        return {
            "format": ckpt.FORMAT, "version": ckpt.VERSION,
            "step": self.step, "epoch": self.epoch, "epoch_samples": self.epoch_samples,
            "world_size": self.world_size, "batch_size": self.cfg.data.batch_size,
            "num_classes": self.num_classes,
            "backbone": {k: v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()},
            "head": {k: v.cpu() for k, v in self.head.full_state_dict().items()},
            "optimizer": ckpt.optimizer_state(self.optimizer, self.named_params, self.sharded),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng,
            "config": self.resolved_config().to_dict(),
        }

    def _find_resume(self, older: bool = False) -> Optional[tuple[Path, dict]]:
        found = ckpt.latest_checkpoint(self.ckpt_dir, older=older)
        if found is None:
            raise FacebceError(f"--resume: no loadable checkpoint in {self.ckpt_dir}")
        return found

    def _restore(self, path: Path, state: dict) -> None:
        if state["num_classes"] != self.num_classes:
            raise FacebceError(f"{path}: checkpoint has {state['num_classes']} classes, "
                               f"the data has {self.num_classes}")
        self.backbone.load_state_dict(state["backbone"])
        self.head.load_full_state_dict(state["head"])
        ckpt.load_optimizer_state(self.optimizer, self.named_params, self.sharded, state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.epoch_samples = int(state["epoch_samples"])
        if self.epoch_samples + self.cfg.data.batch_size * self.world_size > len(self.dataset):
            self.epoch, self.epoch_samples = self.epoch + 1, 0
        if state["world_size"] == self.world_size:
            ckpt.set_rng_state(state["rng"][self.rank], self.head.generator)
        else:  # another world size: the per-rank streams cannot continue; start fresh, reproducible ones
            seed_everything(self.cfg.seed + 1009 * self.rank + 1 + self.step)
            self.head.generator.manual_seed(self.cfg.seed * 7919 + self.rank + 104729 * self.step)
            self.say(f"note: resuming a {state['world_size']}-process checkpoint on {self.world_size} processes: "
                     "head rows re-split, random streams re-seeded")
        self._tick = (time.perf_counter(), self.step)
        self.say(f"resumed from {path} at step {self.step} (epoch {self.epoch}, sample {self.epoch_samples})")

    def _heldout_pairs(self) -> Optional[Path]:
        """Synthetic data with `heldout_pairs`: write pairs of unseen identities to the run folder once."""
        s = self.cfg.data.synthetic
        if self.cfg.data.kind != "synthetic" or not s.heldout_pairs:
            return None
        path = self.run_dir / "heldout_pairs.bin"
        if self.is_main and not path.is_file():
            faces = SyntheticFaces(s.heldout_identities, s.heldout_images, seed=s.seed, difficulty=s.difficulty,
                                   first_identity=max(s.identities, 10_000))
            images, issame = make_pairs(faces, s.heldout_pairs, seed=s.seed + 1)
            save_bin(path, images, issame)  # atomic
        return path

    # --------------------------------------------------------------------------- processes
    def _set_threads_and_determinism(self) -> None:
        cfg = self.cfg
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        elif self.world_size > 1 and self.device.type == "cpu":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

"""Training hooks: progress bar, metrics files, checkpoints, the run's model files and periodic verification.

A callback sees the `Trainer` after each optimizer step (`trainer.step` steps done). Values a
callback wants in the metrics files go through `trainer.log(key=value)`; `MetricsLogger` (last in
the list) writes everything logged during a step as one JSONL line and one CSV row.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from facebce.data.verification_bin import load_bin
from facebce.eval import accuracy_at_threshold, best_threshold, ten_fold
from facebce.fileio import atomic_write_text
from facebce.heads.base import ClassCentreHead
from facebce.models.card import CENTRES_FILE, CLASS_THRESHOLDS_FILE, WEIGHTS_FILE, ModelCard, write_model_card
from facebce.models.embedder import TorchEmbedder
from facebce.train import checkpoint as ckpt

if TYPE_CHECKING:  # pragma: no cover
    from facebce.train.engine import Trainer

TRAIN_COLUMNS = ("step", "epoch", "loss", "lr", "samples_per_s", "threshold", "bias")
VERIFY_FIELDS = ("acc", "acc_std", "best_acc", "best_threshold", "learned_acc", "learned_tar", "learned_far")
VAL_FIELDS = ("sw_acc", "uni_acc", "t_star", "bias", "bias_gap", "cw_opt_acc", "cw_learned_acc")


class Callback:
    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer") -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...
    def close(self) -> None: ...
    def columns(self) -> Sequence[str]:
        """Extra metric columns this callback logs (for the CSV header)."""
        return ()


def every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


class ProgressBar(Callback):
    """tqdm on rank 0: steps with ETA, and the last logged loss, lr and samples/s."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar = enabled, None

    def on_train_start(self, trainer):
        if self.enabled and trainer.is_main:
            self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, unit="step", dynamic_ncols=True,
                            desc="train")

    def on_step_end(self, trainer):
        if self.bar is not None:
            self.bar.update(1)
            r = trainer.last_record
            if r:
                self.bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.3g}",
                                     img_s=f"{r['samples_per_s']:.1f}", refresh=False)

    def write(self, line: str) -> None:
        (self.bar.write if self.bar is not None else print)(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLogger(Callback):
    """`metrics.jsonl` + `metrics.csv` in the run folder (and TensorBoard events when it is installed).

    On resume, records after the resumed step (written by the interrupted run) are dropped, so the
    files describe one run without duplicates.
    """

    _tb_note_shown = False

    def __init__(self, run_dir: Path, extra_columns: Sequence[str] = (), tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.columns_ = list(TRAIN_COLUMNS) + [c for c in extra_columns if c not in TRAIN_COLUMNS]
        self.want_tb, self.tb = tensorboard, None
        self.jsonl = self.csv = None

    def on_train_start(self, trainer):
        if not trainer.is_main:
            return
        jpath, cpath = self.run_dir / "metrics.jsonl", self.run_dir / "metrics.csv"
        kept = []
        if trainer.step > 0 and jpath.is_file():
            for line in jpath.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash
                    continue
                if rec.get("step", math.inf) <= trainer.step:
                    kept.append(rec)
        self.jsonl = open(jpath, "w", encoding="utf-8")
        self.csv_file = open(cpath, "w", encoding="utf-8", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=self.columns_, extrasaction="ignore")
        self.csv.writeheader()
        for rec in kept:
            self._write(rec)
        if self.want_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if not MetricsLogger._tb_note_shown:
                    print("note: tensorboard is not installed; writing metrics.jsonl/metrics.csv only")
                    MetricsLogger._tb_note_shown = True
            else:
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=trainer.step + 1)

    def _write(self, rec: dict) -> None:
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        self.csv.writerow(rec)
        self.csv_file.flush()

    def on_step_end(self, trainer):
        rec = trainer.pop_pending()
        if not rec or self.jsonl is None:
            return
        rec = {"step": trainer.step, "epoch": trainer.epoch, **rec}
        self._write(rec)
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, trainer.step)

    def on_train_end(self, trainer):
        self.on_step_end(trainer)  # values logged by end-of-training hooks

    def close(self):
        for f in (self.jsonl, getattr(self, "csv_file", None)):
            if f is not None:
                f.close()
        self.jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class Periodic(Callback):
    """Runs `run(trainer)` every `every_steps` steps, at the last step (its results land in that
    step's metrics row), and once more at the end if the last step did not already; `run` sets
    `last_step`. Checkpoints, verification and the closed-set val all keep this rhythm."""

    every_steps: int = 0
    last_step: Optional[int] = None

    def on_step_end(self, trainer):
        if every(trainer.step, self.every_steps) or trainer.step == trainer.total_steps:
            self.run(trainer)

    def on_train_end(self, trainer):
        if self.last_step != trainer.step:
            self.run(trainer)

    def run(self, trainer) -> None:  # pragma: no cover - subclasses act
        raise NotImplementedError


class Checkpointer(Periodic):
    """Atomic checkpoint every `every_steps` steps and at the end; keeps the newest `keep`."""

    def __init__(self, folder: Path, every_steps: int, keep: int):
        self.folder, self.every_steps, self.keep = Path(folder), every_steps, keep
        self.last_step: Optional[int] = None
        self.last_path: Optional[Path] = None

    def save(self, trainer) -> None:
        state = trainer.checkpoint_state()  # a collective: every rank
        if trainer.is_main:
            self.last_path = ckpt.atomic_save(state, ckpt.checkpoint_path(self.folder, trainer.step))
            ckpt.prune_checkpoints(self.folder, self.keep)
        self.last_step = trainer.step

    run = save


class ModelFiles(Callback):
    """At the end of a run, the files evaluation, export and deployment read (runs after the
    Checkpointer): `backbone.pth` (a plain state_dict, insightface layout), the class centres and
    per-class thresholds when the head scores by centres, and the model card `model.json`."""

    def on_train_end(self, trainer):
        centres = class_centres(trainer)  # a collective (gathers the head's rows): every rank
        if trainer.is_main:
            state = {k: v.detach().cpu() for k, v in trainer.backbone.state_dict().items()}
            ckpt.atomic_save(state, trainer.run_dir / WEIGHTS_FILE)
            card = model_card(trainer)
            if centres is not None:
                weight, thresholds = centres
                ckpt.atomic_save(weight, trainer.run_dir / CENTRES)
                card = replace(card, centres=CENTRES)
                if thresholds is not None:
                    ckpt.atomic_save(thresholds, trainer.run_dir / CLASS_THRESHOLDS)
                    card = replace(card, class_thresholds=CLASS_THRESHOLDS)
            write_model_card(trainer.run_dir, card)


CENTRES = CENTRES_FILE  # the head's class centres, a plain N x d float tensor
CLASS_THRESHOLDS = CLASS_THRESHOLDS_FILE  # per-class learned thresholds (b_j or b_j/γ), N floats


def _inner_head(trainer):
    return getattr(trainer.head, "head", trainer.head)  # PartialFC wraps the class-centre head


def score_kind(trainer) -> Optional[str]:
    """'cosine' | 'linear' when the head's bias-free scores are a plain function of its centres
    (class-centre heads: cos(z, w_j) or w_j·z), else None (e.g. dismax, average_k)."""
    head = _inner_head(trainer)
    if not isinstance(head, ClassCentreHead):
        return None
    return "cosine" if head.normalized else "linear"


def class_centres(trainer) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(N x d centres, per-class thresholds or None) from the head's full (unsharded) state, or None
    when the head's scores are not a function of centres. A collective under Partial-FC: every rank."""
    if score_kind(trainer) is None:
        return None
    full = trainer.head.full_state_dict() if hasattr(trainer.head, "full_state_dict") else trainer.head.state_dict()
    weight = full["weight"].detach().float().cpu().contiguous()
    head, thresholds = _inner_head(trainer), None
    if getattr(head, "class_thresholds", None) is not None and "bias" in full:
        thresholds = (full["bias"].detach().float().cpu() / float(getattr(head, "scale", 1.0))).contiguous()
    return weight, thresholds


def model_card(trainer) -> ModelCard:
    """What evaluation and export need to rebuild the backbone and know its learned threshold,
    without importing the training code: architecture, options, head, bias b and threshold; and for
    closed-set evaluation how the head scores its classes (`scores`: cosine | linear | null), the
    number of classes and the centres file (written beside it by `ModelFiles` when `scores` is set)."""
    m, head = trainer.cfg.model, trainer.head
    bias = getattr(head, "bias", None)
    kind = score_kind(trainer)
    threshold = head.threshold
    threshold = threshold if threshold is not None and math.isfinite(threshold) else None
    return ModelCard(arch=m.arch, embedding_size=m.embedding_size, options=dict(m.options),
                     head=trainer.cfg.head.name,
                     bias=float(bias.detach()) if bias is not None and bias.numel() == 1 else None,
                     threshold=threshold, steps=trainer.step, weights=WEIGHTS_FILE, scores=kind,
                     num_classes=int(trainer.num_classes), centres=CENTRES if kind else None,
                     class_thresholds=None)


def write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


class Verification(Periodic):
    """Pair verification on .bin sets with the current backbone (eval mode, flip-sum, L2), rank 0 only.

    Logs per set `<name>/acc` and `/acc_std` (insightface 10-fold, facebce.eval.ten_fold),
    `/best_acc` and `/best_threshold` (one global cosine threshold fitted on all pairs), and for heads
    with a learned unified threshold (BCE: b/γ) `/learned_acc`, `/learned_tar`, `/learned_far` at it.
    """

    def __init__(self, bins: Sequence[tuple[str, Path]], every_steps: int, flip: bool = True, batch_size: int = 64):
        self.bins = [(name, Path(p)) for name, p in bins]
        self.every_steps, self.flip, self.batch_size = every_steps, flip, batch_size
        self.sets: list = []
        self.last_step: Optional[int] = None
        self.results: dict = {}

    def columns(self):
        return [f"{name}/{f}" for name, _ in self.bins for f in VERIFY_FIELDS]

    def on_train_start(self, trainer):
        if trainer.is_main:
            for name, path in self.bins:
                vs = load_bin(path)
                first, inverse = vs.distinct()  # embed each stored image once (LFW: 7701 of 12000)
                images = vs.decode(progress=False)[first][..., ::-1]
                self.sets.append((name, np.ascontiguousarray(images), inverse, vs.issame))

    def run(self, trainer) -> None:
        self.last_step = trainer.step
        if not trainer.is_main or not self.sets:
            return
        start = time.perf_counter()
        embedder = TorchEmbedder(trainer.backbone, batch_size=self.batch_size, flip=self.flip, normalize=True,
                                 channels_last=trainer.channels_last, autocast_dtype=trainer.autocast_dtype,
                                 progress=False)
        threshold = trainer.head.threshold
        parts = []
        for name, images_bgr, inverse, issame in self.sets:
            emb = embedder.embed(images_bgr)[inverse]
            e1, e2 = emb[0::2], emb[1::2]
            scores = np.sum(e1.astype(np.float64) * e2, axis=1)
            tf = ten_fold(e1, e2, issame)
            best = best_threshold(scores, issame)
            r = {"acc": tf.accuracy, "acc_std": tf.std, "best_acc": best.accuracy, "best_threshold": best.threshold}
            line = (f"{name}: 10-fold {tf.accuracy:.4f}±{tf.std:.4f}, "
                    f"best global cos>{best.threshold:.3f} {best.accuracy:.4f}")
            if threshold is not None:
                at = accuracy_at_threshold(scores, issame, threshold)
                r.update(learned_acc=at.accuracy, learned_tar=at.tar, learned_far=at.far)
                line += f", at learned {threshold:.3f}: {at.accuracy:.4f} (TAR {at.tar:.3f} FAR {at.far:.3f})"
            self.results[name] = r
            trainer.log(**{f"{name}/{k}": float(v) for k, v in r.items()})
            parts.append(line)
        trainer.say(f"[step {trainer.step}] verification ({time.perf_counter() - start:.1f} s): " + "; ".join(parts))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class ClassificationVal(Periodic):
    """Closed-set val on held-out images of the training identities (`data.val_fraction`), rank 0.

    Embeds them as the head sees a batch (eval mode, no flip, no L2 normalisation), scores them
    against the current class centres as the head's bias-free `scores()` do, and logs the BCE
    paper's uniform-classification figures (docs/metrics.md §1): `val/sw_acc`, `val/uni_acc`,
    `val/t_star`, the learned threshold `val/bias` (b or b/γ) and `val/bias_gap` (= bias − t*), and
    class-wise accuracy with optimised (`val/cw_opt_acc`) and learned (`val/cw_learned_acc`) thresholds.
    """

    def __init__(self, val, every_steps: int, batch_size: int = 64):
        self.val, self.every_steps, self.batch_size = val, every_steps, batch_size
        self.images: Optional[np.ndarray] = None
        self.last_step: Optional[int] = None
        self.result: dict = {}

    def columns(self):
        return [f"val/{f}" for f in VAL_FIELDS]

    def on_train_start(self, trainer):
        if not trainer.is_main:
            return
        if score_kind(trainer) is None:
            trainer.say(f"note: data.val_fraction: head {trainer.cfg.head.name!r} scores no class centres; "
                        "no closed-set val")
        else:
            self.images = self.val.images_bgr()

    def run(self, trainer) -> None:
        from facebce.eval.model_loading import class_scores  # facebce.eval's exact head scoring
        from facebce.eval.uniform import uniform_section

        self.last_step = trainer.step
        centres = class_centres(trainer) if score_kind(trainer) is not None else None  # a collective
        if not trainer.is_main or centres is None or self.images is None:
            return
        start = time.perf_counter()
        embedder = TorchEmbedder(trainer.backbone, batch_size=self.batch_size, flip=False, normalize=False,
                                 channels_last=trainer.channels_last, autocast_dtype=trainer.autocast_dtype,
                                 progress=False)
        weight, thresholds = centres
        scores = class_scores(score_kind(trainer), weight, embedder.embed(self.images))
        u = uniform_section(scores, self.val.labels, bias=trainer.head.threshold,
                            class_thresholds=None if thresholds is None else thresholds.double().numpy())
        r = {"sw_acc": u.sample_wise, "uni_acc": u.uniform.accuracy, "t_star": u.uniform.threshold,
             "bias": u.bias, "bias_gap": u.gap, "cw_opt_acc": u.class_wise_opt, "cw_learned_acc": u.class_wise_learned}
        self.result = {k: (None if v is None else float(v)) for k, v in r.items()}
        trainer.log(**{f"val/{k}": v for k, v in self.result.items() if v is not None})
        line = (f"[step {trainer.step}] val ({len(self.images)} held-out images, {time.perf_counter() - start:.1f} s): "
                f"SW {u.sample_wise:.4f}, Uni {u.uniform.accuracy:.4f} at t*={u.uniform.threshold:.3f}")
        if u.bias is not None:
            line += f", learned threshold {u.bias:.3f} (bias - t* = {u.gap:+.3f})"
        trainer.say(line)

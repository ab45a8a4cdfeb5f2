#!/usr/bin/env python3
"""facebce's benchmark suite (`make bench`): every figure beside a baseline measured in the same run.

One table (and `bench.json` + `bench.md` in --out): area, figure, facebce's number, the baseline's
number on the same inputs in the same process, the ratio (facebce / baseline, higher is better;
for memory, baseline / facebce) and the target. Every timing is the median of --repeats runs after
a warm-up. Areas (--only picks some):

  data     the trainer's input pipeline (.rec read + decode + flip + uint8 batching through the
           DataLoader with 0 and 2 workers, then the step's normalise_batch; two epochs from the
           DataLoader's start, as the trainer's one loader for the run) vs a bare cv2.imdecode loop
           over the same records' bytes with as many threads (the decode limit); with 2 workers
           also the workers' recycled batch buffers vs a fresh one per batch, alternately.
  train    r50 / mbf + bce_u_norm forward + backward + SGD step at batch 32 on the CPU: facebce's
           engine (Trainer) with its default auto setting (amp/channels_last chosen by timing at the
           start, facebce.train.autotune; the row carries the target) and each fixed setting, vs a
           plain fp32 eager loop over
           the same modules in NCHW, as arcface_torch runs them; the bf16 step's loss and backbone
           gradient against fp32 (numerics unchanged?); Partial-FC at 1M classes, r = 0.1, vs the
           full head (step time and peak memory, each in its own process).
  eval     LFW-sized 10-fold (6000 pairs) vs insightface's fixed-grid loops (verification.py
           transcribed: thresholds 0..4 step 0.01 per fold, VAL on 0..4 step 0.001), same numbers
           required; IJB-C-sized 1:1 scoring (469,375 images, 23,124 templates, 15.7M pairs in
           IJB-C's layout of 3,531 enrolment x 19,593 verification templates, synthetic features)
           vs a plain numpy transcription of eval_ijbc.py, same TAR@FAR required.
  onnx     onnxruntime (facebce's export, facebce's session settings) vs torch eager, r50 and mbf,
           batch 1 and 32, images/s; the static int8 variant (QDQ, calibrated on 64 LFW crops from
           ../shared) vs fp32 onnxruntime; all interleaved in one process.
  gallery  FAISS flat search through facebce's Gallery at 100k and 1M x 512 vs numpy brute force,
           1 query and 64-query batches; one query's gallery scan in GB/s as a fraction of the
           memory bandwidth of a large numpy copy measured in the same run (the roofline). Then the
           IVF-PQ index facebce chooses for 1M x 512 (10M with --large) vs exact flat on one face-like
           synthetic gallery (identities of ~12 images at cosine ~0.7): single-query QPS interleaved,
           index memory, recall@1/@10 against flat and open-set decision agreement.

  serve    `facebce serve` under load (tools/bench/bench_serve.py): identify req/s at 1, 4 and 16
           concurrent httpx clients on loopback vs the bare OnnxEmbedder + Gallery.search loop on the
           same LFW crops in the same run; p99 latency at 16 clients against the 300 ms budget; errors;
           and framed photos through the SCRFD detector vs bare detect + align + embed + search.

    python tools/bench/suite.py [--only data train eval onnx gallery serve] [--quick] [--out runs/bench]

  gpu      tools/bench/bench_gpu.py in a child process (CUDA only; on a CPU machine it says so and adds
           no rows): r50/r100 bf16 training samples/s and MFU (achieved TFLOP/s from counted FLOPs vs
           the card's dense bf16 peak; target 45 % for r50), torch.compile vs eager, a 1-process
           torchrun (NCCL) training run, onnxruntime execution providers vs torch, faiss-gpu.

`--quick` shrinks every size (a smoke run in about a minute; its numbers are not the figures).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]  # run from a checkout without installing; tools/bench helpers

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timing import median_seconds  # noqa: E402  (tools/bench/timing.py)

SHARED = Path(os.environ.get("FACEBCE_SHARED", REPO.parent / "shared"))
AREAS = ("data", "train", "eval", "onnx", "gallery", "serve", "gpu")


@dataclass
class Row:
    area: str
    figure: str
    facebce: float
    baseline: float | None
    unit: str
    ratio: float | None
    target: float | None = None  # the ratio to reach
    baseline_name: str = ""
    note: str = ""

    @property
    def meets(self) -> str:
        if self.target is None or self.ratio is None:
            return ""
        return "yes" if self.ratio >= self.target else "no"


def say(*parts) -> None:
    print(*parts, flush=True)


# ------------------------------------------------------------------------------------------ data
def bench_data(args) -> list[Row]:
    import cv2
    from torch.utils.data import DataLoader

    from facebce.data.rec_dataset import RecDataset
    from facebce.train.loader import (RING_SLOTS, EpochBatchSampler, SeededSamples, batch_collate, normalise_batch,
                                      raise_worker_errors)

    rec = SHARED / "data" / "celeba299" / "rec"
    tmp = None
    if not (rec / "train.rec").is_file() or args.quick:
        tmp = tempfile.TemporaryDirectory()
        rec = _synthetic_rec(Path(tmp.name), identities=20 if args.quick else 200, images=10)
    torch.set_num_threads(1)
    ds = RecDataset(rec, train=True)
    blobs = [ds.raw(i)[0] for i in range(len(ds))]
    say(f"[data] {rec}: {len(ds)} images, batch {args.batch}")

    def decode(chunk):
        for b in chunk:
            cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)

    def decode_limit(threads: int) -> float:
        chunks = [blobs[k::threads] for k in range(threads)]
        with ThreadPoolExecutor(threads) as pool:  # cv2 releases the GIL while it decodes
            t = median_seconds(lambda: list(pool.map(decode, chunks)), args.repeats)
        return len(blobs) / t

    per_epoch = len(ds) // args.batch

    def two_epochs(workers: int, recycle: int) -> float:
        """Seconds from the DataLoader's start (workers forked) through an epoch boundary, exactly
        as the trainer reads: uint8 batches in recycled worker buffers (recycle=0: a fresh shared
        buffer per batch, as before), one DataLoader for the run, normalised at the step."""
        samples = SeededSamples(ds, seed=0, uint8=True, recycle=recycle)
        loader = DataLoader(samples, batch_sampler=EpochBatchSampler(len(ds), args.batch, seed=0),
                            num_workers=workers, collate_fn=batch_collate, persistent_workers=False)
        start = time.perf_counter()
        batches = raise_worker_errors(loader, samples)  # hands each buffer back when the next is asked for
        n = sum(len(normalise_batch(x)) for x, _ in itertools.islice(batches, 2 * per_epoch))
        assert n == 2 * per_epoch * args.batch
        return time.perf_counter() - start

    rows = []
    for workers, threads in ((0, 1), (2, 2)):
        limit = decode_limit(threads)
        if workers == 0:
            two_epochs(0, RING_SLOTS)  # warm-up
            rate = 2 * per_epoch * args.batch / statistics.median(two_epochs(0, RING_SLOTS)
                                                                  for _ in range(args.repeats))
        else:  # recycled and fresh buffers alternately, each after a warm-up: the same machine for both
            two_epochs(workers, RING_SLOTS), two_epochs(workers, 0)
            times = {RING_SLOTS: [], 0: []}
            for _ in range(max(args.repeats, 3)):
                for recycle in times:
                    times[recycle].append(two_epochs(workers, recycle))
            rate, fresh = (2 * per_epoch * args.batch / statistics.median(times[k]) for k in (RING_SLOTS, 0))
            rows.append(Row("data", f"trainer pipeline, {workers} workers: recycled vs fresh worker buffers", rate,
                            fresh, "img/s", rate / fresh, None, "a fresh shared-memory batch per step",
                            f"{RING_SLOTS} buffers per worker; alternating runs"))
            say(f"  {workers} workers: recycled buffers {rate:.0f} img/s vs fresh {fresh:.0f} ({rate / fresh:.2f}x)")
        rows.append(Row("data", f"trainer pipeline, {workers} workers", rate, limit, "img/s", rate / limit, 0.9,
                        f"cv2.imdecode loop, {threads} thread{'s' if threads > 1 else ''}"))
        say(f"  {workers} workers: {rate:.0f} img/s vs decode limit {limit:.0f} ({rate / limit:.2f}x)")
    if tmp is not None:
        tmp.cleanup()
    return rows


def _synthetic_rec(folder: Path, identities: int, images: int) -> Path:
    """A small .rec of synthetic faces (`facebce data synth --rec`) when ../shared is absent."""
    from facebce.data.tools import synthesize

    synthesize(folder, identities=identities, images=images, rec=True)
    return folder / "rec"


# ----------------------------------------------------------------------------------------- train
def bench_train(args) -> list[Row]:
    rows = []
    if not args.peer_only:
        for arch in args.archs:
            rows += _train_step(arch, args)
        rows += _partial_fc(args)
    if args.peer_arcface is not None:
        rows += bench_peer_arcface(args)
    return rows


def _trainer(arch: str, classes: int, batch: int, run_dir: str, **overrides):
    from facebce.train import Trainer, load_config

    cfg = load_config(data={
        "data": {"kind": "synthetic", "synthetic": {"identities": classes, "images": 1}, "batch_size": batch,
                 "num_workers": 0},
        "model": {"arch": arch}, "head": {"name": "bce_u_norm", "scale": 64}, "steps": 1000,
        "checkpoint": {"dir": run_dir, "every_steps": 0}, "log": {"progress": False, "tensorboard": False},
        **overrides})
    return Trainer(cfg)


def _train_step(arch: str, args) -> list[Row]:
    from facebce.heads import build_head
    from facebce.models import build_backbone

    torch.set_num_threads(args.threads)
    b, classes = args.train_batch, 1000
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, 112, 112, generator=g) * 2 - 1
    y = torch.randint(0, classes, (b,), generator=g)
    steps = 2 if args.quick else args.repeats

    # the baseline: arcface_torch's loop, fp32 eager NCHW, same modules, grad clip 5, SGD momentum
    torch.manual_seed(0)
    backbone = build_backbone(arch)
    head = build_head("bce_u_norm", 512, classes, scale=64)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)

    def plain_step():
        out = head(backbone(x), y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
        opt.step()
    backbone.train()
    t_plain = median_seconds(plain_step, steps)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # the engine's default (auto: tuned on this batch, as a run tunes on its first) carries the target;
        # the fixed settings show what each pays
        settings = [("auto", {"amp": "auto", "channels_last": "auto"}),
                    ("channels_last", {"channels_last": True, "amp": "none"}),
                    ("bf16", {"amp": "bf16", "channels_last": False}),
                    ("channels_last + bf16", {"channels_last": True, "amp": "bf16"})]
        if args.quick:
            settings = settings[:1]
        if args.compile:
            settings.append(("channels_last + bf16 + compile", {"channels_last": True, "amp": "bf16", "compile": True}))
        for label, over in settings:
            tr = _trainer(arch, classes, b, str(Path(tmp) / label.replace(" ", "")), **over)
            if label == "auto":
                tr.tune_settings(x, y)
                label = f"auto (chose {_setting_label(tr.amp, tr.channels_last)})"
            t = median_seconds(_engine_step(tr, x, y), steps, warmup=3 if over.get("compile") else 1)
            rows.append(Row("train", f"{arch} + bce_u_norm step, batch {b}, {label}", b / t, b / t_plain,
                            "samples/s", t_plain / t, 2.5 if label.startswith("auto") else None,
                            "plain fp32 eager NCHW loop"))
            say(f"[train] {arch} {label}: {b / t:.2f} samples/s vs plain fp32 {b / t_plain:.2f} "
                f"({t_plain / t:.2f}x)")
        rows.append(_numerics(arch, x, y, classes))
    return rows


def _numerics(arch, x, y, classes) -> Row:
    """One step's loss and backbone gradient, bf16 + channels_last vs fp32 NCHW, from the same weights."""
    from facebce.heads import build_head
    from facebce.models import build_backbone

    torch.manual_seed(1)
    ref = build_backbone(arch).train()
    head = build_head("bce_u_norm", 512, classes, scale=64)
    fast = build_backbone(arch).train()
    fast.load_state_dict(ref.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    head_state = {k: v.clone() for k, v in head.state_dict().items()}

    def grads(model, autocast, cl):
        head.load_state_dict(head_state)
        model.zero_grad(set_to_none=True)
        inp = x.contiguous(memory_format=torch.channels_last) if cl else x
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            out = head(model(inp), y)
        out.loss.backward()
        return float(out.loss.detach()), torch.cat([p.grad.flatten().double() for p in model.parameters()
                                                    if p.grad is not None])
    l32, g32 = grads(ref, False, False)
    l16, g16 = grads(fast, True, True)
    cos = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
    say(f"[train] {arch} numerics: loss fp32 {l32:.4f} vs bf16+CL {l16:.4f}; backbone gradient cosine {cos:.5f}")
    return Row("train", f"{arch} bf16 + channels_last: backbone gradient cosine vs fp32", cos, None, "cosine",
               None, None, "", f"loss {l16:.4f} vs fp32 {l32:.4f}")


_PFC_CHILD = r"""
import json, resource, sys, time, statistics, torch
sys.path.insert(0, sys.argv[1])
from facebce.heads import PartialFC
classes, rate, batch = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
repeats, threads = int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
torch.manual_seed(0)
head = PartialFC({"name": "bce_u_norm", "scale": 64}, 512, classes, rate)
opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
emb = torch.randn(batch, 512, requires_grad=True)
y = torch.randint(0, classes, (batch,))
def step():
    out = head(emb, y)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
step()
times = []
for _ in range(repeats):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": statistics.median(times), "peak_rss": peak_rss}))
"""


def _partial_fc(args) -> list[Row]:
    classes = 20_000 if args.quick else args.pfc_classes
    res = {}
    for rate in (1.0, 0.1):
        out = subprocess.run([sys.executable, "-c", _PFC_CHILD, str(REPO), str(classes), str(rate),
                              str(args.train_batch),
                              str(2 if args.quick else args.repeats), str(args.threads)],
                             capture_output=True, text=True, check=True)
        res[rate] = json.loads(out.stdout.strip().splitlines()[-1])
    full, pfc = res[1.0], res[0.1]
    say(f"[train] Partial-FC {classes:,} classes, batch {args.train_batch}: r=0.1 {pfc['seconds'] * 1e3:.0f} ms "
        f"({pfc['peak_rss'] / 2**30:.2f} GiB peak) vs full head {full['seconds'] * 1e3:.0f} ms "
        f"({full['peak_rss'] / 2**30:.2f} GiB)")
    return [Row("train", f"Partial-FC r=0.1 head step, {classes:,} classes", 1 / pfc["seconds"], 1 / full["seconds"],
                "steps/s", full["seconds"] / pfc["seconds"], None, "full head (r=1)"),
            Row("train", f"Partial-FC r=0.1 peak memory, {classes:,} classes", pfc["peak_rss"] / 2**30,
                full["peak_rss"] / 2**30, "GiB", full["peak_rss"] / pfc["peak_rss"], None, "full head (r=1)",
                "ratio = full / Partial-FC")]


# the head arcface_torch trains with (configs/base.py: margin_list (1.0, 0.5, 0.0), s = 64), in facebce's terms
ARCFACE_HEAD = {"name": "softmax_norm", "scale": 64, "margin_list": [1.0, 0.5, 0.0]}

def bench_peer_arcface(args) -> list[Row]:
    """arcface_torch's own step (tools/bench/peer_arcface.py, from --peer-arcface DIR) vs facebce's Trainer
    step with its automatic setting, same architecture, batch, classes and ArcFace loss, interleaved in
    this process: each round times one block of --peer-steps steps of each, back to back (the order
    alternating); the figure is the median over --peer-rounds rounds of the per-round ratio."""
    import peer_arcface

    try:
        peer = peer_arcface.load_peer(args.peer_arcface)
    except peer_arcface.PeerError as e:
        say(f"[train] {e}; no arcface_torch rows")
        return []
    say(f"[train] peer: arcface_torch from {peer.folder}, run on the CPU with these shims:")
    for s in peer_arcface.SHIMS:
        say(f"          - {s}")
    torch.set_num_threads(args.threads)
    group = peer_arcface.ProcessGroup()
    rows = []
    try:
        for arch in args.archs:
            rows += _peer_arch(arch, peer, args)
    finally:
        group.close()
    return rows


def _peer_arch(arch: str, peer, args) -> list[Row]:
    import statistics

    import peer_arcface

    b, classes, steps, rounds = args.train_batch, args.peer_classes, args.peer_steps, args.peer_rounds
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, 112, 112, generator=g) * 2 - 1
    y = torch.randint(0, classes, (b,), generator=g)
    torch.manual_seed(0)
    try:
        theirs = peer_arcface.PeerStep(peer, arch, classes, x, y)
    except Exception as e:  # their get_model may not know the arch
        say(f"[train] --peer-arcface {peer.folder}: arcface_torch could not build {arch}: {type(e).__name__}: {e}")
        return []
    with tempfile.TemporaryDirectory() as tmp:
        label, ours = _facebce_auto(arch, classes, x, y, tmp)

        def block(fn):
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            return steps * b / (time.perf_counter() - t)
        theirs.step()  # warm-up (first-run allocations, oneDNN kernel choice)
        ours()
        peer_sps, our_sps = [], []
        for r in range(rounds):
            if r % 2 == 0:
                peer_sps.append(block(theirs.step))
                our_sps.append(block(ours))
            else:
                our_sps.append(block(ours))
                peer_sps.append(block(theirs.step))
            say(f"[train] {arch} vs arcface_torch, round {r + 1}/{rounds}: facebce {our_sps[-1]:.2f} samples/s, "
                f"arcface_torch {peer_sps[-1]:.2f} ({our_sps[-1] / peer_sps[-1]:.2f}x)")
    ratios = [o / p for o, p in zip(our_sps, peer_sps)]
    ratio, ours_med, peer_med = statistics.median(ratios), statistics.median(our_sps), statistics.median(peer_sps)
    say(f"[train] {arch} + ArcFace, batch {b}, {classes:,} classes: facebce {label} {ours_med:.2f} samples/s vs "
        f"arcface_torch fp32 {peer_med:.2f}; median ratio {ratio:.2f}x over {rounds} rounds (target 3x)")
    return [Row("train", f"{arch} + ArcFace step, batch {b}, {classes:,} classes: facebce {label} vs arcface_torch",
                ours_med, peer_med, "samples/s", ratio, 3.0, "arcface_torch's own step, fp32, .cuda() shimmed",
                f"median of {rounds} interleaved rounds of {steps} step{'s' if steps > 1 else ''} each; per-round "
                f"ratios {', '.join(f'{q:.3g}' for q in ratios)}")]


def _facebce_auto(arch: str, classes: int, x: torch.Tensor, y: torch.Tensor, tmp: str):
    """(label, step function): facebce's Trainer with `amp: auto` + `channels_last: auto`, tuned on this
    batch as a run tunes on its first (Trainer.tune_settings), the label saying what it chose."""
    tr = _trainer(arch, classes, len(x), str(Path(tmp) / "auto"), head=ARCFACE_HEAD, amp="auto",
                  channels_last="auto")
    tr.tune_settings(x, y)
    return f"auto -> {_setting_label(tr.amp, tr.channels_last)}", _engine_step(tr, x, y)


def _engine_step(tr, x: torch.Tensor, y: torch.Tensor):
    """One Trainer step on (x, y) as the run makes it (zero grad, forward + backward, optimizer step),
    with the model in train mode."""
    tr.model.train()

    def engine_step():
        tr.optimizer.zero_grad(set_to_none=True)
        tr._forward_backward(x, y, False, True)
        tr._optimizer_step(False)
    return engine_step


def _setting_label(amp: str, channels_last: bool) -> str:
    return " + ".join([{"none": "fp32"}.get(amp, amp)] + ["channels_last" if channels_last else "NCHW"])


# ------------------------------------------------------------------------------------------ eval
def bench_eval(args) -> list[Row]:
    from facebce.eval.tenfold import ten_fold_from_distances
    from tests.eval import reference_insightface as ref

    rng = np.random.default_rng(0)
    n = 6000
    issame = np.tile(np.r_[np.ones(300, bool), np.zeros(300, bool)], n // 600)
    e1 = rng.standard_normal((n, 512)).astype(np.float32)
    e2 = np.where(issame[:, None], e1, 0) + rng.standard_normal((n, 512)).astype(np.float32) * 1.2
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
    dist = np.sum((e1 - e2).astype(np.float64) ** 2, axis=1)
    mine = ten_fold_from_distances(dist, issame)
    theirs = ref.evaluate_distances(dist, issame)
    same = bool(np.isclose(mine.accuracy, np.mean(theirs[2]), rtol=0, atol=1e-12)
                and np.isclose(mine.val, theirs[4], rtol=0, atol=1e-12))
    t_mine = median_seconds(lambda: ten_fold_from_distances(dist, issame), max(args.repeats, 5))
    t_ref = median_seconds(lambda: ref.evaluate_distances(dist, issame), 1 if args.quick else args.repeats)
    say(f"[eval] LFW 10-fold, 6000 pairs: {t_mine * 1e3:.1f} ms vs insightface loops {t_ref * 1e3:.0f} ms; "
        f"accuracy {mine.accuracy:.4f} vs {np.mean(theirs[2]):.4f}, VAL {mine.val:.4f} vs {theirs[4]:.4f}")
    rows = [Row("eval", "LFW 10-fold + VAL@FAR, 6000 pairs", 1 / t_mine, 1 / t_ref, "evals/s", t_ref / t_mine, 10,
                "insightface verification.py loops", "identical accuracy and VAL" if same else "METRICS DIFFER")]

    import bench_ijb

    sizes = dict(images=469_375, templates=23_124, pairs=15_658_489, genuine=19_557, subjects=3_531)
    if args.quick:
        sizes = dict(images=20_000, templates=1_000, pairs=200_000, genuine=2_000, subjects=150)
    ns = argparse.Namespace(dim=512, signal=0.1, seed=0, layout="ijbc", **sizes)  # enrolment x verification pairs
    d = bench_ijb.synthetic_ijb(ns)
    rounds = 1 if args.quick else args.ijb_rounds
    runs = bench_ijb.interleaved(d, rounds)  # facebce (float32 Gram) and plain eval_ijbc.py, alternating
    del d
    (times_a, tar_a, s_a), (times_b, tar_b, s_b) = runs["facebce"], runs["plain (eval_ijbc.py)"]
    t_a, t_b = sum(times_a.values()), sum(times_b.values())
    same = bool(np.array_equal(tar_a, tar_b))
    stages = ", ".join(f"{k} {times_a[k]:.1f} vs {times_b[k]:.1f} s" for k in times_a)
    say(f"[eval] IJB-C-sized 1:1 ({sizes['templates']:,} templates, {sizes['pairs']:,} pairs): facebce {t_a:.1f} s "
        f"vs plain eval_ijbc.py {t_b:.1f} s ({stages}; median of {rounds}); identical TAR@FAR: {same}; "
        f"max |score diff| {np.max(np.abs(s_a - s_b)):.1e}")
    rows.append(Row("eval", f"IJB-C-sized 1:1 scoring ({sizes['pairs'] / 1e6:.1f}M pairs)", 1 / t_a, 1 / t_b, "runs/s",
                    t_b / t_a, 10, "plain numpy eval_ijbc.py", ("identical TAR@FAR" if same else "TAR@FAR DIFFER")
                    + f"; {t_a:.1f} s vs {t_b:.1f} s ({stages}); median of {rounds}"))
    return rows


# ------------------------------------------------------------------------------------------ onnx
def bench_onnx(args) -> list[Row]:
    """fp32 onnxruntime vs torch eager, and static int8 (QDQ, calibrated on real faces) vs fp32
    onnxruntime, interleaved in one process (median of --repeats rounds)."""
    from facebce.deploy import export_onnx
    from facebce.deploy.quantize import calibration_images
    from facebce.models import build_backbone
    from facebce.models.embedder import ort_session_options
    from timing import interleaved_medians

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    faces = SHARED / "data" / "lfw_aligned_10plus"
    calib = calibration_images(faces, limit=16 if args.quick else 64) if faces.is_dir() else None
    if calib is None:
        say(f"[onnx] {faces} not found: no int8-static rows (static int8 calibrates on real faces)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            torch.manual_seed(0)
            model = build_backbone(arch).eval()
            path = Path(tmp) / f"{arch}.onnx"
            t = time.perf_counter()
            report = export_onnx(model, path, check=False, variants=["int8-static"] if calib is not None else [],
                                 calib_images=calib)
            extra = f" + int8-static calibrated on {len(calib)} faces" if calib is not None else ""
            say(f"[onnx] {arch}: exported{extra} in {time.perf_counter() - t:.0f} s")
            sessions = {name: ort.InferenceSession(v.path, ort_session_options(args.threads),
                                                   providers=["CPUExecutionProvider"])
                        for name, v in report.variants.items()}
            for batch in ([1, 4] if args.quick else args.onnx_batches):
                x = np.random.default_rng(0).uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32)
                xt = torch.from_numpy(x)

                def torch_eager():
                    with torch.inference_mode():
                        model(xt)
                fns = {"torch": torch_eager, **{name: (lambda s=s: s.run(None, {"data": x}))
                                                 for name, s in sessions.items()}}
                med = interleaved_medians(fns, args.repeats)
                t_torch, t_ort = med["torch"], med["fp32"]
                rows.append(Row("onnx", f"{arch} batch {batch}, onnxruntime fp32", batch / t_ort, batch / t_torch,
                                "img/s", t_torch / t_ort, 1.0, "torch eager fp32"))
                say(f"[onnx] {arch} batch {batch}: ort {batch / t_ort:.1f} img/s vs torch eager {batch / t_torch:.1f} "
                    f"({t_torch / t_ort:.2f}x)")
                if "int8-static" in med:
                    t_q = med["int8-static"]
                    rows.append(Row("onnx", f"{arch} batch {batch}, onnxruntime int8-static", batch / t_q,
                                    batch / t_ort, "img/s", t_ort / t_q, 2.0 if batch >= 32 else None,
                                    "onnxruntime fp32", "QDQ, per-channel weights, calibrated on LFW faces"))
                    say(f"[onnx] {arch} batch {batch}: int8-static {batch / t_q:.1f} img/s vs ort fp32 "
                        f"{batch / t_ort:.1f} ({t_ort / t_q:.2f}x)")
    return rows


# --------------------------------------------------------------------------------------- gallery
def bench_gallery(args) -> list[Row]:
    import faiss

    import bench_gallery as bg
    from facebce.deploy import Gallery

    faiss.omp_set_num_threads(args.threads)
    rows = []
    dst = np.empty(1 << 29 if not args.quick else 1 << 26, np.uint8)
    src = np.ones_like(dst)
    t_copy = median_seconds(lambda: np.copyto(dst, src), args.repeats)
    copy_gbs = 2 * dst.nbytes / t_copy / 1e9
    dst = src = None  # free the 512 MB buffers before the galleries are built
    say(f"[gallery] roofline: numpy copy moves {copy_gbs:.1f} GB/s (read + write), faiss {faiss.__version__}")
    sizes = [20_000] if args.quick else args.gallery_sizes
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((args.queries, 512), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for n in sizes:
        data = rng.standard_normal((n, 512), dtype=np.float32)
        data /= np.linalg.norm(data, axis=1, keepdims=True)
        gallery = Gallery(512, threshold=0.3)
        for s in range(0, n, 100_000):
            gallery.add(data[s:s + 100_000], ["x"] * len(data[s:s + 100_000]))
        one = queries[:1]
        t1 = median_seconds(lambda: gallery.search(one, 5), args.repeats)
        n1 = median_seconds(lambda: bg.numpy_topk(data, one, 5), args.repeats)
        tb = median_seconds(lambda: gallery.search(queries, 5), args.repeats)
        nb = median_seconds(lambda: bg.numpy_topk(data, queries, 5), args.repeats)
        scan = data.nbytes / t1 / 1e9
        agree = float(np.mean(np.array([[m.id for m in r.matches] for r in gallery.search(queries, 5)])
                              == bg.numpy_topk(data, queries, 5)))
        label = f"{n // 1000}k" if n < 1_000_000 else f"{n / 1e6:g}M"
        rows += [
            Row("gallery", f"flat {label} x 512, 1 query", 1 / t1, 1 / n1, "queries/s", n1 / t1, None,
                "numpy brute force"),
            Row("gallery", f"flat {label} x 512, 1 query: scan vs memory bandwidth", scan, copy_gbs, "GB/s",
                scan / copy_gbs, 0.70, "numpy copy (read + write)"),
            Row("gallery", f"flat {label} x 512, {args.queries}-query batch", args.queries / tb, args.queries / nb,
                "queries/s", nb / tb, None, "numpy brute force", f"top-5 ids agree {agree:.1%}"),
        ]
        say(f"[gallery] {label}: 1 query {1 / t1:.1f} q/s ({scan:.1f} GB/s, {scan / copy_gbs:.0%} of copy) vs numpy "
            f"{1 / n1:.1f}; batch of {args.queries}: {args.queries / tb:.0f} q/s vs numpy {args.queries / nb:.0f}")
        gallery = data = None  # free this size's vectors before the next
    for n in ([50_000] if args.quick else args.gallery_ann_sizes + ([10_000_000] if args.large else [])):
        label = f"{n // 1000}k" if n < 1_000_000 else f"{n / 1e6:g}M"
        for j, r in enumerate(bg.ann_vs_flat(n, 512, memory_gb=args.memory_gb, say=say)):
            rows += [
                Row("gallery", f"{r['index']} {label} x 512 ({_ann_label(r)}, nprobe {r['nprobe']}), 1 query",
                    r["qps_ann"], r["qps_flat"], "queries/s", r["qps_ann"] / r["qps_flat"],
                    10.0, "flat (exact), interleaved in the same run",
                    f"recall@1 {r['recall@1']:.3f}, recall@10 {r['recall@10']:.3f} (probes of enrolled people), "
                    f"open-set decision agreement {r['decision_agreement']:.4f} (all probes); strangers' "
                    f"recall@1 {r['stranger_recall@1']:.3f}, top-1 identity {r['top1_identity']:.3f}"),
                Row("gallery", f"{r['index']} {label} x 512 (nprobe {r['nprobe']}): recall@1, enrolled people's "
                    f"probes", r["recall@1"], 1.0, "fraction", r["recall@1"], 0.95, "exact flat top-1 (same probes)"),
                Row("gallery", f"{r['index']} {label} x 512 (nprobe {r['nprobe']}): open-set decision agreement",
                    r["decision_agreement"], 1.0, "fraction", r["decision_agreement"], 0.99,
                    "exact flat decision (same probes, same threshold)"),
            ]
            if j == 0:  # one index, several nprobe rows
                rows.append(Row("gallery", f"{r['index']} {label} x 512, index memory (codes + re-ranking copy)",
                                r["ann_bytes"] / 1e6, r["flat_bytes"] / 1e6, "MB", r["flat_bytes"] / r["ann_bytes"],
                                None, "flat index (vectors + ids)"))
    return rows


def _ann_label(r: dict) -> str:
    code = f"{r['pq_m'] * r.get('pq_bits', 8) // 8} B {'fast-scan ' if r.get('pq_bits') == 4 else ''}codes"
    refine = f", re-ranked on {r['refine']} vectors" if r.get("refine", "none") != "none" else ""
    return f"nlist {r['nlist']}, {code}{refine}"


# ----------------------------------------------------------------------------------------- serve
def bench_serve(args) -> list[Row]:
    import bench_serve as bs  # tools/bench/bench_serve.py

    if not (bs.MODEL.exists() and bs.LFW.exists()):
        say(f"[serve] skipped: needs the shared MobileFaceNet and LFW crops ({bs.MODEL.parent.parent})")
        return []
    say("[serve] facebce serve subprocess on 127.0.0.1, asyncio httpx clients")
    res = bs.run(quick=args.quick, detector=True, log=say)
    rows = []
    for r in res["levels"]:
        rows.append(Row("serve", f"identify, {r['clients']} clients", r["rps"], r["bare_rps"], "req/s", r["ratio"],
                        0.8 if r["clients"] == 16 else None, "bare OnnxEmbedder + Gallery.search loop",
                        f"p50 {r['p50_ms']:.0f} / p95 {r['p95_ms']:.0f} / p99 {r['p99_ms']:.0f} ms; "
                        f"{r['errors']} errors in {r['requests']}"))
    top = res["levels"][-1]
    rows.append(Row("serve", f"p99 latency, {top['clients']} clients", top["p99_ms"], 300.0, "ms",
                    300.0 / top["p99_ms"], 1.0, "the 300 ms budget", "ratio = budget / p99"))
    if "no_flip" in res:
        r = res["no_flip"]
        rows.append(Row("serve", "identify, 16 clients, --no-flip", r["rps"], r["bare_rps"], "req/s", r["ratio"],
                        0.8, "bare loop without flip",
                        f"p50 {r['p50_ms']:.0f} / p95 {r['p95_ms']:.0f} / p99 {r['p99_ms']:.0f} ms; "
                        f"{r['errors']} errors in {r['requests']}"))
        rows.append(Row("serve", "p99 latency, 16 clients, --no-flip", r["p99_ms"], 300.0, "ms",
                        300.0 / r["p99_ms"], 1.0, "the 300 ms budget", "ratio = budget / p99"))
    if "detector" in res:
        r = res["detector"]
        rows.append(Row("serve", "identify photos (detector), 4 clients", r["rps"], r["bare_rps"], "req/s",
                        r["ratio"], None, "bare detect + align + embed + search loop",
                        f"p99 {r['p99_ms']:.0f} ms; {r['errors']} errors in {r['requests']}"))
    return rows


def machine() -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def table(rows: list[Row]) -> str:
    def num(v):
        if v is None:
            return "—"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    out = ["| area | figure | facebce | baseline | unit | ratio | target | meets | baseline is / note |",
           "|---|---|---:|---:|---|---:|---:|---|---|"]
    for r in rows:
        pct = r.unit in ("GB/s", "TFLOP/s")  # fractions of a ceiling (bandwidth, peak FLOP/s)
        ratio = "—" if r.ratio is None else (f"{r.ratio:.0%}" if pct else f"{r.ratio:.2f}x")
        target = "—" if r.target is None else (f"≥ {r.target:.0%}" if pct else f"≥ {r.target:g}x")
        why = "; ".join(x for x in (r.baseline_name, r.note) if x)
        out.append(f"| {r.area} | {r.figure} | {num(r.facebce)} | {num(r.baseline)} | {r.unit} | {ratio} | {target} "
                   f"| {r.meets} | {why} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ gpu
def bench_gpu(args) -> list[Row]:
    """tools/bench/bench_gpu.py's JSON as rows: MFU rows as achieved TFLOP/s vs the peak it divides by."""
    out = args.out / "gpu"
    p = subprocess.run([sys.executable, str(HERE / "bench_gpu.py"), "--out", str(out)], cwd=REPO, text=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    say("[gpu] " + (p.stdout.strip().splitlines() or ["(no output)"])[-1])
    if p.returncode != 0 or not (out / "bench_gpu.json").is_file():
        return []
    return gpu_rows(json.loads((out / "bench_gpu.json").read_text()))


def gpu_rows(doc: dict) -> list[Row]:
    peak, rows = doc["meta"]["peak_tflops"], []
    sps = {r["row"]: r["value"] for r in doc["rows"] if r["figure"] == "samples/s"}
    for r in doc["rows"]:
        if r["figure"] == "MFU":
            achieved = r["value"] / 100 * peak
            rows.append(Row("gpu", f"{r['row']}: MFU", achieved, peak, "TFLOP/s", achieved / peak,
                            0.45 if " r50 " in f" {r['row']} " else None, "dense bf16 peak", r.get("note", "")))
        elif r["row"].startswith("compile") and "train r50 b128" in sps:
            rows.append(Row("gpu", r["row"], r["value"], sps["train r50 b128"], r["unit"],
                            r["value"] / sps["train r50 b128"], None, "eager", r.get("note", "")))
        else:
            rows.append(Row("gpu", f"{r['row']}, {r['figure']}", r["value"], None, r["unit"], None,
                            note=r.get("note", "")))
    rows += [Row("gpu", s["row"], None, None, "", None, note="skipped: " + s["why"]) for s in doc["skipped"]]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=AREAS, default=list(AREAS))
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not the figures")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch/ORT/FAISS threads (default: all cores)")
    ap.add_argument("--batch", type=int, default=128, help="data: batch size")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--archs", nargs="+", default=["r50", "mbf"])
    ap.add_argument("--compile", action="store_true", help="train: also time torch.compile (minutes of compiling)")
    ap.add_argument("--pfc-classes", type=int, default=1_000_000)
    ap.add_argument("--peer-arcface", type=Path, default=None, metavar="DIR",
                    help="train: also time arcface_torch's own step (a copy of insightface's "
                         "recognition/arcface_torch) against facebce's automatic setting")
    ap.add_argument("--peer-classes", type=int, default=10_000, help="train: classes of the peer comparison")
    ap.add_argument("--peer-rounds", type=int, default=4, help="train: interleaved peer/facebce rounds")
    ap.add_argument("--peer-steps", type=int, default=2, help="train: steps per peer or facebce block in a round")
    ap.add_argument("--peer-only", action="store_true", help="train: only the arcface_torch peer rows")
    ap.add_argument("--ijb-rounds", type=int, default=2, help="eval: interleaved IJB-C rounds (each ~2 min)")
    ap.add_argument("--onnx-batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--gallery-sizes", nargs="+", type=int, default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--gallery-ann-sizes", nargs="+", type=int, default=[1_000_000],
                    help="gallery: IVF-PQ (chosen by facebce for the size and --memory-gb) vs flat at these sizes")
    ap.add_argument("--memory-gb", type=float, default=None, help="gallery: memory budget for the IVF-PQ choice")
    ap.add_argument("--large", action="store_true", help="gallery: also 10M x 512 (about 20 GB for flat)")
    args = ap.parse_args(argv)
    if args.quick:
        args.archs = ["mbf"]
        args.repeats = 1
    start = time.perf_counter()
    info = machine()
    # the peer-only train rows are medians of their own interleaved rounds, not of --repeats
    timing = (f"medians of {args.peer_rounds} interleaved rounds" if args.only == ["train"] and args.peer_only
              else f"median of {args.repeats}")
    say(f"facebce bench on {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
        f"{'CUDA ' + info['cuda'] if info['cuda'] else 'no GPU'}; {timing}")
    rows: list[Row] = []
    for area in AREAS:
        if area in args.only:
            t = time.perf_counter()
            rows += globals()[f"bench_{area}"](args)
            say(f"  ({area}: {time.perf_counter() - t:.0f} s)")
    md = table(rows)
    total = time.perf_counter() - start
    say("\n" + md + f"\n\n{len(rows)} figures in {total:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info, "seconds": round(total, 1), "quick": args.quick, "repeats": args.repeats,
           "rows": [asdict(r) | {"meets": r.meets} for r in rows]}
    for name, text in (("bench.json", json.dumps(doc, indent=2) + "\n"),
                       ("bench.md", f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
                                    f"{info['date']}; {timing}.\n\n{md}\n")):
        tmp = args.out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, args.out / name)
    say(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

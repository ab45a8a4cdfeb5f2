#!/usr/bin/env python3
"""GPU rows of `make bench` (issue 17 §GPU): run on a CUDA machine; elsewhere prints one line and exits 0.

    PYTHONPATH=. python tools/bench/bench_gpu.py --out runs/bench_gpu [--budget 400]

Rows, each written to <out>/bench_gpu.json and bench_gpu.md as soon as it is measured (a run that is
stopped keeps what it had), each under its own time cap, skipped (and said so) when the budget is spent:

  matmul   a bf16 8192^3 torch.matmul: the rate this card reaches on dense bf16 (a measured ceiling,
           printed beside the datasheet peak that MFU divides by).
  train    r50 / r100 + bce_u_norm (93,431 classes, MS1MV3's count) training step on synthetic data
           (random 3x112x112 inputs and labels, as arcface_torch's speed test): facebce.models.build_backbone,
           facebce.heads.build_head, SGD (momentum 0.9, wd 5e-4), bf16 autocast, channels_last,
           cudnn.benchmark; batch 128 and 256; samples/s over timed steps after a warm-up (synchronised).
           FLOPs per sample are counted from the model: torch.utils.flop_counter.FlopCounterMode over one
           real forward + backward of backbone and head (convolutions and matmuls; BN/PReLU/loss
           element-wise work is not counted, as is usual for MFU). MFU = samples/s x FLOPs/sample / peak.
  compile  r50, batch 128, torch.compile on the backbone vs eager (compile time reported separately;
           run in a child process with a hard time cap).
  torchrun `torchrun --nproc_per_node 1 -m facebce.cli train recipes/demo_synthetic.yaml` with r50, bf16,
           a few steps: the engine picks NCCL on CUDA; reports finished / samples/s from its log.
  onnx     r50 exported with facebce.deploy.export_onnx, onnxruntime CPU vs CUDA EP (and TensorRT EP
           when listed and the budget allows), batch 1 and 32, images/s and max |diff| vs torch fp32.
  faiss    faiss-gpu (if importable): flat inner-product search 1M x 512, 1,024 queries, GPU vs CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Dense BF16 tensor-core peak of an H100/H200 SXM (NVIDIA datasheet: 1,979 TFLOPS "with sparsity",
# i.e. 989.4 dense). Other cards: pass --peak-tflops.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}
NUM_CLASSES = 93_431  # MS1MV3 identities
HEAD = "bce_u_norm"


def say(*parts) -> None:
    print(*parts, flush=True)


class Results:
    """Rows kept in memory and rewritten to <out> after each one (JSON + Markdown)."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.rows, self.skipped = out, meta, [], []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, **row) -> None:
        self.rows.append(row)
        say("  ", json.dumps(row))
        self.write()

    def skip(self, what: str, why: str) -> None:
        self.skipped.append({"row": what, "why": why})
        say(f"  skipped {what}: {why}")
        self.write()

    def write(self) -> None:
        (self.out / "bench_gpu.json").write_text(json.dumps(
            {"meta": self.meta, "rows": self.rows, "skipped": self.skipped}, indent=1))
        lines = [f"GPU: {self.meta.get('gpu')}; torch {self.meta.get('torch')}; peak {self.meta.get('peak_tflops')} "
                 f"TFLOPS dense bf16 ({self.meta.get('peak_source')})", "",
                 "| row | figure | value | unit | note |", "| --- | --- | --- | --- | --- |"]
        for r in self.rows:
            lines.append(f"| {r['row']} | {r['figure']} | {r['value']:.4g} | {r['unit']} | {r.get('note', '')} |")
        for s in self.skipped:
            lines.append(f"| {s['row']} | skipped | | | {s['why']} |")
        (self.out / "bench_gpu.md").write_text("\n".join(lines) + "\n")


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ------------------------------------------------------------------------------------------ train
def build_step(arch: str, batch: int, compile_backbone: bool = False, device: str = "cuda",
               num_classes: int = NUM_CLASSES):
    """(step(), backbone, head, opt, x, y): one training step of facebce's real backbone + head."""
    import torch

    from facebce.heads import build_head
    from facebce.models import build_backbone

    dev = torch.device(device)
    torch.manual_seed(0)
    backbone = build_backbone(arch, embedding_size=512).to(dev).to(memory_format=torch.channels_last)
    head = build_head(HEAD, 512, num_classes).to(dev)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 112, 112, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    fwd = torch.compile(backbone) if compile_backbone else backbone

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = head(fwd(x), y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, backbone, head, opt, x, y


def flops_per_sample(arch: str, batch: int, device: str = "cuda", num_classes: int = NUM_CLASSES) -> float:
    """Forward + backward FLOPs per sample of backbone + head, counted by FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    step, backbone, head, opt, x, y = build_step(arch, batch, device=device, num_classes=num_classes)
    with FlopCounterMode(display=False) as fc:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = head(backbone(x), y).loss
        loss.backward()
    total = fc.get_total_flops()
    del step, backbone, head, opt, x, y
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return total / batch


def time_steps(step, warmup: int, steps: int, cap_s: float) -> tuple[float, int]:
    """(seconds per step, timed steps): warm-up, then up to `steps` synchronised steps within cap_s."""
    import torch

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    while n < steps:
        step()
        n += 1
        if n % 5 == 0:
            torch.cuda.synchronize()
            if time.perf_counter() - t0 > cap_s:
                break
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n, n


def bench_train(res: Results, budget: Budget, peak: float, args) -> None:
    import torch

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    flops = {}
    for arch in ("r50", "r100"):
        for batch in (128, 256):
            name = f"train {arch} b{batch}"
            if budget.left() < 40:
                res.skip(name, "time budget spent")
                continue
            try:
                if arch not in flops:
                    flops[arch] = res.meta[f"flops_{arch}"] = flops_per_sample(arch, 32)
                step, *_ = build_step(arch, batch)
                sec, n = time_steps(step, warmup=args.warmup, steps=args.steps, cap_s=min(15.0, budget.left() - 20))
                sps = batch / sec
                mfu = sps * flops[arch] / (peak * 1e12)
                mem = torch.cuda.max_memory_allocated() / 2**30
                note = (f"{HEAD} {NUM_CLASSES} classes, bf16 autocast, channels_last, SGD; {n} timed steps; "
                        f"{flops[arch] / 1e9:.2f} GFLOP/sample (fwd+bwd, counted); peak mem {mem:.1f} GiB")
                res.add(row=name, figure="samples/s", value=sps, unit="samples/s", note=note)
                res.add(row=name, figure="MFU", value=100 * mfu, unit="% of peak",
                        note="target >= 45 % (r50)" if arch == "r50" else "")
                del step
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            except Exception as e:  # noqa: BLE001 - one row's failure is reported, the others still run
                res.skip(name, f"{type(e).__name__}: {str(e)[:200]}")


def bench_split(res: Results, budget: Budget, peak: float, args) -> None:
    """Where the r50 step's time goes: batch 512, and the backbone alone (fwd+bwd, no head, no optimizer)."""
    import torch

    torch.backends.cudnn.benchmark = True
    if budget.left() > 40:
        fl = flops_per_sample("r50", 32)
        step, *_ = build_step("r50", 512)
        sec, n = time_steps(step, warmup=args.warmup, steps=args.steps, cap_s=min(15.0, budget.left() - 20))
        res.add(row="train r50 b512", figure="samples/s", value=512 / sec, unit="samples/s",
                note=f"as the rows above; {n} timed steps; MFU {100 * 512 / sec * fl / (peak * 1e12):.1f} %")
        del step
        torch.cuda.empty_cache()
    if budget.left() > 30:
        from torch.utils.flop_counter import FlopCounterMode

        from facebce.models import build_backbone

        bb = build_backbone("r50", embedding_size=512).cuda().to(memory_format=torch.channels_last)
        x = torch.randn(256, 3, 112, 112, device="cuda").contiguous(memory_format=torch.channels_last)

        def fb():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = bb(x)
            out.float().square().mean().backward()

        with FlopCounterMode(display=False) as fc:
            fb()
        fl = fc.get_total_flops() / 256
        sec, n = time_steps(fb, warmup=args.warmup, steps=args.steps, cap_s=min(15.0, budget.left() - 10))
        res.add(row="r50 backbone only b256", figure="samples/s", value=256 / sec, unit="samples/s",
                note=f"fwd+bwd, no head, no optimizer; {fl / 1e9:.2f} GFLOP/sample; "
                     f"MFU {100 * 256 / sec * fl / (peak * 1e12):.1f} %")


def compile_child(args) -> int:
    """Child process: r50 b128 with the backbone compiled; prints one JSON line."""
    import torch

    torch.backends.cudnn.benchmark = True
    step, *_ = build_step("r50", 128, compile_backbone=True)
    t0 = time.perf_counter()
    step()
    step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    sec, n = time_steps(step, warmup=3, steps=args.steps, cap_s=20.0)
    print("COMPILE_RESULT " + json.dumps({"compile_s": compile_s, "samples_s": 128 / sec, "steps": n}), flush=True)
    return 0


def bench_compile(res: Results, budget: Budget, peak: float, args) -> None:
    cap = min(args.compile_cap, budget.left() - 10)
    if cap < 60:
        res.skip("compile r50 b128", f"time budget spent ({budget.left():.0f} s left)")
        return
    try:
        p = subprocess.run([sys.executable, __file__, "--compile-child", "--steps", str(args.steps)], cwd=REPO,
                           capture_output=True, text=True, timeout=cap, env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        res.skip("compile r50 b128", f"torch.compile did not finish within its {cap:.0f} s cap")
        return
    m = re.search(r"COMPILE_RESULT (\{.*\})", p.stdout)
    if not m:
        res.skip("compile r50 b128", f"child exited {p.returncode}: {(p.stderr or p.stdout)[-300:]}")
        return
    r = json.loads(m.group(1))
    eager = next((x["value"] for x in res.rows if x["row"] == "train r50 b128" and x["figure"] == "samples/s"), None)
    fl = res.meta.get("flops_r50")
    note = f"compile (first 2 steps) {r['compile_s']:.0f} s; {r['steps']} timed steps"
    if eager:
        note += f"; eager {eager:.0f} samples/s, ratio {r['samples_s'] / eager:.2f}"
    if fl:
        note += f"; MFU {100 * r['samples_s'] * fl / (peak * 1e12):.1f} %"
    res.add(row="compile r50 b128", figure="samples/s (torch.compile backbone)", value=r["samples_s"],
            unit="samples/s", note=note)


# ------------------------------------------------------------------------------------------ torchrun
RECIPE = """base: {base}
data:
  kind: synthetic
  synthetic: {{identities: 100, images: 20, heldout_identities: 0, heldout_images: 0, heldout_pairs: 0}}
  batch_size: 128
  num_workers: 4
  cache: true
model: {{arch: r50, embedding_size: 512}}
head: {{name: bce_u_norm}}
amp: bf16
channels_last: true
steps: 60
epochs: null
checkpoint: {{dir: {run}, every_steps: 1000}}
verification: {{every_steps: 1000}}
log: {{every_steps: 20, tensorboard: false}}
"""
def bench_torchrun(res: Results, budget: Budget, args) -> None:
    cap = min(120.0, budget.left() - 20)
    if cap < 45:
        res.skip("torchrun nccl", "time budget spent")
        return
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "gpu_synthetic.yaml"  # demo_synthetic's data, the r50 bf16 training settings
        recipe.write_text(RECIPE.format(base=REPO / "recipes" / "base.yaml", run=Path(tmp) / "run"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "facebce.cli", "train", str(recipe)]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=cap,
                               env={**os.environ, "PYTHONPATH": str(REPO), "NCCL_DEBUG": "WARN"})
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"")[-400:] if isinstance(e.stdout, bytes) else str(e.stdout or "")[-400:]
            res.skip("torchrun nccl", f"did not finish within {cap:.0f} s; last output: {out}")
            return
        wall = time.perf_counter() - t0
        log = p.stdout + p.stderr
        for f in sorted((Path(tmp) / "run").rglob("*")):
            if f.is_file() and f.suffix in (".jsonl", ".json", ".log", ".txt") and f.stat().st_size < 2_000_000:
                log += "\n" + f.read_text(errors="replace")
        (res.out / "torchrun.log").write_text(log[-60_000:])
        rates = [float(v) for v in re.findall(r"samples_per_s\"?[:=]\s*([0-9.]+)", log)]
        rates += [float(v) for v in re.findall(r"([0-9.]+) samples/s", log)]
        if p.returncode != 0:
            res.skip("torchrun nccl", f"exit {p.returncode}: {log[-300:]}")
            return
        res.add(row="torchrun train", figure="finished", value=1.0, unit="exit 0",
                note=f"1 process, r50 bf16 b128, 60 steps, wall {wall:.0f} s incl. start + synthetic data; world "
                     "size 1: the engine creates no process group, so this run does not touch NCCL")
        if rates:
            res.add(row="torchrun train", figure="samples/s (last log line)", value=rates[-1], unit="samples/s",
                    note="facebce engine: synthetic images through the DataLoader, uint8 -> device normalise")


NCCL_PROBE = """
import os, time, torch, torch.distributed as dist
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
x = torch.ones(64 << 20, device="cuda")  # 256 MB
dist.all_reduce(x); torch.cuda.synchronize()
t = time.perf_counter(); n = 20
for _ in range(n):
    dist.all_reduce(x)
torch.cuda.synchronize()
gbs = n * x.numel() * 4 / (time.perf_counter() - t) / 1e9
print("NCCL_PROBE", dist.get_backend(), dist.get_world_size(), float(x[0]), gbs)
dist.destroy_process_group()
"""


def bench_nccl(res: Results, budget: Budget) -> None:
    """A 1-process torchrun that initialises an NCCL process group and all-reduces 256 MB."""
    if budget.left() < 40:
        res.skip("torchrun nccl", "time budget spent")
        return
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "nccl_probe.py"
        probe.write_text(NCCL_PROBE)
        try:
            p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                "1", str(probe)], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            res.skip("torchrun nccl", "NCCL probe did not finish in 60 s")
            return
    m = re.search(r"NCCL_PROBE (\S+) (\d+) (\S+) (\S+)", p.stdout)
    if p.returncode != 0 or not m:
        res.skip("torchrun nccl", f"exit {p.returncode}: {(p.stderr or p.stdout)[-300:]}")
        return
    res.add(row="torchrun nccl", figure="all_reduce 256 MB, 1 rank", value=float(m.group(4)), unit="GB/s",
            note=f"backend {m.group(1)}, world size {m.group(2)}, value after 21 all-reduces {m.group(3)} (1 rank: "
                 "a local copy; shows the NCCL group starts and works)")


# ------------------------------------------------------------------------------------------ onnx
def bench_onnx(res: Results, budget: Budget, args) -> None:
    if budget.left() < 60:
        res.skip("onnx r50", "time budget spent")
        return
    import numpy as np
    import onnxruntime as ort
    import torch

    from facebce.models import build_backbone

    avail = ort.get_available_providers()
    res.meta["onnxruntime"] = f"{ort.__version__}; providers {avail}"
    torch.manual_seed(0)
    model = build_backbone("r50", embedding_size=512).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r50.onnx"
        try:  # facebce.deploy imports faiss (the gallery); without it, the same export settings by hand
            from facebce.deploy import export_onnx
            export_onnx(model, path, check=False)
            how = "facebce.deploy.export_onnx"
        except ImportError as e:
            torch.onnx.export(model, torch.zeros(1, 3, 112, 112), str(path), opset_version=17, dynamo=False,
                              input_names=["data"], output_names=["embedding"],
                              dynamic_axes={"data": {0: "batch"}, "embedding": {0: "batch"}})
            how = f"torch.onnx.export opset 17 (facebce.deploy not importable: {e})"
        res.meta["onnx_export"] = how
        rng = np.random.default_rng(0)
        data = {b: rng.standard_normal((b, 3, 112, 112)).astype(np.float32) for b in (1, 32)}
        mcuda = model.cuda()
        torch.backends.cudnn.allow_tf32 = False  # an fp32 reference (cuDNN convolutions default to TF32)
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.no_grad():
            ref = {b: mcuda(torch.from_numpy(x).cuda()).float().cpu().numpy() for b, x in data.items()}
        eps = [("CPUExecutionProvider", ["CPUExecutionProvider"])]
        if "CUDAExecutionProvider" in avail:
            eps.append(("CUDAExecutionProvider", [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}),
                                                  "CPUExecutionProvider"]))
        else:
            res.skip("onnx CUDA EP", f"not in onnxruntime's providers {avail}")
        if "TensorrtExecutionProvider" in avail:
            eps.append(("TensorrtExecutionProvider", ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                      "CPUExecutionProvider"]))
        else:
            res.skip("onnx TensorRT EP", "not in onnxruntime's providers")
        for name, providers in eps:
            if budget.left() < 30:
                res.skip(f"onnx {name}", "time budget spent")
                continue
            try:
                sess = ort.InferenceSession(str(path), providers=providers)
                used = sess.get_providers()[0]
                for b, x in data.items():
                    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]  # warm-up (and engine build)
                    for _ in range(2):
                        sess.run(None, {sess.get_inputs()[0].name: x})
                    t0, n = time.perf_counter(), 0
                    while n < 200 and time.perf_counter() - t0 < 5.0:
                        sess.run(None, {sess.get_inputs()[0].name: x})
                        n += 1
                    ips = b * n / (time.perf_counter() - t0)
                    diff = float(np.abs(out - ref[b]).max() / np.abs(ref[b]).max())
                    o64, r64 = out.astype(np.float64), ref[b].astype(np.float64)  # random-init r50: huge values
                    o64 /= np.linalg.norm(o64, axis=1, keepdims=True)
                    r64 /= np.linalg.norm(r64, axis=1, keepdims=True)
                    cos = float((o64 * r64).sum(1).min())
                    res.add(row=f"onnx r50 {name}", figure=f"batch {b}", value=ips, unit="images/s",
                            note=f"session on {used}; vs torch fp32 CUDA (TF32 off): max |diff| / max |ref| "
                                 f"{diff:.1e}, min cosine {cos:.6f}; {n} runs")
            except Exception as e:  # noqa: BLE001
                res.skip(f"onnx {name}", f"{type(e).__name__}: {str(e)[:200]}")
        # torch baselines in the same run: eager fp32 on the GPU
        with torch.no_grad():
            for b, x in data.items():
                xt = torch.from_numpy(x).cuda()
                for _ in range(3):
                    mcuda(xt)
                torch.cuda.synchronize()
                t0, n = time.perf_counter(), 0
                while n < 200 and time.perf_counter() - t0 < 3.0:
                    mcuda(xt).cpu()
                    n += 1
                res.add(row="onnx r50 torch eager fp32 CUDA (baseline)", figure=f"batch {b}",
                        value=b * n / (time.perf_counter() - t0), unit="images/s", note="same inputs, output to host")


# ------------------------------------------------------------------------------------------ faiss
def bench_faiss(res: Results, budget: Budget, args) -> None:
    try:
        import faiss
    except Exception as e:  # noqa: BLE001
        res.skip("faiss-gpu", f"faiss not importable here: {type(e).__name__}: {str(e)[:160]}")
        return
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        res.skip("faiss-gpu", f"faiss {faiss.__version__} has no GPU support / sees no GPU")
        return
    if budget.left() < 30:
        res.skip("faiss-gpu", "time budget spent")
        return
    import numpy as np

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((1_000_000, 512), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[:1024].copy()
    cpu = faiss.IndexFlatIP(512)
    cpu.add(xb)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    for name, idx in (("GPU", gpu), ("CPU", cpu)):
        idx.search(xq[:8], 10)
        t0 = time.perf_counter()
        _, ids = idx.search(xq, 10)
        dt = time.perf_counter() - t0
        self_hit = float((ids[:, 0] == np.arange(1024)).mean())
        res.add(row=f"faiss flat IP 1M x 512 {name}", figure="1,024 queries, k=10", value=1024 / dt,
                unit="queries/s", note=f"faiss {faiss.__version__}; query found itself first: {self_hit:.3f}")


# ------------------------------------------------------------------------------------------ main
def matmul_ceiling(res: Results) -> None:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    tf = 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12
    res.meta["matmul_bf16_tflops"] = tf
    res.add(row="matmul bf16 8192^3", figure="TFLOP/s", value=tf, unit="TFLOP/s",
            note=f"measured ceiling: {100 * tf / res.meta['peak_tflops']:.0f} % of the datasheet peak")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench_gpu")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds for the whole run (rows skipped after)")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per training row (capped at 15 s)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--compile-cap", type=float, default=180.0)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak to divide by")
    ap.add_argument("--only", nargs="+", default=["train", "split", "compile", "torchrun", "onnx", "faiss"],
                    choices=["train", "split", "compile", "torchrun", "onnx", "faiss"])
    ap.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("no torch: GPU rows skipped")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: GPU rows skipped")
        return 0
    if args.compile_child:
        return compile_child(args)
    budget = Budget(args.budget)
    gpu = torch.cuda.get_device_name(0)
    peak, source = args.peak_tflops, "--peak-tflops"
    if peak is None:
        key = next((k for k in PEAK_BF16_TFLOPS if k in gpu), None)
        peak = PEAK_BF16_TFLOPS.get(key, 989.4)
        source = ("NVIDIA H100/H200 SXM datasheet: BF16 tensor 1,979 TFLOPS with sparsity = 989.4 dense"
                  if key in (None, "H100", "H200") else f"datasheet dense bf16 for {key}")
    res = Results(Path(args.out), {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                                   "peak_tflops": peak, "peak_source": source, "python": sys.version.split()[0]})
    say(f"[gpu] {gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}); peak {peak} TFLOPS ({source})")
    matmul_ceiling(res)
    if "train" in args.only:
        say("[train]")
        bench_train(res, budget, peak, args)
    if "split" in args.only:
        say("[split]")
        bench_split(res, budget, peak, args)
    if "torchrun" in args.only:
        say("[torchrun]")
        bench_nccl(res, budget)
        bench_torchrun(res, budget, args)
    if "onnx" in args.only:
        say("[onnx]")
        try:
            bench_onnx(res, budget, args)
        except Exception as e:  # noqa: BLE001
            res.skip("onnx", f"{type(e).__name__}: {str(e)[:200]}")
    if "faiss" in args.only:
        say("[faiss]")
        bench_faiss(res, budget, args)
    if "compile" in args.only:
        say("[compile]")
        bench_compile(res, budget, peak, args)
    res.write()
    say(f"[done] {len(res.rows)} rows, {len(res.skipped)} skipped; {res.out}/bench_gpu.json, bench_gpu.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

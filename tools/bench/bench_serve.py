#!/usr/bin/env python3
"""Load benchmark of `facebce serve`: identify requests/s and latency at 1, 4 and 16 concurrent clients
(an asyncio httpx loop on loopback) beside the bare pipeline on the same images in the same run.

The bare pipeline is what the service wraps, run in one loop in this process: decode the JPEG bytes,
`OnnxEmbedder.embed` (same model, preprocessing and flip), `Gallery.search` (same gallery entries,
k=5), half of it just before and half just after each level. The service runs as a real
`facebce serve` subprocess on 127.0.0.1, its gallery built from the same embeddings. With
`--detector`, a second figure sends framed photos (each crop scaled 2x inside a 400x300 frame, so the
face must be found) to the service, beside bare detect + align + embed + search.
Targets (the issue): service >= 0.8x bare at 16 clients, p99 < 300 ms, zero errors. The load
generator shares the CPU with the server, as a client on the same machine would.

    python tools/bench/bench_serve.py [--quick] [--detector] [--out runs/bench_serve.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO)]

import cv2  # noqa: E402
import numpy as np  # noqa: E402

SHARED = Path(os.environ.get("FACEBCE_SHARED", REPO.parent / "shared")) / "data"
MODEL = SHARED / "models" / "mobilefacenet.onnx"
DETECTOR = SHARED / "models" / "scrfd_2.5g_bnkps.onnx"
LFW = SHARED / "lfw_aligned_10plus"
MEAN, STD = "123.675,116.28,103.53", "58.395,57.12,57.375"
THRESHOLD = 0.2919


def say(*parts) -> None:
    print(*parts, flush=True)


def _people() -> list[Path]:
    return sorted(p for p in LFW.iterdir() if p.is_dir())


def load_images(n_gallery: int, n_probes: int) -> tuple[list[Path], list[str], list[bytes]]:
    """Gallery: the first image of `n_gallery` people; probes: other images of those people and of
    people never enrolled (half each), as JPEG bytes."""
    people = _people()
    enrol = [sorted(p.glob("*.jpg"))[0] for p in people[:n_gallery]]
    names = [p.name for p in people[:n_gallery]]
    probes = []
    for i in range(n_probes):
        person = people[i % n_gallery] if i % 2 == 0 else people[n_gallery + i % (len(people) - n_gallery)]
        files = sorted(person.glob("*.jpg"))
        probes.append(files[1 + (i // 2) % (len(files) - 1)].read_bytes())
    return enrol, names, probes


def framed(jpeg: bytes) -> bytes:
    """A 'raw photo': the aligned crop scaled 2x in a 400x300 grey frame, JPEG-encoded."""
    crop = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    frame = np.full((300, 400, 3), 40, np.uint8)
    frame[40:264, 100:324] = cv2.resize(crop, (224, 224))
    return cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def bare_rate(embedder, gallery, probes: list[bytes], aligner=None, seconds: float = 20.0) -> float:
    """Images/s of decode (+ detect + align) + embed + search, one image at a time, one loop."""
    def one(data: bytes):
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if aligner is not None:
            img = aligner.align(img)[0].crop
        return gallery.search(embedder.embed(img[None]), k=5)
    for data in probes[:4]:
        one(data)  # warm-up
    n, start = 0, time.perf_counter()
    while n < len(probes) and time.perf_counter() - start < seconds:
        one(probes[n])
        n += 1
    return n / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(gallery: Path, log: Path, detector: bool, timeout: float = 300.0,
                 flip: bool = True) -> tuple[subprocess.Popen, str]:
    import httpx
    port = free_port()
    cmd = [sys.executable, "-m", "facebce.cli", "serve", "--model", str(MODEL), "--mean", MEAN, "--std", STD,
           "--gallery", str(gallery), "--port", str(port), "--host", "127.0.0.1"]
    if detector:
        cmd += ["--detector", str(DETECTOR)]
    if not flip:
        cmd += ["--no-flip"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout:.0f} s: {log.read_text()[-2000:]}")


def _arun(coro):
    """The load generator's event loop: uvloop when installed (the `[serve]` extra brings it, as it
    does for the server), so the client takes less of the CPU it shares with the server."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def load(url: str, probes: list[bytes], clients: int, requests: int, seconds: float) -> dict:
    """`clients` concurrent loops of identify requests (one image each), `requests` in all or until
    `seconds` pass; latency of each request from send to parsed response."""
    import httpx
    latencies, errors, issued = [], [], [0]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for data in probes[:clients]:  # warm-up: one request per connection
            await client.post("/v1/identify", files={"files": ("p.jpg", data, "image/jpeg")})
        start = time.perf_counter()

        async def worker(w: int) -> None:
            while issued[0] < requests and time.perf_counter() - start < seconds:
                i = issued[0]
                issued[0] += 1
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/identify", files={"files": ("p.jpg", probes[i % len(probes)],
                                                                           "image/jpeg")})
                    r.json()
                    if r.status_code != 200:
                        errors.append(r.status_code)
                except httpx.HTTPError as e:
                    errors.append(type(e).__name__)
                latencies.append(time.perf_counter() - t)
        await asyncio.gather(*(worker(w) for w in range(clients)))
        elapsed = time.perf_counter() - start
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))]
    return {"clients": clients, "requests": len(lat), "seconds": round(elapsed, 2), "rps": len(lat) / elapsed,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "mean_ms": 1000 * statistics.fmean(lat),
            "errors": len(errors)}


def run(quick: bool = False, detector: bool = False, levels=(1, 4, 16), log=say, no_flip: bool = True) -> dict:
    """Everything in one run: bare rates, then the service at each level (and with the detector)."""
    from facebce.deploy.gallery import Gallery
    from facebce.deploy.stores import open_gallery
    from facebce.fileio import read_bgr
    from facebce.models.embedder import OnnxEmbedder, Preprocess

    if not (MODEL.exists() and LFW.exists()):
        raise SystemExit(f"bench_serve needs the shared data: {MODEL} and {LFW}")
    detector = detector and DETECTOR.exists()
    n_gallery, n_probes = (40, 48) if quick else (120, 400)
    per_level = {1: 30, 4: 60, 16: 120} if quick else {1: 120, 4: 300, 16: 600}
    seconds = 20.0 if quick else 60.0
    enrol, names, probes = load_images(n_gallery, n_probes)
    pre = Preprocess(color="rgb", mean=tuple(map(float, MEAN.split(","))), std=tuple(map(float, STD.split(","))))
    crops = [read_bgr(p) for p in enrol]

    def galleries(embedder, path: Path):
        """The bare loop's in-memory Gallery and, at `path`, the service's store, of the same embeddings."""
        emb = embedder.embed(crops)
        gallery = Gallery(emb.shape[1], threshold=THRESHOLD)
        gallery.add(emb, names)
        store = open_gallery(path, dim=emb.shape[1], create=True, threshold=THRESHOLD)
        store.add(emb, names)
        store.close()
        return gallery

    def bracketed(embedder, gallery, url: str, images: list[bytes], clients: int, requests: int,
                  aligner=None) -> dict:
        """The service's load figures at one level, and the bare loop's rate on the same images: half
        of it just before the level and half just after, so a drift in the machine's speed during the
        level weighs on both sides of the ratio."""
        before = bare_rate(embedder, gallery, images, aligner=aligner, seconds=seconds / 6)
        r = _arun(load(url, images, clients, requests, seconds))
        r["bare_rps"] = (before + bare_rate(embedder, gallery, images, aligner=aligner, seconds=seconds / 6)) / 2
        r["ratio"] = r["rps"] / r["bare_rps"]
        return r

    def identify_level(label: str, embedder, gallery, url: str, clients: int) -> dict:
        r = bracketed(embedder, gallery, url, probes, clients, per_level[clients])
        log(f"  identify, {label}: {r['rps']:.1f} req/s (bare {r['bare_rps']:.1f} img/s, {r['ratio']:.2f}x), "
            f"p50 {r['p50_ms']:.0f} / p95 {r['p95_ms']:.0f} / p99 {r['p99_ms']:.0f} ms, "
            f"{r['errors']} errors in {r['requests']}")
        return r

    embedder = OnnxEmbedder(MODEL, preprocess=pre, flip=True, normalize=True, progress=False)
    result = {"gallery": len(enrol), "probes": len(probes), "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg()[0]}
    aligner = None
    raw = []
    if detector:
        from facebce.deploy.align import FaceAligner, ScrfdDetector
        aligner = FaceAligner(ScrfdDetector(DETECTOR), size=112, policy="central")
        raw = [framed(p) for p in probes[: (24 if quick else 120)]]
    with tempfile.TemporaryDirectory() as tmp:
        gallery = galleries(embedder, Path(tmp) / "gallery.faiss")
        proc, url = start_server(Path(tmp) / "gallery.faiss", Path(tmp) / "server.log", detector)
        try:
            result["levels"] = [identify_level(f"{clients:2d} clients", embedder, gallery, url, clients)
                                for clients in levels]
            if detector:
                r = result["detector"] = bracketed(embedder, gallery, url, raw, 4, 40 if quick else 160, aligner)
                log(f"  identify framed photos (detect + align), 4 clients: {r['rps']:.1f} req/s "
                    f"(bare {r['bare_rps']:.1f} img/s, {r['ratio']:.2f}x), p50 {r['p50_ms']:.0f} / "
                    f"p99 {r['p99_ms']:.0f} ms, {r['errors']} errors")
            import httpx
            metrics = httpx.get(url + "/metrics", timeout=10).text
            result["embed_batches"] = _batch_summary(metrics, "embed")
        finally:
            _stop(proc)
        if no_flip:  # the same at 16 clients without the mirrored view: half the model's work per face
            plain = OnnxEmbedder(MODEL, preprocess=pre, flip=False, normalize=True, progress=False)
            g1 = galleries(plain, Path(tmp) / "noflip.faiss")
            proc, url = start_server(Path(tmp) / "noflip.faiss", Path(tmp) / "server.log", False, flip=False)
            try:
                result["no_flip"] = identify_level("16 clients, --no-flip", plain, g1, url, 16)
            finally:
                _stop(proc)
    return result


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _batch_summary(metrics: str, kind: str) -> dict:
    count = total = 0.0
    for line in metrics.splitlines():
        if line.startswith(f'facebce_batch_size_count{{kind="{kind}"}}'):
            count = float(line.split()[-1])
        if line.startswith(f'facebce_batch_size_sum{{kind="{kind}"}}'):
            total = float(line.split()[-1])
    return {"batches": int(count), "mean_rows": round(total / count, 2) if count else None}


def table(result: dict) -> str:
    rows = ["| clients | service req/s | bare img/s | ratio | p50 ms | p95 ms | p99 ms | errors / requests |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    extra = [(result[k], tag) for k, tag in (("no_flip", " (`--no-flip`)"), ("detector", " (photos, detector)"))
             if k in result]
    for r, tag in [(r, "") for r in result["levels"]] + extra:
        label = f"{r['clients']}{tag}"
        rows.append(f"| {label} | {r['rps']:.1f} | {r['bare_rps']:.1f} | {r['ratio']:.2f}x | {r['p50_ms']:.0f} | "
                    f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} / {r['requests']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests: a smoke run")
    ap.add_argument("--detector", action="store_true", help="also framed photos through the SCRFD detector")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    result = run(quick=args.quick, detector=args.detector)
    say("\n" + table(result))
    say(f"\nembed micro-batches: {result['embed_batches']}; load average at start {result['load_average']:.1f} "
        f"on {result['cpu_count']} cores")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prometheus text exposition (format 0.0.4), written by hand: request counts by route and status,
latency histograms by route, micro-batch size histograms, and the gallery's size.

With --workers N every worker process counts its own requests, so whichever worker answers
GET /metrics would report only a part. `SharedMetrics` makes the figures the service's: each
worker writes its counts (`Metrics.state`) to its own file in a folder the parent process made,
about once a second and at every scrape, and a scrape adds up every worker's file (a worker that
died keeps its last counts: counters never go back)."""
from __future__ import annotations

import json
import os
import threading
from collections import defaultdict
from pathlib import Path

__all__ = ["Metrics", "SharedMetrics", "worker_metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.n += 1

    def state(self) -> dict:
        return {"counts": list(self.counts), "sum": self.sum, "n": self.n}

    def add(self, state: dict) -> None:
        counts = state["counts"]
        if len(counts) != len(self.counts):
            raise ValueError("histogram buckets differ")
        self.counts = [a + int(b) for a, b in zip(self.counts, counts)]
        self.sum += float(state["sum"])
        self.n += int(state["n"])

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        total = str(int(self.sum)) if float(self.sum).is_integer() else f"{self.sum:.6f}"
        out.append(f"{name}_sum{{{labels}}} {total}" if labels else f"{name}_sum {total}")
        out.append(f"{name}_count{{{labels}}} {self.n}" if labels else f"{name}_count {self.n}")
        return out


def _num(b) -> str:
    return str(b) if isinstance(b, int) else repr(float(b))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        self.batches: dict[str, _Histogram] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, method, status)] += 1
            self.latency.setdefault(route, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, kind: str, size: int) -> None:
        with self._lock:
            self.batches.setdefault(kind, _Histogram(BATCH_BUCKETS)).observe(size)

    def state(self) -> dict:
        """This process's counts as plain JSON data (what `SharedMetrics` writes and adds up)."""
        with self._lock:
            return {"requests": [[r, m, s, n] for (r, m, s), n in self.requests.items()],
                    "latency": {k: h.state() for k, h in self.latency.items()},
                    "batches": {k: h.state() for k, h in self.batches.items()}}

    def add(self, state: dict) -> None:
        """Add another process's `state()` to these counts."""
        with self._lock:
            for route, method, status, n in state["requests"]:
                self.requests[(str(route), str(method), int(status))] += int(n)
            for kind, into, buckets in (("latency", self.latency, LATENCY_BUCKETS),
                                        ("batches", self.batches, BATCH_BUCKETS)):
                for key, h in state[kind].items():
                    into.setdefault(key, _Histogram(buckets)).add(h)

    def render(self, gallery_entries: int | None, gallery_identities: int | None) -> str:
        with self._lock:
            out = ["# HELP facebce_requests_total HTTP requests by route, method and status.",
                   "# TYPE facebce_requests_total counter"]
            for (route, method, status), n in sorted(self.requests.items()):
                out.append(f'facebce_requests_total{{route="{_label(route)}",method="{method}",status="{status}"}} {n}')
            out += ["# HELP facebce_request_duration_seconds Request latency by route.",
                    "# TYPE facebce_request_duration_seconds histogram"]
            for route, h in sorted(self.latency.items()):
                out += h.lines("facebce_request_duration_seconds", f'route="{_label(route)}"')
            out += ["# HELP facebce_batch_size Rows per micro-batch (embed: faces per ONNX call; search: probes "
                    "per gallery search).", "# TYPE facebce_batch_size histogram"]
            for kind, h in sorted(self.batches.items()):
                out += h.lines("facebce_batch_size", f'kind="{kind}"')
        if gallery_entries is not None:
            out += ["# HELP facebce_gallery_entries Faces enrolled in the gallery.",
                    "# TYPE facebce_gallery_entries gauge", f"facebce_gallery_entries {gallery_entries}",
                    "# HELP facebce_gallery_identities Distinct identities in the gallery.",
                    "# TYPE facebce_gallery_identities gauge", f"facebce_gallery_identities {gallery_identities}"]
        return "\n".join(out) + "\n"


class SharedMetrics(Metrics):
    """A worker's `Metrics` that renders the sum over every worker writing to `folder` (module
    docstring). Its own file is `<folder>/<pid>.json`, replaced atomically."""

    def __init__(self, folder: str | os.PathLike, every: float = 1.0):
        super().__init__()
        self.folder = Path(folder)
        self.path = self.folder / f"{os.getpid()}.json"
        self._written = None
        self._write_lock = threading.Lock()  # the timer thread and a scrape may write at once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every,), name="facebce-metrics", daemon=True)
        self._thread.start()

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.write()
            except OSError:
                pass  # a full disk: the next tick, or the next scrape, tries again

    def write(self) -> None:
        """Write this worker's counts (when they changed since the last write)."""
        with self._write_lock:
            text = json.dumps(self.state(), sort_keys=True)
            if text == self._written:
                return
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.path)
            self._written = text

    def render(self, gallery_entries: int | None, gallery_identities: int | None) -> str:
        self.write()
        total = Metrics()
        for path in sorted(self.folder.glob("*.json")):
            try:
                total.add(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a file being replaced, or not ours: the next scrape reads it
        return total.render(gallery_entries, gallery_identities)

    def close(self) -> None:
        self._stop.set()
        self.write()


def worker_metrics(folder: str | None) -> Metrics:
    """The metrics of one server process: shared through `folder` when the server runs several."""
    return SharedMetrics(folder) if folder else Metrics()

"""Prometheus text exposition (format 0.0.4), written by hand: request counts by route and status,
latency histograms by route, micro-batch size histograms, and the gallery's size. Per process: with
--workers N each worker reports its own."""
from __future__ import annotations

import threading
from collections import defaultdict

__all__ = ["Metrics"]

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

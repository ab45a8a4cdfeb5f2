"""The engine's parts below HTTP: parallel micro-batching workers and the measured session choice."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from facebce.serve.engine import MicroBatcher, choose_sessions
from tests.eval.fakes import flatten_matmul_onnx


def test_several_workers_share_one_queue_and_each_job_gets_its_rows():
    seen, lock = [], threading.Lock()

    def worker(tag):
        def fn(rows, params, sizes):
            time.sleep(0.01)  # long enough for the other worker to take the next batch
            with lock:
                seen.append(tag)
            return [(tag, float(r[0]) * 2) for r in rows]
        return fn
    batcher = MicroBatcher("t", [worker("a"), worker("b")], max_batch=2, max_wait=0.0)
    try:
        futures = [batcher.submit(np.array([[float(i)]])) for i in range(40)]
        results = [f.result(timeout=10) for f in futures]
    finally:
        batcher.close()
    assert [r[0][1] for r in results] == [2.0 * i for i in range(40)]
    assert set(seen) == {"a", "b"}  # both workers ran batches
    assert all(not t.is_alive() for t in batcher._threads)
    late = batcher.submit(np.array([[1.0]]))
    with pytest.raises(Exception, match="stopping"):
        late.result(timeout=1)


def test_each_of_several_workers_takes_only_its_share_of_the_queue():
    """Two workers, eight one-row jobs queued at once, max_batch 8: neither worker takes more than
    half of what is queued (a job must not wait behind a neighbour's batch while a worker idles)."""
    gate, sizes, lock = threading.Event(), [], threading.Lock()

    def fn(rows, params, sizes_):
        gate.wait(10)
        with lock:
            sizes.append(len(rows))
        return list(rows)
    batcher = MicroBatcher("t", [fn, fn], max_batch=8, max_wait=1.0)
    try:
        first = [batcher.submit(np.array([[0.0]])), batcher.submit(np.array([[0.0]]))]
        time.sleep(0.2)  # both workers now hold one job each, blocked on the gate
        futures = [batcher.submit(np.array([[float(i)]])) for i in range(8)]
        gate.set()
        assert [float(f.result(timeout=10)[0][0]) for f in futures] == [float(i) for i in range(8)]
        [f.result(timeout=10) for f in first]
    finally:
        batcher.close()
    assert sum(sizes) == 10 and sizes.count(1) >= 2, sizes
    assert max(sizes) <= 4, sizes  # at most a half share of the 8 queued rows between 2 workers


def test_one_worker_waits_for_more_rows_only_while_requests_are_on_their_way():
    """max_wait 2 s; a second job comes 0.3 s after the first. While `more_coming` says a request is
    decoding, the lone worker waits and runs both in one call; when nothing is coming it runs the
    first at once."""
    for coming, expected in ((1, [2]), (0, [1, 1])):
        sizes = []
        batcher = MicroBatcher("t", lambda rows, p, s: (sizes.append(len(rows)), list(rows))[1], max_batch=8,
                               max_wait=2.0, more_coming=lambda c=coming: c)
        try:
            a = batcher.submit(np.array([[1.0]]))
            time.sleep(0.3)
            b = batcher.submit(np.array([[2.0]]))
            assert float(a.result(timeout=10)[0][0]) == 1.0 and float(b.result(timeout=10)[0][0]) == 2.0
        finally:
            batcher.close()
        assert sizes == expected, (coming, sizes)


def test_choose_sessions_fixed_or_measured(tmp_path, monkeypatch):
    from facebce.models.embedder import OnnxEmbedder

    path = tmp_path / "m.onnx"
    flatten_matmul_onnx(path, [1, 3, 112, 112], out_dim=8, seed=0)
    made = []

    def make(threads):
        made.append(threads)
        return OnnxEmbedder(path, batch_size=1, flip=False, progress=False, intra_op_threads=threads)
    assert len(choose_sessions(make, 3, None)) == 3 and made == [1, 1, 1]  # several: one thread each
    made.clear()
    assert len(choose_sessions(make, 1, 2)) == 1 and made == [2]
    made.clear()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    lines = []
    chosen = choose_sessions(make, None, None, lines.append, seconds=0.05)
    assert len(chosen) in (1, 2) and made == [None, 1, 1]
    assert len(lines) == 1 and "img/s with 2 single-threaded sessions vs" in lines[0]
    crop = np.zeros((2, 112, 112, 3), np.uint8)
    assert all(np.allclose(e.embed(crop), chosen[0].embed(crop), atol=1e-5) for e in chosen)
    made.clear()
    lines.clear()  # one core's share (a server with as many worker processes as cores): one session, no timing
    assert len(choose_sessions(make, None, 1, lines.append, cores=1)) == 1 and made == [1]
    assert lines == ["inference: 1 session on this process's 1 core"]

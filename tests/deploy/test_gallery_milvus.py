"""Milvus parity on real faces: the same LFW crops enrolled with the shared MobileFaceNet into FAISS flat
and into milvus-lite (through pymilvus, the client a Milvus cluster uses) give identical top-1
identities and known/unknown decisions, and so do copies made by `gallery migrate` both ways.
The same commands on a milvus+lite:// URI as on a path, through the real CLI."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from facebce.cli import main
from facebce.deploy.enrol import migrate
from facebce.deploy.stores import open_gallery
from facebce.models.embedder import OnnxEmbedder, Preprocess

pytest.importorskip("pymilvus", reason="Milvus galleries need the [milvus] extra (pymilvus)")
pytest.importorskip("milvus_lite", reason="milvus+lite:// galleries need the [milvus] extra (milvus-lite)")

IMAGENET = Preprocess("rgb", mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
LFW_GLOBAL_THRESHOLD = 0.3017  # LFW's best global threshold for this model without flip (shared/data/README.md)
MODEL_ARGS = ["--mean", "123.675,116.28,103.53", "--std", "58.395,57.12,57.375", "--no-flip"]


def _lfw(shared_data, enrolled: int, strangers: int):
    people = sorted(p for p in (shared_data / "lfw_aligned_10plus").iterdir() if p.is_dir())
    files = {p.name: sorted(p.glob("*.jpg")) for p in people}
    known, unknown = [p.name for p in people[:enrolled]], [p.name for p in people[enrolled:enrolled + strangers]]
    gallery = [(n, f) for n in known for f in files[n][:2]]
    probes = [(n, f) for n in known for f in files[n][2:4]] + [(n, f) for n in unknown for f in files[n][:2]]
    return gallery, probes, set(known)


def test_milvus_lite_and_migrated_copies_decide_as_faiss_does(shared_data, tmp_path):
    import cv2
    gallery, probes, known = _lfw(shared_data, 40, 30)
    emb = OnnxEmbedder(shared_data / "models" / "mobilefacenet.onnx", IMAGENET)
    g_x = emb.embed([cv2.imread(str(f)) for _, f in gallery])
    p_x = emb.embed([cv2.imread(str(f)) for _, f in probes])
    names, sources = [n for n, _ in gallery], [f.name for _, f in gallery]
    faiss_path, lite = tmp_path / "g.faiss", f"milvus+lite://{tmp_path}/m.db"
    stores = {}
    with open_gallery(faiss_path, dim=g_x.shape[1], create=True, threshold=LFW_GLOBAL_THRESHOLD) as s:
        s.add(g_x, names, sources)
    with open_gallery(f"{lite}/faces", dim=g_x.shape[1], create=True, threshold=LFW_GLOBAL_THRESHOLD) as s:
        assert s.add(g_x, names, sources).tolist() == list(range(len(names)))
    migrate(str(faiss_path), f"{lite}/copy", say=lambda _: None)
    migrate(f"{lite}/faces", str(tmp_path / "back.faiss"), say=lambda _: None)
    for spec in (str(faiss_path), f"{lite}/faces", f"{lite}/copy", str(tmp_path / "back.faiss")):
        with open_gallery(spec) as s:
            assert len(s) == len(names) and s.threshold == LFW_GLOBAL_THRESHOLD
            assert s.entry(7) == {"id": 7, "identity": names[7], "source": sources[7]}
            stores[spec] = s.search(p_x, k=5)
    reference = stores[str(faiss_path)]
    top1 = [r.matches[0].identity for r in reference]
    decisions = [r.identity for r in reference]
    for spec, results in stores.items():
        assert [r.matches[0].identity for r in results] == top1, spec
        assert [r.identity for r in results] == decisions, spec
        np.testing.assert_allclose([r.score for r in results], [r.score for r in reference], atol=1e-5)
    truth = [n for n, _ in probes]
    mated = [t in known for t in truth]
    rank1 = np.mean([r.matches[0].identity == t for r, t, m in zip(reference, truth, mated) if m])
    accepted_strangers = np.mean([not r.is_unknown for r, m in zip(reference, mated) if not m])
    print(f"\n{sum(mated)} mated / {len(mated) - sum(mated)} non-mated probes, 4 galleries: rank-1 {rank1:.3f}, "
          f"strangers accepted at {LFW_GLOBAL_THRESHOLD}: {accepted_strangers:.3f}; identical across backends")
    assert rank1 > 0.9 and 0 < accepted_strangers < 0.5  # a real, non-trivial open-set decision


def test_the_same_commands_on_a_path_and_on_a_milvus_uri(shared_data, tmp_path, capsys):
    src = shared_data / "lfw_aligned_10plus"
    people = sorted(p for p in src.iterdir() if p.is_dir())[:3]
    enrol = tmp_path / "enrol"
    for p in people:
        shutil.copytree(p, enrol / p.name, ignore=lambda d, files: sorted(files)[2:])
    probes = [str(sorted(p.glob("*.jpg"))[3]) for p in people]
    model = ["--model", str(shared_data / "models" / "mobilefacenet.onnx"), *MODEL_ARGS]
    outputs = {}
    for spec in (str(tmp_path / "g.faiss"), f"milvus+lite://{tmp_path}/m.db/faces"):
        assert main(["gallery", "build", spec, str(enrol), *model, "--threshold", "0.3017"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("using threshold 0.3017 (given)\n") and "enrolled 6 images of 3 identities" in out
        assert main(["gallery", "search", spec, *probes, *model, "-k", "2"]) == 0
        outputs[spec] = capsys.readouterr().out
        assert main(["gallery", "remove", spec, "--identity", people[0].name]) == 0
        assert "removed 2 entries; 4 remain" in capsys.readouterr().out
        assert main(["gallery", "set-threshold", spec, "0.4"]) == 0
        assert main(["gallery", "info", spec]) == 0
        assert "threshold: 0.4\n" in capsys.readouterr().out
    faiss_lines, milvus_lines = (o.splitlines() for o in outputs.values())
    assert faiss_lines == milvus_lines and len(faiss_lines) == 3
    assert all(f"{p.name} " in line for p, line in zip(people, faiss_lines))
    assert main(["gallery", "migrate", str(tmp_path / "g.faiss"), f"milvus+lite://{tmp_path}/m.db/faces"]) == 1
    assert "a gallery already exists here" in capsys.readouterr().err
    assert main(["gallery", "info", "milvus://127.0.0.1:1/faces"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("facebce: error: milvus://127.0.0.1:1/faces: cannot reach Milvus") and err.count("\n") == 1
    other = f"milvus+lite://{tmp_path}/m.db/other"
    open_gallery(other, dim=64, create=True, threshold=0.3).close()  # a collection of another dimension
    assert main(["gallery", "add", other, str(enrol), *model]) == 1
    assert capsys.readouterr().err == f"facebce: error: {other}: collection vectors are 64-d, the model gives 128-d\n"
    with open_gallery(other) as s:
        assert len(s) == 0

"""Data order and learning-rate schedule: pure functions, no training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from facebce.train import lr_at
from facebce.errors import ConfigError
from facebce.train.loader import EpochBatchSampler, SeededSamples, ShardedBatchSampler, batches_per_epoch


def batches(n, b, w, epoch=0, start=0, seed=5):
    return [list(ShardedBatchSampler(n, b, rank=r, world_size=w, seed=seed, epoch=epoch, start=start))
            for r in range(w)]


def test_ranks_split_each_global_batch_of_the_permutation():
    n, b, w = 103, 4, 3
    per_rank = batches(n, b, w)
    assert len({len(x) for x in per_rank}) == 1 and len(per_rank[0]) == batches_per_epoch(n, b, w) == 8
    perm = ShardedBatchSampler(n, b, seed=5).permutation().tolist()
    for k in range(8):
        global_batch = sorted(i for r in range(w) for _, i in per_rank[r][k])
        assert global_batch == sorted(perm[k * b * w:(k + 1) * b * w])


def test_resume_offset_gives_the_remaining_batches_on_any_world_size():
    n, b = 96, 4
    full = batches(n, b, 2)
    tail = batches(n, b, 2, start=3 * b * 2)
    assert [x[3:] for x in full] == tail
    # 1 process continuing where 2 stopped sees the same samples, in the same order, as one stream
    one = batches(n, 8, 1, start=3 * b * 2)[0]
    two = [sorted(full[0][k] + full[1][k]) for k in range(3, len(full[0]))]
    assert [sorted(x) for x in one] == two


def test_one_sampler_for_a_whole_run_continues_epoch_after_epoch():
    """EpochBatchSampler (one DataLoader for the run) yields exactly the per-epoch samplers' batches
    one epoch after another, from a resume offset in the first, on every rank."""
    import itertools

    n, b, w = 50, 4, 2
    for r in range(w):
        run = list(itertools.islice(EpochBatchSampler(n, b, rank=r, world_size=w, seed=5, epoch=3, start=16), 20))
        expected = [x for e, start in ((3, 16), (4, 0), (5, 0), (6, 0))
                    for x in ShardedBatchSampler(n, b, rank=r, world_size=w, seed=5, epoch=e, start=start)][:20]
        assert run == expected and {k[0] for x in run for k in x} == {3, 4, 5, 6}
    with pytest.raises(ConfigError, match="more than the 7 samples"):
        EpochBatchSampler(7, 4, world_size=2)


def test_epochs_reshuffle():
    assert batches(50, 5, 1, epoch=0) != batches(50, 5, 1, epoch=1)
    assert batches(50, 5, 1, epoch=1) == batches(50, 5, 1, epoch=1)


class Noise(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.rand(3), i


def test_augmentation_is_a_function_of_sample_and_epoch():
    ds = SeededSamples(Noise(), seed=1)
    torch.manual_seed(0)
    a = ds[(0, 3)][0]
    state = torch.get_rng_state()
    b = ds[(0, 3)][0]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert torch.equal(a, b) and not torch.equal(a, ds[(1, 3)][0]) and not torch.equal(a, ds[(0, 4)][0])


def test_lr_warmup_then_polynomial_decay():
    assert [lr_at(s, 0.1, 10, 2) for s in (0, 1)] == pytest.approx([0.05, 0.1])
    assert lr_at(2, 0.1, 10, 2) == pytest.approx(0.1)
    assert lr_at(6, 0.1, 10, 2) == pytest.approx(0.1 * 0.5 ** 2)
    assert lr_at(9, 0.1, 10, 0) == pytest.approx(0.1 * 0.1 ** 2)


def _datasets(tmp_path):
    """Every dataset kind the trainer builds, with facebce's training transform."""
    from facebce.data import ImageFolderDataset, RecDataset, SyntheticFaceDataset, SyntheticFaces
    from facebce.data.tools import synthesize
    from facebce.train.loader import CachedImages, Subset

    synthesize(tmp_path / "s", identities=4, images=5, rec=True)
    faces = SyntheticFaces(4, 5, seed=0)
    rec = RecDataset(tmp_path / "s" / "rec", train=True)
    return {"rec": rec, "folder": ImageFolderDataset(tmp_path / "s" / "images", train=True),
            "synthetic": SyntheticFaceDataset(faces, train=True), "cached": CachedImages(rec),
            "subset": Subset(rec, [1, 3, 4, 8, 9, 12, 15, 19])}


def test_batched_fast_path_equals_collating_samples(tmp_path):
    """SeededSamples.__getitems__ (decode + seeded flip + normalise into one buffer) gives exactly
    the batch that collating ds[key] one by one gives: same flips, same bits, same labels."""
    from torch.utils.data import default_collate

    for name, ds in _datasets(tmp_path).items():
        samples = SeededSamples(ds, seed=9)
        keys = [(e, i) for e in (0, 1) for i in range(len(ds))]
        x, y = samples.__getitems__(keys)
        xs, ys = default_collate([samples[k] for k in keys])
        assert x.dtype == torch.float32 and y.dtype == torch.int64, name
        assert torch.equal(x, xs) and torch.equal(y, ys), name
        flipped = [not torch.equal(samples[(0, i)][0], samples[(1, i)][0]) for i in range(len(ds))]
        assert any(flipped), name  # the epochs draw different flips


def test_batched_fast_path_through_dataloader_workers(tmp_path):
    from torch.utils.data import DataLoader

    from facebce.train.loader import batch_collate

    ds = _datasets(tmp_path)["rec"]
    samples = SeededSamples(ds, seed=2)

    def run(workers):
        sampler = ShardedBatchSampler(len(ds), 6, seed=2)
        return list(DataLoader(samples, batch_sampler=sampler, num_workers=workers, collate_fn=batch_collate))
    serial, parallel = run(0), run(2)
    assert len(serial) == len(parallel) == 3
    for (xs, ys), (xp, yp) in zip(serial, parallel):
        assert torch.equal(xs, xp) and torch.equal(ys, yp)


def test_uint8_batches_normalised_on_the_device_equal_collating_samples(tmp_path):
    """uint8 batches (what the trainer ships through its workers) + normalise_batch give, bit for bit,
    the float batch of collated samples; also through 2 DataLoader workers (shared memory)."""
    from torch.utils.data import DataLoader, default_collate

    from facebce.train.loader import batch_collate, normalise_batch

    datasets = _datasets(tmp_path)
    for name, ds in datasets.items():
        samples = SeededSamples(ds, seed=9, uint8=True)
        assert samples.uint8_batches, name
        keys = [(e, i) for e in (0, 1) for i in range(len(ds))]
        raw, y = samples.__getitems__(keys)
        assert raw.dtype == torch.uint8 and raw.shape[1:] == (112, 112, 3), name
        xs, ys = default_collate([samples[k] for k in keys])
        x = normalise_batch(raw)
        assert x.dtype == torch.float32 and torch.equal(x, xs) and torch.equal(y, ys), name
    samples = SeededSamples(datasets["rec"], seed=2, uint8=True)

    def run(workers):
        sampler = ShardedBatchSampler(len(samples), 6, seed=2)
        return list(DataLoader(samples, batch_sampler=sampler, num_workers=workers, collate_fn=batch_collate))
    float_batches = list(DataLoader(SeededSamples(samples.ds, seed=2), batch_sampler=ShardedBatchSampler(
        len(samples), 6, seed=2), collate_fn=batch_collate))
    for (xs, ys), (xp, yp), (xf, yf) in zip(run(0), run(2), float_batches):
        assert torch.equal(xs, xp) and torch.equal(ys, yp) and torch.equal(normalise_batch(xp), xf)


def _rec_samples(tmp_path, **kw):
    from facebce.data import RecDataset
    from facebce.data.tools import synthesize

    synthesize(tmp_path / "s", identities=6, images=6, rec=True)
    return SeededSamples(RecDataset(tmp_path / "s" / "rec", train=True), seed=4, uint8=True, **kw)


def _loader(samples, epochs: int):
    from torch.utils.data import DataLoader

    from facebce.train.loader import batch_collate

    sampler = EpochBatchSampler(len(samples), 4, seed=4)
    keys = [k for k, _ in zip(sampler, range(epochs * len(samples) // 4))]
    loader = DataLoader(samples, batch_sampler=keys, num_workers=2, collate_fn=batch_collate)
    return loader, keys


def test_recycled_worker_buffers_are_reused_and_every_batch_is_exact(tmp_path):
    """recycle=4: through raise_worker_errors (which releases each batch when the next is asked
    for) both workers cycle through their own 4 shared buffers, and every batch equals the one
    the samples give in this process: a buffer is never refilled while its batch is in use."""
    from facebce.train.loader import raise_worker_errors

    samples = _rec_samples(tmp_path, recycle=4)
    reference = SeededSamples(samples.ds, seed=4, uint8=True)
    loader, keys = _loader(samples, epochs=3)  # 27 batches
    seen = 0
    for (x, y), k in zip(raise_worker_errors(loader, samples), keys):
        want_x, want_y = reference.__getitems__(k)
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
        seen += 1
    assert seen == len(keys) == 27
    # the same loader read by hand: which buffer each batch came in
    release = samples.start_ring()
    slots = []
    for x, y, slot in loader:
        slots.append(slot)
        release(list(slot))  # as a list too: what pin_memory makes of the tuple
    assert None not in slots and {w for w, _ in slots} == {0, 1}
    assert {s for _, s in slots} <= set(range(4)) and len(slots) == 27  # 27 batches in 8 buffers


def test_batches_never_released_are_never_overwritten(tmp_path):
    """A consumer that keeps every batch and releases none: each worker fills its 4 buffers, then
    makes a fresh one per batch, so every kept batch still holds its own pixels."""
    samples = _rec_samples(tmp_path, recycle=4)
    reference = SeededSamples(samples.ds, seed=4, uint8=True)
    loader, keys = _loader(samples, epochs=2)
    samples.start_ring()
    kept = list(loader)
    assert [slot is None for _, _, slot in kept].count(False) == 8  # 4 buffers x 2 workers, then fresh
    for (x, y, _), k in zip(kept, keys):
        want_x, want_y = reference.__getitems__(k)
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
    with pytest.raises(ValueError, match="recycle"):
        SeededSamples(samples.ds, seed=4, recycle=-1)
    # a ring's release writes to that ring's flags only, never to a later loader's
    old_release = samples.start_ring()
    samples.start_ring()
    samples._free[0, 0] = 0  # held by the new loader's consumer
    old_release((0, 0))
    assert samples._free[0, 0] == 0


def test_uint8_copy_of_every_kind_of_view_is_exact():
    """The batch copy takes OpenCV's path for views of a decoder's BGR buffer (mirrored or not) and
    numpy's for anything else; every kind lands bit for bit."""
    from facebce.train.loader import _copy_batch, _shared_uint8

    rng = np.random.default_rng(3)
    bgr = rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    views = [bgr[0][:, :, ::-1], bgr[1][:, :, ::-1][:, ::-1], rgb[2], rgb[3][:, ::-1],
             bgr[0][::2, ::2][:, :, ::-1].repeat(2, 0).repeat(2, 1), bgr[1][:, :, ::-1][::-1]]
    for shared in (False, True):
        batch = _shared_uint8(len(views), (112, 112, 3)) if shared else torch.empty((6, 112, 112, 3), dtype=torch.uint8)
        _copy_batch(views, batch)
        assert batch.dtype == torch.uint8 and np.array_equal(batch.numpy(), np.stack(views))


def test_custom_transform_takes_the_per_sample_path(tmp_path):
    from facebce.data import RecDataset
    from facebce.data.tools import synthesize

    synthesize(tmp_path / "s", identities=2, images=3, rec=True)
    ds = RecDataset(tmp_path / "s" / "rec", transform=lambda img: torch.from_numpy(img.copy()).permute(2, 0, 1))
    x, y = SeededSamples(ds, seed=0).__getitems__([(0, 0), (0, 5)])
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 112, 112) and y.tolist() == [0, 1]


@pytest.mark.parametrize("seed", [0, 7, 2048, 2**32 - 1, 2**32 + 5])
def test_sample_seeds_equal_numpy_seedsequence(seed):
    import numpy as np

    from facebce.train.loader import sample_seeds

    rng = np.random.default_rng(seed % 1000)
    keys = [(0, 0), (0, 1), (1, 0)] + [(int(e), int(i)) for e, i in zip(rng.integers(0, 99, 200),
                                                                         rng.integers(0, 2**32, 200))]
    want = [int(s[0]) << 32 | int(s[1])
            for s in (np.random.SeedSequence((seed, e, i)).generate_state(2, np.uint32) for e, i in keys)]
    assert sample_seeds(seed, keys) == want


def _pack_with_a_bad_record(root):
    """A header-less pack of 8 112x112 images of 4 classes; record 5 holds bytes that do not decode."""
    import cv2
    import numpy as np

    from facebce.data.recordio import RecordIOWriter, pack_image_record
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        for key in range(8):
            img = cv2.imencode(".jpg", rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))[1].tobytes()
            w.write(key, pack_image_record(float(key % 4), b"\xff\xd8 not a jpeg" if key == 5 else img))
    (root / "property").write_text("4,112,112\n")
    return root


def test_worker_error_reaches_the_cli_as_one_line(tmp_path):
    """With 2 DataLoader workers a bad record is the same one line as without workers (torch would wrap it in
    a worker traceback)."""
    import subprocess
    import sys
    from pathlib import Path
    pack = _pack_with_a_bad_record(tmp_path / "pack")
    repo = Path(__file__).resolve().parents[2]
    sets = ["data.kind=rec", f"data.path={pack}", "data.cache=false", "data.num_workers=2", "data.batch_size=4",
            "steps=4", "epochs=null", "model.embedding_size=16", "verification.every_steps=0", "log.progress=false",
            "checkpoint.every_steps=0"]
    argv = [sys.executable, "-m", "facebce.cli", "train", "recipes/demo_synthetic.yaml", "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    out = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.splitlines() == [f"facebce: error: {pack / 'train.rec'}: record 5 (offset "
                                       f"{_offset(pack, 5)}): image bytes do not decode (13 bytes)"], out.stderr


def _offset(pack, key):
    for line in (pack / "train.idx").read_text().splitlines():
        k, off = line.split("\t")
        if int(k) == key:
            return int(off)

"""Training data: the dataset a recipe names, sharded over ranks in a resumable, deterministic order.

Order: epoch e is one permutation of all samples drawn from `seed + e`; the global batch b of an
epoch that starts at offset s is `perm[s + b·B·W : s + (b+1)·B·W]`, rank r taking every W-th
sample of it (DistributedSampler-style). So the data position is just (epoch, samples consumed),
and a run resumed at that position sees the same batches as an uninterrupted one — on any world
size or batch size. Augmentation is seeded per sample from (seed, epoch, index), so it does not
depend on DataLoader workers or on where a run was resumed.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate, get_worker_info

from facebce.data import ImageFolderDataset, RecDataset, SyntheticFaceDataset, SyntheticFaces
from facebce.data.transforms import INPUT_MEAN, INPUT_STD, decode_image, random_hflip, to_batch, train_transform
from facebce.errors import ConfigError, FacebceError
from facebce.train.config import DataConfig


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Optional["Subset"]]:
    """The recipe's (training set, held-out val set or None). Training samples are
    (FloatTensor[3,112,112], label) with `.num_classes`, `.labels`; with `val_fraction` > 0 the images
    `split_per_identity` holds out form the val set, which keeps every identity's class id, is never
    augmented, and is what the trainer scores against the class centres (uniform accuracy)."""
    full = _base_dataset(cfg)
    val = None
    if cfg.val_fraction > 0:
        train_idx, val_idx = split_per_identity(full.labels, cfg.val_fraction, cfg.val_seed)
        full, val = Subset(full, train_idx), Subset(full, val_idx)
    return (CachedImages(full) if cfg.cache else full), val


def split_per_identity(labels, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per identity, hold out round(fraction · n) of its n images (drawn with `seed`), always keeping
    at least one for training; identities with one image stay wholly in training. Returns sorted
    (train indices, val indices). The same labels, fraction and seed give the same split anywhere."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = min(int(round(fraction * idx.size)), idx.size - 1)
        chosen = rng.permutation(idx)
        val.append(chosen[:k])
        train.append(chosen[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class Subset(Dataset):
    """Some samples of a facebce dataset, keeping its class ids (`num_classes` is the full set's)."""

    def __init__(self, ds: Dataset, indices):
        self.ds, self.indices = ds, np.asarray(indices, dtype=np.int64)
        self.transform = getattr(ds, "transform", None)
        self.num_classes = ds.num_classes
        self.labels = np.asarray(ds.labels)[self.indices]
        self.image_size = getattr(ds, "image_size", None)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int):
        return self.ds[int(self.indices[i])]

    def raw(self, i: int):
        return self.ds.raw(int(self.indices[i]))

    def decoded(self, i: int):
        return self.ds.decoded(int(self.indices[i]))

    def images_bgr(self) -> np.ndarray:
        """Every sample decoded, unaugmented, as BGR uint8 N x H x W x 3 (what the embedders take)."""
        return np.stack([CachedImages._rgb(self, i)[..., ::-1] for i in range(len(self))])


def _base_dataset(cfg: DataConfig) -> Dataset:
    if cfg.kind == "rec":
        ds = RecDataset(cfg.path, train=True)
    elif cfg.kind == "folder":
        ds = ImageFolderDataset(cfg.path, train=True)
    else:
        s = cfg.synthetic
        ds = SyntheticFaceDataset(SyntheticFaces(s.identities, s.images, seed=s.seed, difficulty=s.difficulty),
                                  train=True)
    return ds


class CachedImages(Dataset):
    """Every image decoded (or rendered) once into memory as uint8; augmentation still per sample."""

    def __init__(self, ds: Dataset):
        self.num_classes, self.labels = ds.num_classes, np.asarray(ds.labels)
        first = self._rgb(ds, 0)
        self.images = np.empty((len(ds),) + first.shape, np.uint8)
        self.images[0] = first
        for i in range(1, len(ds)):
            self.images[i] = self._rgb(ds, i)

    @staticmethod
    def _rgb(ds: Dataset, i: int) -> np.ndarray:
        if isinstance(ds, Subset):
            return CachedImages._rgb(ds.ds, int(ds.indices[i]))
        if isinstance(ds, SyntheticFaceDataset):
            return ds.faces[i][0]
        data, _ = ds.raw(i)
        return decode_image(data, where=f"sample {i}", size=getattr(ds, "image_size", None))

    transform = staticmethod(train_transform)

    def __len__(self) -> int:
        return len(self.images)

    def decoded(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])

    def __getitem__(self, i: int):
        return train_transform(self.images[i]), int(self.labels[i])


class SeededSamples(Dataset):
    """Indexed by (epoch, i): runs `ds[i]` with torch's CPU RNG seeded from (seed, epoch, i), restoring
    the caller's RNG afterwards, so augmentation is a pure function of the sample and the epoch.

    `uint8=True` makes whole batches (`__getitems__`, facebce's own training transform) uint8 RGB
    N x H x W x 3 - decoded and flipped, not normalised: a quarter of the bytes through the
    workers' shared memory (and host -> GPU); `normalise_batch` on the device then gives bit for
    bit the float batch the samples would have given (`uint8_batches` says whether batches are raw).

    `recycle=K` (uint8 batches): each DataLoader worker fills K shared-memory batch buffers in turn
    instead of a fresh one per batch, whose first-touch page faults cost more than the copy into
    it (~8 vs ~1 ms per 128 images of 112 x 112 here), and the main process maps each buffer once.
    A buffer is reused only after the main process has released it: iterate the loader through
    `raise_worker_errors(loader, samples)`, which releases a batch when the next one is asked for,
    so a batch must not be used after that (the trainer copies it by normalising it first). A
    worker whose K buffers are all held makes a fresh one, so a consumer that keeps batches, or
    does not release them, gets correct data, only without the saving. Batches are then
    (images, labels, slot) triples, `raise_worker_errors` passes on (images, labels).
    """

    def __init__(self, ds: Dataset, seed: int, *, uint8: bool = False, recycle: int = 0):
        if isinstance(recycle, bool) or not isinstance(recycle, int) or recycle < 0:
            raise ValueError(f"recycle={recycle!r}: expected a number of buffers >= 0")
        self.ds, self.seed, self.uint8, self.recycle = ds, seed, bool(uint8), recycle
        self._free: torch.Tensor | None = None  # shared [worker, slot] flags, 1: released by the main process
        self._ring: dict[int, torch.Tensor] = {}  # a worker's own buffers by slot (made in the worker)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        with self._seeded(epoch, i):
            return self.ds[i]

    @property
    def fast(self) -> bool:
        """Whether batches take the decode-flip-into-one-buffer path (facebce's own training transform)."""
        return getattr(self.ds, "transform", None) is train_transform and hasattr(self.ds, "decoded")

    @property
    def uint8_batches(self) -> bool:
        return self.uint8 and self.fast

    def __getitems__(self, keys: list[tuple[int, int]]):
        """`_batch(keys)`; in a DataLoader worker a FacebceError (a bad record) comes back as a
        `WorkerError` batch, which `raise_worker_errors` re-raises in the main process as the same
        one-line error (torch would wrap it in a worker traceback)."""
        if get_worker_info() is None:
            return self._batch(keys)
        try:
            return self._batch(keys)
        except FacebceError as e:
            return WorkerError(type(e), str(e))

    def _batch(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch (images N x 3 x H x W, int64 labels), what `batch_collate` passes on. With
        facebce's own training transform the samples are decoded, flipped (the same seeded draw as
        `ds[i]` makes) and normalised straight into one batch buffer: bit-identical to collating
        `self[key]`, without a tensor per sample or the copy collation makes (uint8: the flipped
        pixels, N x H x W x 3, for `normalise_batch`)."""
        if not self.fast:
            return default_collate([self[key] for key in keys])
        images, labels = [], []
        for (epoch, i), seed in zip(keys, sample_seeds(self.seed, keys)):
            with _CpuSeed(seed):
                img, label = self.ds.decoded(i)
                images.append(random_hflip(img))  # train_transform's one draw
            labels.append(label)
        worker = get_worker_info()
        labels = torch.tensor(labels, dtype=torch.int64)
        if not self.uint8:
            return to_batch(images, shared=worker is not None), labels
        out, slot = self._buffer(len(images), tuple(images[0].shape), worker)
        _copy_batch(images, out)
        return (out, labels, slot) if self.recycle else (out, labels)

    def _buffer(self, n: int, shape: tuple, worker) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """The uint8 buffer a batch is copied into, and its (worker, slot) when it is one of the
        worker's recycled buffers (class docstring); in the main process a private buffer."""
        if worker is None:
            return torch.empty((n, *shape), dtype=torch.uint8), None
        free = self._free
        if free is not None and worker.id < len(free):
            flags = free[worker.id].numpy()  # a view of the shared flags: the main process's releases
            for s in range(len(flags)):
                if flags[s]:
                    buf = self._ring.get(s)
                    if buf is None or tuple(buf.shape) != (n, *shape):
                        buf = self._ring[s] = _shared_uint8(n, shape)
                    flags[s] = 0
                    return buf, (worker.id, s)
        return _shared_uint8(n, shape), None

    def start_ring(self) -> Callable[[Sequence[int] | None], None]:
        """Before a DataLoader's workers start (`raise_worker_errors` calls it): new shared flags,
        every buffer free, for the workers about to be forked (buffers are made in them). Returns
        the function that hands a batch's buffer back to its worker, given the batch's slot: it
        writes to this ring's flags, so a later ring's buffers are never freed by it."""
        self._ring = {}
        free = self._free = (torch.ones(_RING_WORKERS, self.recycle, dtype=torch.uint8).share_memory_()
                             if self.recycle and self.uint8_batches else None)

        def release(slot: Sequence[int] | None) -> None:
            if slot is not None and free is not None:
                worker, index = slot  # a tuple, or a list once pin_memory has been through the batch
                free[int(worker), int(index)] = 1
        return release

    def _seeded(self, epoch: int, i: int):
        return _CpuSeed(sample_seeds(self.seed, [(epoch, i)])[0])


_U32 = 0xFFFFFFFF


def sample_seeds(seed: int, keys) -> list[int]:
    """The 64-bit torch seed of each (epoch, i): `SeedSequence((seed, epoch, i)).generate_state(2)`
    as (word0 << 32 | word1), computed for a whole batch at once with numpy's exact algorithm
    (numpy/random/bit_generator.pyx: hashmix/mix over a pool of 4 words) — the per-sample
    SeedSequence object cost ~12 µs, a tenth of decoding the image. Values of 2^32 or more (two
    entropy words) take SeedSequence itself."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
    if not (0 <= seed <= _U32) or keys.size and (keys.min() < 0 or keys.max() > _U32):
        return [int(s[0]) << 32 | int(s[1]) for s in
                (np.random.SeedSequence((seed, int(e), int(i))).generate_state(2, np.uint32) for e, i in keys)]
    with np.errstate(over="ignore"):
        entropy = [np.full(len(keys), seed, np.uint32), keys[:, 0].astype(np.uint32), keys[:, 1].astype(np.uint32),
                   np.zeros(len(keys), np.uint32)]  # 3 entropy words, padded with 0 to the pool size
        hash_a = [np.uint32(0x43B0D7E5)]

        def hashmix(value):
            value = value ^ hash_a[0]
            hash_a[0] = np.uint32(int(hash_a[0]) * 0x931E8875 & _U32)
            value = value * hash_a[0]
            return value ^ (value >> np.uint32(16))

        def mix(x, y):
            r = np.uint32(0xCA01F9DD) * x - np.uint32(0x4973F715) * y
            return r ^ (r >> np.uint32(16))
        pool = [hashmix(w) for w in entropy]
        for src in range(4):
            for dst in range(4):
                if src != dst:
                    pool[dst] = mix(pool[dst], hashmix(pool[src]))
        hash_b, words = 0x8B51F9DD, []
        for k in range(2):
            value = pool[k] ^ np.uint32(hash_b)
            hash_b = hash_b * 0x58F38DED & _U32
            value = value * np.uint32(hash_b)
            words.append(value ^ (value >> np.uint32(16)))
    return ((words[0].astype(np.uint64) << np.uint64(32)) | words[1].astype(np.uint64)).tolist()


class _CpuSeed:
    """Seed torch's CPU generator for a block and restore it after (torch.manual_seed would also
    re-seed every other backend: ~170 µs a call, more than decoding the image)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = torch.get_rng_state()
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.set_rng_state(self.state)


_RING_WORKERS = 256  # DataLoader workers the recycling flags cover; more take fresh buffers
# buffers per worker: the DataLoader's prefetch_factor (2) batches on their way, the one in use, a spare
RING_SLOTS = 4


def _shared_uint8(n: int, shape: tuple) -> torch.Tensor:
    """An N x H x W x 3 uint8 tensor in shared memory: a DataLoader worker's batch crosses to the
    main process without a copy (as to_batch's)."""
    empty = torch.empty(0, dtype=torch.uint8)
    return empty.new(empty._typed_storage()._new_shared(n * int(np.prod(shape)), device="cpu")).resize_(n, *shape)


def _copy_batch(images, out: torch.Tensor) -> None:
    """N HxWx3 uint8 images (views welcome) copied into the N x H x W x 3 uint8 batch `out`."""
    a = out.numpy()
    for k, img in enumerate(images):
        _copy_rgb(a[k], img)


def _copy_rgb(dst: np.ndarray, img: np.ndarray) -> None:
    """`dst[...] = img` for an H x W x 3 uint8 RGB image. When `img` is the datasets' view of a
    decoder's BGR buffer (channels reversed, perhaps mirrored by the flip), OpenCV's vector code
    swaps the channels into `dst` and mirrors it there: 5x faster than numpy's element-wise copy
    of a view with negative strides (0.02 vs 0.12 ms per 112 x 112 image), and bit-identical."""
    bgr = img[:, :, ::-1]
    mirrored = bgr.strides[1] < 0
    if mirrored:
        bgr = bgr[:, ::-1]
    if bgr.flags.c_contiguous and dst.flags.c_contiguous:
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=dst)
        if mirrored:
            cv2.flip(dst, 1, dst=dst)
    else:
        dst[...] = img


def normalise_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 RGB -> float32 N x 3 x H x W in [-1, 1], on the tensor's own device (the
    batch crosses to a GPU as uint8, 4x fewer bytes). Cast, subtract 127.5, divide by 127.5: the
    float32 operations `to_batch` does, so the result is bit-identical. The float batch keeps the
    pixels' channels-last memory order (torch's channels_last), which channels_last models want."""
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    return x.sub_(INPUT_MEAN).div_(INPUT_STD)


class WorkerError:
    """A FacebceError raised in a DataLoader worker, carried to the main process as a batch (plain
    data: its type and its one-line message)."""

    def __init__(self, kind: type, message: str):
        self.kind, self.message = kind, message

    def reraise(self):
        try:
            err = self.kind(self.message)
        except Exception:  # a subclass with another signature: keep the message
            err = FacebceError(self.message)
        raise err


def raise_worker_errors(batches: Iterable, samples: SeededSamples | None = None):
    """Iterate a DataLoader over `SeededSamples`, re-raising a worker's bad-record error in this
    process as the original one-line FacebceError. Given the `samples` (with `recycle`), it starts
    their buffer ring before the loader's workers and hands each batch's buffer back when the next
    batch is asked for, yielding (images, labels)."""
    release = samples.start_ring() if samples is not None else None
    it, slot = iter(batches), None
    while True:
        if slot is not None:  # the consumer is done with the previous batch
            release(slot)
            slot = None
        try:
            batch = next(it)
        except StopIteration:
            return
        if isinstance(batch, WorkerError):
            batch.reraise()
        if isinstance(batch, (tuple, list)) and len(batch) == 3:
            images, labels, slot = batch
            batch = (images, labels)
            if release is None:
                slot = None  # nobody to hand it back to: its worker makes a fresh buffer instead
        yield batch


def batch_collate(batch):
    """The DataLoader collate_fn for `SeededSamples`: its `__getitems__` already returns a batch."""
    return batch


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int, start: int = 0) -> int:
    """Whole global batches left in an epoch that starts at sample offset `start` (the rest is dropped)."""
    return max(num_samples - start, 0) // (batch_size * world_size)


class EpochBatchSampler(Sampler):
    """`ShardedBatchSampler`'s batches epoch after epoch, without end, from sample offset `start` of
    `epoch`: one DataLoader, and so one set of worker processes, for a whole run (a DataLoader per
    epoch would fork its workers again and refill their prefetch queue at every epoch boundary)."""

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, start: int = 0):
        if batches_per_epoch(num_samples, batch_size, world_size) == 0:
            raise ConfigError(f"data.batch_size: {batch_size} x {world_size} processes is more than the "
                              f"{num_samples} samples")
        self.args = dict(num_samples=num_samples, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epoch, self.start
        while True:
            yield from ShardedBatchSampler(**self.args, epoch=epoch, start=start)
            epoch, start = epoch + 1, 0


class ShardedBatchSampler(Sampler):
    """This rank's batches of one epoch, from sample offset `start` of the epoch's permutation.

    Yields lists of (epoch, index) keys for `SeededSamples`. Every rank yields the same number of
    equal-sized batches (Partial-FC's all-gathers need equal local batches).
    """

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, start: int = 0):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.epoch, self.start = rank, world_size, seed, epoch, start

    def permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.world_size, self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        n = len(self)
        if n == 0:
            return
        b, w = self.batch_size, self.world_size
        mine = self.permutation()[self.start + self.rank: self.start + n * b * w: w].tolist()
        for k in range(n):
            yield [(self.epoch, i) for i in mine[k * b:(k + 1) * b]]

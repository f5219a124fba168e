"""Data plumbing of the engine: a resumable distributed batch order, whole-batch fetching, batch augmentation.

* ``EpochBatchSampler``: epoch ``e``'s order is a permutation drawn from ``(seed, e)`` alone, so a resumed run
  sees exactly the batches the uninterrupted one would; each process takes every ``world``-th index (the
  permutation padded to a multiple of ``world`` like ``DistributedSampler``), cut into micro-batches.
* ``batched(dataset)``: for datasets with ``get_batch(indices)`` (``supermask_fx.data.ImageTensorDataset``), a
  view whose ``__getitems__`` builds a whole batch in one tensor operation instead of per example.
* ``RandomCropFlip``: the standard CIFAR augmentation (pad 4, random 32x32 crop, horizontal flip) on whole uint8
  batches, drawn from the torch random stream (restored on resume).
* ``dataset_fingerprint``: a data set's length and a hash of a fixed sample of its items, recorded in checkpoints so
  that a resume with other data is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import random
from collections.abc import Mapping

import torch
from torch.utils.data import Dataset, default_collate


class EpochBatchSampler:
    """Micro-batches of indices for one process; the order depends only on ``(seed, epoch)``."""

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.per_process = math.ceil(num_examples / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> torch.Tensor:
        """All processes' indices of ``epoch`` (padded), before sharding."""
        if self.shuffle:
            digest = hashlib.sha256(f"supermask_fx.training/{self.seed}/{epoch}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            indices = torch.randperm(self.num_examples, generator=generator)
        else:
            indices = torch.arange(self.num_examples)
        pad = self.per_process * self.world_size - self.num_examples
        if pad:
            indices = torch.cat([indices, indices[:pad]])
        return indices

    def __iter__(self):
        mine = self.order(self.epoch)[self.rank :: self.world_size].tolist()
        for start in range(0, len(mine), self.batch_size):
            batch = mine[start : start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield batch

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_process // self.batch_size
        return math.ceil(self.per_process / self.batch_size)


class Batch(tuple):
    """``(inputs, targets)`` already batched by the dataset (see ``batched``)."""


class _BatchedView(Dataset):
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __getitems__(self, indices):
        inputs, targets = self.dataset.get_batch(torch.as_tensor(indices, dtype=torch.long))
        return Batch((inputs, targets))


def batched(dataset):
    """A view of ``dataset`` that builds whole batches through ``dataset.get_batch`` when it has one."""
    return _BatchedView(dataset) if callable(getattr(dataset, "get_batch", None)) else dataset


def collate(samples):
    """``default_collate``, except for batches the dataset built itself."""
    if isinstance(samples, Batch):
        return tuple(samples)
    return default_collate(samples)


class RandomCropFlip(Dataset):
    """``dataset`` (an ``ImageTensorDataset``) with random crops after zero padding and horizontal flips.

    As torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()`` on the raw images (padding is
    black), applied to whole uint8 batches in ``get_batch``; draws from the global torch random stream.
    """

    def __init__(self, dataset, padding: int = 4, flip: bool = True) -> None:
        self.dataset = dataset
        self.padding = padding
        self.flip = flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # info, targets, classes, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        images, targets = self.get_batch(torch.tensor([index]))
        return images[0], int(targets[0])

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        p = self.padding
        if p:
            padded = torch.nn.functional.pad(images, (p, p, p, p))
            offsets = torch.randint(0, 2 * p + 1, (n, 2))
            images = torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets.tolist())])
        if self.flip:
            flips = torch.rand(n) < 0.5
            images = torch.where(flips.view(-1, 1, 1, 1), images.flip(3), images)
        return images

    def get_batch(self, indices, device=None):
        images = self.augment(self.dataset.images[indices])
        targets = self.dataset.targets[indices]
        if device is not None:
            images, targets = images.to(device), targets.to(device)
        return self.dataset.normalize(images), targets


# ------------------------------------------------------------------------------------------------ fingerprints

FINGERPRINT_SAMPLES = 16


def dataset_fingerprint(dataset, samples: int = FINGERPRINT_SAMPLES) -> dict:
    """``{"length": len(dataset), "items": sha256 hex or None, "sampled": count}``: what a checkpoint records of a
    data set, so that a resume with other data is refused.

    ``items`` hashes ``dataset[i]`` at ``samples`` evenly spaced indices (the first and the last included): the
    dtype, shape and bytes of tensors and numpy arrays, the values of numbers, strings and bytes, the mode, size and
    pixels of PIL images, and tuples, lists and dicts of those. The items are read under fixed seeds (python, numpy,
    torch) that are restored afterwards, so random augmentations give the same items every time and the run's
    random streams are untouched. An item of any other kind makes ``items`` ``None``: only the length is compared.
    A change at an index that is not sampled is not seen: the fingerprint catches another data set, not every edit.
    """
    n = len(dataset)
    count = min(n, samples)
    indices = sorted({round(j * (n - 1) / max(count - 1, 1)) for j in range(count)}) if n else []
    digest = hashlib.sha256(f"supermask_fx.dataset/{n}".encode())
    try:
        with _fixed_seeds():
            for i in indices:
                digest.update(f"[{i}]".encode())
                _feed(digest, dataset[i])
    except _Unhashable:
        return {"length": n, "items": None, "sampled": 0}
    return {"length": n, "items": digest.hexdigest(), "sampled": len(indices)}


class _Unhashable(Exception):
    pass


def _feed(digest, item, depth: int = 0) -> None:
    if depth > 8:
        raise _Unhashable
    if isinstance(item, torch.Tensor):
        if item.layout != torch.strided:
            raise _Unhashable
        t = item.detach().to("cpu").contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(item, (str, bytes, bool, type(None))) or isinstance(item, numbers.Number):
        digest.update(f"{type(item).__name__}:{item!r};".encode())
    elif isinstance(item, (tuple, list)):
        digest.update(f"{type(item).__name__}{len(item)}(".encode())
        for x in item:
            _feed(digest, x, depth + 1)
        digest.update(b")")
    elif isinstance(item, Mapping):
        digest.update(f"map{len(item)}{{".encode())
        for key in sorted(item, key=repr):
            digest.update(f"{key!r}:".encode())
            _feed(digest, item[key], depth + 1)
        digest.update(b"}")
    elif type(item).__module__ == "numpy" and hasattr(item, "dtype") and hasattr(item, "tobytes"):
        if item.dtype.hasobject:
            raise _Unhashable
        digest.update(f"N{item.dtype}{getattr(item, 'shape', ())}".encode())
        digest.update(item.tobytes())
    elif hasattr(item, "getdata") and hasattr(item, "mode") and hasattr(item, "size") and hasattr(item, "tobytes"):
        digest.update(f"I{item.mode}{tuple(item.size)}".encode())  # a PIL image
        digest.update(item.tobytes())
    else:
        raise _Unhashable


@contextlib.contextmanager
def _fixed_seeds():
    """Seeds 0 for python, numpy and torch (CPU) inside; every state as it was afterwards."""
    python = random.getstate()
    try:
        import numpy as np

        numpy_state = np.random.get_state()
    except ImportError:
        np = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random.seed(0)
        if np is not None:
            np.random.seed(0)
        try:
            yield
        finally:
            random.setstate(python)
            if np is not None:
                np.random.set_state(numpy_state)

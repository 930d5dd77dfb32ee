"""Data: every source yields uint8 N×3×32×32 images and int64 labels; the loader keeps a
whole split as one tensor on the training device and does all per-batch work there.

The hot path has no per-image Python, no PIL and no DataLoader workers: an epoch is one
seeded `randperm`, a batch is an index into the resident tensor, and augmentation is a
single batched gather.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cifar_bp.cifar10 import CLASSES, NUM_CLASSES, SIDE
from cifar_bp.config import AugmentConfig, DataConfig
from cifar_bp.errors import CliError, UsageError, first_line


@dataclass
class Split:
    images: torch.Tensor  # uint8, N×3×32×32
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class Dataset:
    train: Split
    test: Split | None
    val: Split | None = None
    classes: tuple[str, ...] = CLASSES
    notes: list[str] = field(default_factory=list)

    def identity(self) -> str:
        """A digest of every split's images and labels and of the class names: a resume
        compares it with the checkpoint's, so changed data is noticed, not trained on."""
        digest = hashlib.sha256("\n".join(self.classes).encode())
        for split in (self.train, self.val, self.test):
            if split is not None:
                digest.update(split.labels.numpy().tobytes())
                digest.update(split.images.contiguous().numpy().tobytes())
        return digest.hexdigest()


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    if cfg.source == "synthetic":
        data = Dataset(
            synthetic_split(cfg.train_size or 5000, seed=seed),
            synthetic_split(cfg.test_size or 1000, seed=seed + 1_000_003),
        )
    elif cfg.source == "cifar10":
        data = Dataset(*(cifar10_split(cfg, train) for train in (True, False)))
    else:
        data = folder_dataset(cfg)
    data.train = _head(data.train, cfg.train_size)
    if data.test is not None:
        data.test = _head(data.test, cfg.test_size)
    return split_validation(data, cfg.val_size, seed)


def folder_dataset(cfg: DataConfig) -> Dataset:
    from cifar_bp.folder import load_folder  # PIL and the cache only when used

    found = load_folder(cfg)

    def split(arrays: tuple | None) -> Split | None:
        return None if arrays is None else Split(*(torch.from_numpy(a) for a in arrays))

    train = split(found.train)
    assert train is not None
    return Dataset(train, split(found.test), classes=found.classes, notes=found.notes)


def _head(split: Split, size: int | None) -> Split:
    return split if size is None or size >= len(split) else split.subset(torch.arange(size))


def split_validation(data: Dataset, val_size: int, seed: int) -> Dataset:
    """Hold out `val_size` seeded training images; the rest stay for training."""
    if val_size == 0:
        if data.test is None:
            raise UsageError("this data has no test split: set data.val_size to hold one out")
        return data
    if val_size >= len(data.train):
        raise UsageError(
            f"data.val_size={val_size} leaves no training images (the train split has "
            f"{len(data.train)})"
        )
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    data.val = data.train.subset(order[:val_size].sort().values)
    data.train = data.train.subset(order[val_size:].sort().values)
    return data


def synthetic_split(size: int, seed: int, chunk: int = 4096) -> Split:
    """A deterministic, learnable 10-class image set.

    Each class has a smooth colour prototype. An image is its class prototype blended
    with a distractor prototype of another class, shifted by up to ±6 px (wrapping),
    with random contrast and heavy pixel noise: a model has to learn colour layouts that
    survive shifts and clutter, so accuracy starts at chance and climbs over epochs.
    Built in chunks straight into uint8, so 50,000 images never exist as floats at once.
    """
    gen = torch.Generator().manual_seed(12345)  # the prototypes are shared by all splits
    coarse = torch.rand(NUM_CLASSES, 3, 4, 4, generator=gen)
    protos = torch.nn.functional.interpolate(coarse, size=SIDE, mode="bicubic", align_corners=False)
    images = allocate_images(size)
    labels = torch.empty(size, dtype=torch.int64)
    for index, start in enumerate(range(0, size, chunk)):
        n = min(chunk, size - start)
        # Each chunk has its own seed, so the data does not depend on the order of work.
        gen.manual_seed(seed * 1_000_033 + index)
        images[start : start + n], labels[start : start + n] = _synthetic_chunk(protos, n, gen)
    return Split(images, labels)


def allocate_images(size: int) -> torch.Tensor:
    """Room for `size` uint8 images; a size this machine cannot hold is one line."""
    needed = size * 3 * SIDE * SIDE
    try:
        if needed > physical_memory():  # where overcommit would let the allocation through
            raise MemoryError
        return torch.empty(size, 3, SIDE, SIDE, dtype=torch.uint8)
    except (RuntimeError, MemoryError):
        raise CliError(
            f"{size:,} synthetic images need {needed / 2**30:,.1f} GiB of memory, more than "
            "this machine can give: lower data.train_size or data.test_size"
        ) from None


def physical_memory() -> float:
    """Bytes of RAM, or infinity where the system does not say."""
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return math.inf


def _synthetic_chunk(
    protos: torch.Tensor, n: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    others = (labels + torch.randint(1, NUM_CLASSES, (n,), generator=gen)) % NUM_CLASSES
    mix = 0.55 + 0.25 * torch.rand(n, 1, 1, 1, generator=gen)  # weight of the true class
    blend = mix * _shifted(protos, labels, gen) + (1 - mix) * _shifted(protos, others, gen)
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=gen)
    noise = 0.35 * torch.randn(blend.shape, generator=gen)
    pixels = (0.5 + contrast * (blend - 0.5) + noise).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8), labels


def _shifted(protos: torch.Tensor, classes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The prototypes of `classes`, each rolled by its own random shift of up to ±6 px."""
    shifts = torch.randint(-6, 7, (len(classes), 2), generator=gen)
    rows = (torch.arange(SIDE)[None, :] - shifts[:, :1]) % SIDE  # N×32
    cols = (torch.arange(SIDE)[None, :] - shifts[:, 1:]) % SIDE
    chans = torch.arange(3)[None, :, None, None]
    return protos[
        classes[:, None, None, None], chans, rows[:, None, :, None], cols[:, None, None, :]
    ]


def cifar10_split(cfg: DataConfig, train: bool) -> Split:
    """The official pickle batches via torchvision, with one clear message when absent."""
    from torchvision.datasets import CIFAR10  # imported here: it is slow to import

    root = Path(cfg.root)
    if root.exists() and not root.is_dir():
        raise CliError(f"data.root {root} is a file, not a directory")
    try:
        ds = CIFAR10(str(root), train=train, download=cfg.download)
    except Exception as err:
        raise CliError(_cifar_missing(root, cfg.download, err)) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.tensor(ds.targets, dtype=torch.int64))


def _cifar_missing(root: Path, download: bool, err: Exception) -> str:
    why = "download failed" if download else "data.download is false"
    return (
        f"CIFAR-10 not found or corrupt under {root.resolve()}/cifar-10-batches-py ({why}: "
        f"{first_line(err)}). Place "
        f"cifar-10-python.tar.gz in {root} and run again, or try the tool offline with "
        "--config configs/smoke.yaml (synthetic data)"
    )


class DeviceLoader:
    """Batches from a split held as one uint8 tensor on the training device.

    The order of epoch e is `randperm` seeded by (seed, e) and the augmentation of step s is
    seeded by (seed, s), so any position in training can be reproduced exactly from
    (seed, epoch, step) alone; that is what makes mid-epoch resume bitwise exact.
    Under DDP every rank draws the same order and takes its own slice of each global batch.
    """

    def __init__(
        self,
        split: Split,
        cfg: DataConfig,
        batch_size: int,
        device: torch.device,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        channels_last: bool = False,
    ) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.device, self.train = batch_size, device, train
        self.seed, self.rank, self.world = seed, rank, world
        self.augment = cfg.augment if train else None  # never augment evaluation data
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        mean = torch.tensor(cfg.mean if cfg.normalize else (0.0,) * 3, device=device)
        std = torch.tensor(cfg.std if cfg.normalize else (1.0,) * 3, device=device)
        # One fused multiply-add: x/255 then (x - mean)/std.
        self.scale = (1 / (255 * std)).view(1, 3, 1, 1)
        self.shift = (-mean / std).view(1, 3, 1, 1)
        self.gen = torch.Generator(device=device)
        self.flip_first = None  # alternate flips: the images flipped in even epochs
        if self.augment is not None and self.augment.flip == "alternate":
            gen = torch.Generator().manual_seed(seed * 100_019 + 7)
            self.flip_first = (torch.rand(len(self.labels), generator=gen) < 0.5).to(device)

    def __len__(self) -> int:
        """Steps per epoch. With several ranks an incomplete last global batch is dropped,
        so that every rank runs the same number of steps."""
        n, global_batch = len(self.labels), self.batch_size * self.world
        if self.world > 1:
            return n // global_batch
        return -(-n // global_batch)

    def epoch(self, epoch: int, start_step: int = 0, first_global_step: int = 0) -> Iterator:
        """Yield (images, labels) for one epoch, skipping the first `start_step` batches."""
        n, b = len(self.labels), self.batch_size
        if self.train:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(n, generator=gen)  # drawn on the host: the same on any device
            if self.device.type == "cuda":  # from pinned memory the copy makes the host not wait
                order = order.pin_memory().to(self.device, non_blocking=True)
            else:
                order = order.to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for step in range(start_step, len(self)):
            begin = step * b * self.world + self.rank * b
            index = order[begin : begin + b]
            images = self.images[index]
            if self.augment is not None:
                self.gen.manual_seed(self.seed * 1_000_003 + first_global_step + step - start_step)
                flips = None
                if self.flip_first is not None:
                    flips = self.flip_first[index] ^ bool(epoch % 2)
                images = augment_batch(images, self.augment, self.gen, self.rank, flips)
            yield self.to_float(images), self.labels[index]

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().mul_(self.scale).add_(self.shift)
        return x.contiguous(memory_format=self.memory_format)


def augment_batch(
    images: torch.Tensor,
    cfg: AugmentConfig,
    gen: torch.Generator,
    rank: int = 0,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random crop (reflect or zero padding) and horizontal flip, independently per image,
    as one gather over the whole uint8 batch: no padding copy and no per-image loop.
    `flips` (one bool per image) replaces the random flips (`flip: alternate`)."""
    n, pad = images.shape[0], cfg.crop_padding
    dev = images.device
    # Each rank consumes its own stretch of the step's random stream.
    draws = torch.randint(0, 2 * pad + 1, (n * (rank + 1), 2), generator=gen, device=dev)[-n:]
    coins = torch.rand(n * (rank + 1), generator=gen, device=dev)[-n:] < 0.5
    flips = coins if flips is None else flips
    base = torch.arange(SIDE, device=dev)
    rows = draws[:, :1] - pad + base  # N×32 source rows, possibly outside the image
    cols = draws[:, 1:] - pad + base
    if cfg.flip:
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    inside = None
    if cfg.pad_mode == "reflect":
        rows, cols = _reflect(rows), _reflect(cols)
    else:
        inside = ((rows >= 0) & (rows < SIDE))[:, None, :, None] & ((cols >= 0) & (cols < SIDE))[
            :, None, None, :
        ]
        rows, cols = rows.clamp(0, SIDE - 1), cols.clamp(0, SIDE - 1)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chans = torch.arange(images.shape[1], device=dev)[None, :, None, None]
    out = images[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]
    return out * inside if inside is not None else out


def _reflect(index: torch.Tensor) -> torch.Tensor:
    """Mirror indices that fall outside 0..31 back inside, as reflect padding does."""
    index = index.abs()
    return torch.where(index > SIDE - 1, 2 * (SIDE - 1) - index, index)

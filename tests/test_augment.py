"""Batched augmentation (data.augment_batch) and what DeviceLoader feeds the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cifar_bp.config import AugmentConfig, DataConfig
from cifar_bp.data import DeviceLoader, Split, augment_batch

CPU = torch.device("cpu")


def batch(n: int = 64, low: int = 0, high: int = 256, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)


def augment(images: torch.Tensor, seed: int = 0, rank: int = 0, **cfg) -> torch.Tensor:
    return augment_batch(images, AugmentConfig(**cfg), torch.Generator().manual_seed(seed), rank)


def crops(images: torch.Tensor, pad: int, mode: str) -> torch.Tensor:
    """Every crop of each padded image: shape N×(2p+1)×(2p+1)×3×32×32."""
    padded = F.pad(images.float(), (pad,) * 4, mode="constant" if mode == "zero" else "reflect")
    windows = padded.unfold(2, 32, 1).unfold(3, 32, 1)  # N×3×(2p+1)×(2p+1)×32×32
    return windows.permute(0, 2, 3, 1, 4, 5)


def offsets_matching(out: torch.Tensor, images: torch.Tensor, pad: int, mode: str) -> list:
    """For each output image, the (dy, dx) crops of its padded input that it equals."""
    equal = (crops(images, pad, mode) == out.float()[:, None, None]).flatten(3).all(dim=3)
    return [[tuple(xy) for xy in e.nonzero().tolist()] for e in equal]


@pytest.mark.parametrize("mode", ["reflect", "zero"])
def test_shape_dtype_and_value_range(mode):
    images = batch(low=40, high=200)
    out = augment(images, crop_padding=4, pad_mode=mode, flip=True)
    assert out.shape == images.shape and out.dtype == torch.uint8
    low = 0 if mode == "zero" else 40  # zero padding adds black, nothing else is new
    assert out.min() >= low and out.max() <= 199


def test_no_padding_and_no_flip_is_the_identity():
    images = batch()
    assert torch.equal(augment(images, crop_padding=0, flip=False), images)


def test_flip_only_mirrors_some_images_and_leaves_the_rest():
    images = batch()
    out = augment(images, crop_padding=0, flip=True)
    flipped = (out == images.flip(3)).flatten(1).all(dim=1)
    kept = (out == images).flatten(1).all(dim=1)
    assert (flipped ^ kept).all()  # each image is exactly one of the two
    assert 10 < int(flipped.sum()) < 54  # about half of 64


def test_zero_padding_puts_zeros_only_in_the_border():
    images = batch(low=1)  # no zeros of its own
    out = augment(images, crop_padding=4, pad_mode="zero", flip=False)
    assert (out[:, :, 4:28, 4:28] != 0).all()
    zero = out == 0
    assert zero.any()
    # A zero pixel means its whole row or whole column (in every channel) came from padding.
    row_pad = zero.all(dim=3, keepdim=True).all(dim=1, keepdim=True)
    col_pad = zero.all(dim=2, keepdim=True).all(dim=1, keepdim=True)
    assert torch.equal(zero, (row_pad | col_pad).expand_as(zero))


@pytest.mark.parametrize("mode", ["reflect", "zero"])
def test_each_output_is_one_crop_of_the_padded_input(mode):
    images = batch()
    out = augment(images, crop_padding=4, pad_mode=mode, flip=False)
    found = offsets_matching(out, images, 4, mode)
    assert all(len(offsets) == 1 for offsets in found), found
    assert len({offsets[0] for offsets in found}) > 20  # many different shifts


def test_reflect_padding_matches_torch_pad_for_a_known_offset():
    images = batch(n=1)
    expected = F.pad(images.float(), (4, 4, 4, 4), mode="reflect")[:, :, 1:33, 7:39]
    # Padding 4 offers 81 crops; among 512 copies of the image some get the crop at (1, 7).
    outs = augment(images.expand(512, -1, -1, -1), crop_padding=4, pad_mode="reflect", flip=False)
    hits = (outs.float() == expected).flatten(1).all(dim=1).nonzero()
    assert len(hits) > 0, "no copy was cropped at offset (1, 7)"
    out = outs[hits[0]]
    # By hand: output (r, c) reads source (r - 3, c + 3), mirrored about the edge pixels
    # (row -3 reads row 3; columns 32, 33, 34 read 30, 29, 28), edges not repeated.
    img, mirrored = images[0], torch.tensor([30, 29, 28])
    for r, source in ((0, 3), (3, 0), (31, 28)):
        assert torch.equal(out[0, :, r, :29], img[:, source, 3:])
        assert torch.equal(out[0, :, r, 29:], img[:, source, mirrored])


def test_crop_and_flip_together_stay_crops_of_the_padded_input():
    images = batch()
    out = augment(images, crop_padding=3, pad_mode="reflect", flip=True)
    plain = offsets_matching(out, images, 3, "reflect")
    mirrored = offsets_matching(out.flip(3), images, 3, "reflect")
    assert all(p or m for p, m in zip(plain, mirrored, strict=True))
    assert any(m and not p for p, m in zip(plain, mirrored, strict=True))


def test_identical_images_are_augmented_independently():
    images = batch(n=1).expand(64, -1, -1, -1).contiguous()
    out = augment(images, crop_padding=4, pad_mode="reflect", flip=True)
    distinct = {img.numpy().tobytes() for img in out}
    assert len(distinct) > 20


def test_same_seed_same_augmentation_other_seed_or_rank_differs():
    images = batch()
    kw = {"crop_padding": 4, "pad_mode": "reflect", "flip": True}
    assert torch.equal(augment(images, seed=3, **kw), augment(images, seed=3, **kw))
    assert not torch.equal(augment(images, seed=3, **kw), augment(images, seed=4, **kw))
    assert not torch.equal(augment(images, seed=3, **kw), augment(images, seed=3, rank=1, **kw))


# DeviceLoader ----------------------------------------------------------------------------


def split(n: int = 50) -> Split:
    return Split(batch(n, seed=9), torch.arange(n) % 10)


def normalized(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def test_evaluation_batches_are_exactly_the_normalized_images_in_order():
    data, cfg = split(), DataConfig()  # augmentation on by default: must not apply here
    loader = DeviceLoader(data, cfg, 16, CPU, train=False, seed=5)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 4
    images = torch.cat([x for x, _ in batches])
    assert torch.allclose(images, normalized(data.images, cfg), atol=1e-5)
    assert torch.equal(torch.cat([y for _, y in batches]), data.labels)


def test_without_normalize_pixels_are_scaled_to_0_1():
    data, cfg = split(), DataConfig(normalize=False, augment=None)
    images = torch.cat([x for x, _ in DeviceLoader(data, cfg, 50, CPU, train=False).epoch(0)])
    assert torch.allclose(images, data.images.float() / 255)


def test_training_batches_are_augmented_and_cover_the_split_once():
    data, cfg = split(), DataConfig()
    loader = DeviceLoader(data, cfg, 16, CPU, train=True, seed=5)
    batches = list(loader.epoch(0))
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == sorted(data.labels.tolist())
    plain = DeviceLoader(data, DataConfig(augment=None), 16, CPU, train=True, seed=5)
    plain_images = torch.cat([x for x, _ in plain.epoch(0)])
    assert torch.equal(torch.cat([y for _, y in plain.epoch(0)]), labels)  # same order
    assert not torch.allclose(torch.cat([x for x, _ in batches]), plain_images)


def test_resuming_mid_epoch_reproduces_the_remaining_batches():
    loader = DeviceLoader(split(), DataConfig(), 8, CPU, train=True, seed=2)
    full = list(loader.epoch(1, first_global_step=7))
    rest = list(loader.epoch(1, start_step=3, first_global_step=10))
    assert len(rest) == len(full) - 3
    for (x, y), (x2, y2) in zip(full[3:], rest, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def flipped_by_id(loader: DeviceLoader, data: Split, epoch: int) -> dict[int, bool]:
    """Which images (by id) an epoch fed mirrored; the ids are the labels."""
    out = {}
    for x, y in loader.epoch(epoch, first_global_step=epoch * len(loader)):
        for image, i in zip(x, y.tolist(), strict=True):
            original = normalized(data.images[i : i + 1], loader_cfg(loader))[0]
            mirrored = original.flip(2)
            assert torch.allclose(image, original, atol=1e-5) != torch.allclose(
                image, mirrored, atol=1e-5
            )
            out[i] = torch.allclose(image, mirrored, atol=1e-5)
    return out


def loader_cfg(loader: DeviceLoader) -> DataConfig:
    return DataConfig(augment=loader.augment)


@pytest.mark.parametrize("rank", [0, 1])
def test_alternate_flips_show_every_image_both_ways_in_any_two_epochs(rank):
    n = 64
    data = Split(batch(n, seed=4), torch.arange(n))
    cfg = DataConfig(augment=AugmentConfig(crop_padding=0, flip="alternate"))
    loader = DeviceLoader(data, cfg, 8, CPU, train=True, seed=3, rank=rank, world=2)
    epochs = [flipped_by_id(loader, data, e) for e in range(3)]
    seen = sorted(epochs[0])
    assert len(seen) == n // 2 and sorted(epochs[1]) != seen  # this rank's half, reshuffled
    assert len(set(epochs[0]) & set(epochs[1])) > 4
    for i in set(epochs[0]) & set(epochs[1]):
        assert epochs[0][i] != epochs[1][i], i  # mirrored in one epoch, not in the next
    for i in set(epochs[0]) & set(epochs[2]):
        assert epochs[0][i] == epochs[2][i], i
    assert 8 < sum(epochs[0].values()) < 24  # which images start mirrored is random
    other = DeviceLoader(data, cfg, 8, CPU, train=True, seed=3, rank=1 - rank, world=2)
    both = epochs[0] | flipped_by_id(other, data, 0)
    assert len(both) == n  # the ranks split the images between them

"""The folder data source on small folders the tests write with PIL, and the validation split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_bp import folder
from cifar_bp.config import DataConfig
from cifar_bp.data import Dataset, Split, folder_dataset, load_dataset, split_validation
from cifar_bp.errors import CliError, UsageError
from tests.helpers import SMOKE, only_run, scalars


def pixels(seed: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def write_png(path: Path, array: np.ndarray, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def make_split(split_dir: Path, classes: list[str], per_class: int, seed: int = 0) -> dict:
    """PNG images with random pixels; returns {pixel bytes: class name} for every image."""
    expected = {}
    for c, name in enumerate(classes):
        for i in range(per_class):
            array = pixels(seed + 1000 * c + i)
            write_png(split_dir / name / f"{i:03d}.png", array)
            expected[array.transpose(2, 0, 1).tobytes()] = name
    return expected


def cfg_for(root: Path, tmp_path: Path, **extra) -> DataConfig:
    return DataConfig(source="folder", root=str(root), cache_dir=str(tmp_path / "cache"), **extra)


def cache_file(tmp_path: Path) -> Path:
    (path,) = (tmp_path / "cache").glob("*train*.npz")
    return path


def as_set(split: Split, classes: tuple[str, ...]) -> dict:
    pairs = zip(split.images, split.labels, strict=True)
    return {image.numpy().tobytes(): classes[int(label)] for image, label in pairs}


def test_class_order_labels_and_png_pixels_round_trip(tmp_path):
    expected = make_split(tmp_path / "data" / "train", ["truck", "airplane", "cat"], per_class=4)
    data = folder_dataset(cfg_for(tmp_path / "data", tmp_path, val_size=2))
    assert data.classes == ("airplane", "cat", "truck")
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    assert data.train.images.shape == (12, 3, 32, 32)
    assert as_set(data.train, data.classes) == expected  # exact pixels, each with its label
    # Classes are interleaved, so the first images (a data.train_size subset) cover all.
    assert data.train.labels[:3].tolist() == [0, 1, 2]


def test_cifar10_class_names_sort_to_the_official_order():
    from cifar_bp.cifar10 import CLASSES as CIFAR10_CLASSES

    assert tuple(sorted(CIFAR10_CLASSES)) == CIFAR10_CLASSES


def test_jpeg_grayscale_and_rgba_are_converted_to_rgb(tmp_path):
    cat = tmp_path / "data" / "train" / "cat"
    write_png(cat / "gray.png", np.full((32, 32), 77, np.uint8), "L")
    rgba = np.dstack([pixels(1), np.full((32, 32), 10, np.uint8)])
    write_png(cat / "rgba.png", rgba, "RGBA")
    Image.new("RGB", (32, 32), (200, 40, 90)).save(cat / "flat.jpg", quality=95)
    Image.new("RGB", (32, 32), (10, 220, 30)).save(cat / "flat2.JPEG", quality=95)
    (cat / "notes.txt").write_text("ignored: not an image extension")
    (cat / ".hidden.png").write_bytes(b"ignored: hidden")
    data = folder_dataset(cfg_for(tmp_path / "data", tmp_path, val_size=1))
    files = folder.list_split(tmp_path / "data" / "train").files
    images = dict(zip(files, data.train.images, strict=True))
    assert set(images) == {"cat/flat.jpg", "cat/flat2.JPEG", "cat/gray.png", "cat/rgba.png"}
    assert (images["cat/gray.png"] == 77).all()
    assert torch.equal(images["cat/rgba.png"], torch.from_numpy(pixels(1)).permute(2, 0, 1))
    for name, colour in (("cat/flat.jpg", (200, 40, 90)), ("cat/flat2.JPEG", (10, 220, 30))):
        mean = images[name].float().mean(dim=(1, 2))
        assert torch.allclose(mean, torch.tensor(colour).float(), atol=3), name


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken.png", b"this is not an image", "not a PNG or JPEG image"),
        ("truncated.jpg", None, "cannot be decoded"),
        ("wrong.png", (31, 32), "31×32 pixels; only 32×32 images are accepted"),
    ],
)
def test_bad_file_stops_with_one_message_naming_it(tmp_path, name, content, message):
    make_split(tmp_path / "data" / "train", ["cat", "dog"], per_class=3)
    bad = tmp_path / "data" / "train" / "dog" / name
    if isinstance(content, bytes):
        bad.write_bytes(content)
    elif isinstance(content, tuple):
        write_png(bad, pixels(0, content))
    else:
        Image.fromarray(pixels(0)).save(bad, quality=90)
        bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(CliError) as err:
        folder_dataset(cfg_for(tmp_path / "data", tmp_path, val_size=1))
    assert str(bad) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_file_through_the_cli_is_one_line(cli, tmp_path):
    make_split(tmp_path / "data" / "train", ["cat"], per_class=2)
    (tmp_path / "data" / "train" / "cat" / "bad.jpg").write_text("nope")
    result = cli("train", "--config", SMOKE, "--set", "data.source=folder",
                 "--set", f"data.root={tmp_path / 'data'}", "--set", "data.val_size=1",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", "--logdir", tmp_path / "runs",
                 "-q")  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'data' / 'train' / 'cat' / 'bad.jpg'}: not a PNG or JPEG image"
    ]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("file", "is a file, not a directory"),
        ("no-train", "has no train/ folder"),
        ("no-classes", "has no class folders"),
        ("no-images", "has no images"),
        ("unknown-test-class", "has class folders that train/ lacks: zebra"),
    ],
)
def test_unusable_roots_are_one_clear_message(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "file":
        root.write_text("x")
    elif layout == "no-train":
        (root / "test" / "cat").mkdir(parents=True)
    elif layout == "no-classes":
        (root / "train").mkdir(parents=True)
        (root / "train" / "loose.png").write_bytes(b"")
    elif layout == "no-images":
        (root / "train" / "cat").mkdir(parents=True)
        (root / "train" / "cat" / "readme.txt").write_text("no images here")
    elif layout == "unknown-test-class":
        make_split(root / "train", ["cat"], per_class=1)
        make_split(root / "test", ["cat", "zebra"], per_class=1)
    with pytest.raises(CliError) as err:
        folder_dataset(cfg_for(root, tmp_path, val_size=1))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_more_classes_than_network_outputs_is_refused(tmp_path):
    make_split(tmp_path / "data" / "train", [f"c{c:02d}" for c in range(11)], per_class=1)
    with pytest.raises(CliError, match="11 class folders"):
        folder_dataset(cfg_for(tmp_path / "data", tmp_path))


def test_test_folder_labels_follow_train_class_order(tmp_path):
    make_split(tmp_path / "data" / "train", ["bird", "cat", "dog"], per_class=2)
    expected = make_split(tmp_path / "data" / "test", ["dog"], per_class=3, seed=50)
    data = folder_dataset(cfg_for(tmp_path / "data", tmp_path))
    assert data.test is not None and data.notes == []
    assert data.test.labels.tolist() == [2, 2, 2]
    assert as_set(data.test, data.classes) == expected


def test_no_test_folder_means_validation_with_a_note(tmp_path):
    make_split(tmp_path / "data" / "train", ["cat", "dog"], per_class=5)
    data = load_dataset(cfg_for(tmp_path / "data", tmp_path, val_size=4))
    assert data.test is None and data.val is not None
    assert len(data.val) == 4 and len(data.train) == 6
    assert any("no test/ folder" in n and "validation split" in n for n in data.notes)
    with pytest.raises(UsageError, match=r"data\.val_size"):
        load_dataset(cfg_for(tmp_path / "data", tmp_path, val_size=0))


def test_unchanged_folder_loads_from_the_cache_without_decoding(tmp_path, monkeypatch):
    make_split(tmp_path / "data" / "train", ["cat", "dog"], per_class=3)
    cfg = cfg_for(tmp_path / "data", tmp_path, val_size=1)
    first = folder_dataset(cfg)
    written = cache_file(tmp_path).stat().st_mtime_ns

    def no_decoding(*args):
        raise AssertionError("a warm load must not decode")

    monkeypatch.setattr(folder, "decode_images", no_decoding)
    second = folder_dataset(cfg)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.train.labels, second.train.labels)
    assert cache_file(tmp_path).stat().st_mtime_ns == written
    assert not any("cache" in note for note in second.notes)


def _add(cat: Path) -> None:
    write_png(cat / "new.png", pixels(99))


def _modify(cat: Path) -> None:
    path = cat / "000.png"
    before = path.stat()
    write_png(path, pixels(98))
    # Same size is possible in principle; a different mtime is what must be noticed.
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


def _remove(cat: Path) -> None:
    (cat / "001.png").unlink()


def _touch(cat: Path) -> None:
    """Same bytes, new mtime: e.g. a file copied over with identical content."""
    os.utime(cat / "002.png", ns=(0, 1_000_000_000))


@pytest.mark.parametrize(
    "change", [_add, _modify, _remove, _touch], ids=["add", "modify", "remove", "touch"]
)
def test_changed_folder_is_decoded_again(tmp_path, change):
    make_split(tmp_path / "data" / "train", ["cat", "dog"], per_class=3)
    cfg = cfg_for(tmp_path / "data", tmp_path, val_size=1)
    folder_dataset(cfg)
    change(tmp_path / "data" / "train" / "cat")
    expected = {
        np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1).tobytes(): p.parent.name
        for p in (tmp_path / "data" / "train").glob("*/*.png")
    }
    again = folder_dataset(cfg)
    assert as_set(again.train, again.classes) == expected
    assert any("changed" in note for note in again.notes)
    # ...and the rewritten cache is what the next run uses.
    assert as_set(folder_dataset(cfg).train, again.classes) == expected


def test_corrupt_cache_is_rebuilt(tmp_path):
    expected = make_split(tmp_path / "data" / "train", ["cat"], per_class=2)
    cfg = cfg_for(tmp_path / "data", tmp_path, val_size=1)
    folder_dataset(cfg)
    cache_file(tmp_path).write_bytes(b"garbage")
    data = folder_dataset(cfg)
    assert as_set(data.train, data.classes) == expected
    assert any("could not read the image cache" in note for note in data.notes)
    assert cache_file(tmp_path).stat().st_size > 2 * 3 * 32 * 32


def test_unwritable_cache_dir_still_loads_with_a_note(tmp_path):
    expected = make_split(tmp_path / "data" / "train", ["cat"], per_class=2)
    (tmp_path / "blocker").write_text("a file where the cache directory should go")
    cfg = DataConfig(
        source="folder", root=str(tmp_path / "data"), cache_dir=str(tmp_path / "blocker" / "c")
    )
    data = folder_dataset(cfg)
    assert as_set(data.train, data.classes) == expected
    assert any("could not write the image cache" in note for note in data.notes)


def test_worker_processes_decode_the_same_pixels(tmp_path, monkeypatch):
    make_split(tmp_path / "data" / "train", ["cat", "dog"], per_class=5)
    listing = folder.list_split(tmp_path / "data" / "train")
    in_process = folder.decode_images(listing.folder, listing.files)
    monkeypatch.setattr(folder, "POOL_MIN_FILES", 0)
    monkeypatch.setattr(folder, "CHUNK", 3)
    pooled = folder.decode_images(listing.folder, listing.files)
    assert np.array_equal(in_process, pooled)
    (tmp_path / "data" / "train" / "dog" / "bad.png").write_text("nope")
    listing = folder.list_split(tmp_path / "data" / "train")
    with pytest.raises(CliError, match=r"bad\.png: not a PNG or JPEG image"):
        folder.decode_images(listing.folder, listing.files)


def test_decoding_progress_off_a_terminal_is_a_few_plain_lines(tmp_path, monkeypatch, capsys):
    make_split(tmp_path / "data" / "train", ["cat"], per_class=20)
    monkeypatch.setattr(folder, "PROGRESS_MIN_FILES", 0)
    monkeypatch.setattr(folder, "CHUNK", 2)
    folder_dataset(cfg_for(tmp_path / "data", tmp_path, val_size=1))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("decoding 20 images in ")
    assert lines[-1] == "  decoded 20/20" and len(lines) <= 11


@pytest.mark.parametrize("quiet", [False, True], ids=["progress", "quiet"])
def test_training_on_a_folder_without_test_evaluates_on_validation(cli, tmp_path, quiet):
    make_split(tmp_path / "data" / "train", [f"class{c}" for c in range(10)], per_class=12)
    logdir = tmp_path / "runs"
    result = cli("train", "--config", SMOKE, "--set", "data.source=folder",
                 "--set", f"data.root={tmp_path / 'data'}", "--set", "data.val_size=20",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", "--epochs", 1,
                 "--logdir", logdir, *(["-q"] if quiet else []))  # fmt: skip
    assert result.exit_code == 0, result.output
    # The note explains which split the figures are for, so even -q prints it.
    assert "no test/ folder: evaluating on the validation split" in result.stdout
    assert ("epoch 1/1 step" in result.stdout) is not quiet  # progress only without -q
    series = scalars(only_run(logdir))
    assert {"val/loss", "val/accuracy"} <= set(series)
    assert not any(tag.startswith("test/") for tag in series)
    assert 0.0 <= series["val/accuracy"][-1][1] <= 1.0


# The validation split (data.split_validation) -------------------------------------------


def numbered(n: int) -> Dataset:
    """A dataset whose labels are the image indices, so a split's labels show its indices."""
    return Dataset(Split(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.arange(n)), None)


def test_validation_split_is_seeded_disjoint_and_sized():
    a = split_validation(numbered(100), 30, seed=7)
    b = split_validation(numbered(100), 30, seed=7)
    c = split_validation(numbered(100), 30, seed=8)
    assert len(a.val) == 30 and len(a.train) == 70
    assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.train.labels, b.train.labels)
    assert not set(a.val.labels.tolist()) & set(a.train.labels.tolist())
    assert sorted(a.val.labels.tolist() + a.train.labels.tolist()) == list(range(100))
    assert not torch.equal(a.val.labels, c.val.labels)


def test_validation_split_rejects_sizes_that_leave_nothing():
    with pytest.raises(UsageError, match="leaves no training images"):
        split_validation(numbered(10), 10, seed=0)
    with pytest.raises(UsageError, match="no test split"):
        split_validation(numbered(10), 0, seed=0)


# Pictures beyond 8-bit RGB, empty and nested class folders -------------------------------


def test_a_16_bit_png_decodes_as_its_8_bit_twin(tmp_path):
    """PIL's own conversion clips 16-bit values at 255: the picture came out nearly white."""
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    cat = tmp_path / "data" / "train" / "cat"
    cat.mkdir(parents=True)
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(cat / "deep.png")
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(cat / "flat.png")
    data = folder_dataset(cfg_for(tmp_path / "data", tmp_path, val_size=1))
    files = folder.list_split(tmp_path / "data" / "train").files
    images = dict(zip(files, data.train.images.int(), strict=True))
    assert Image.open(cat / "deep.png").mode.startswith("I")
    assert images["cat/deep.png"].float().mean() == pytest.approx(127.5, abs=0.5)
    assert (images["cat/deep.png"] - images["cat/flat.png"]).abs().max() <= 1


def test_a_float_picture_decodes_by_its_range(tmp_path):
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32).astype(np.float32)
    Image.fromarray(ramp, "F").save(tmp_path / "floats.tiff")
    (decoded,) = folder.decode_images(tmp_path, ["floats.tiff"])
    expected = np.rint(ramp * 255).astype(np.uint8)
    assert all(np.array_equal(channel, expected) for channel in decoded)


def test_an_empty_class_folder_is_refused_by_name(tmp_path):
    """It would take a class index of its own and shift every later class's label."""
    make_split(tmp_path / "data" / "train", ["cat", "dog"], per_class=2)
    (tmp_path / "data" / "train" / "bird").mkdir()
    (tmp_path / "data" / "train" / "bird" / "notes.txt").write_text("no pictures")
    with pytest.raises(CliError) as err:
        folder_dataset(cfg_for(tmp_path / "data", tmp_path, val_size=1))
    assert str(err.value).startswith(f"class folder {tmp_path / 'data' / 'train' / 'bird'} has")
    assert "has no images" in str(err.value) and "\n" not in str(err.value)


def test_an_empty_test_class_folder_changes_no_label(tmp_path):
    make_split(tmp_path / "data" / "train", ["cat", "dog"], per_class=2)
    make_split(tmp_path / "data" / "test", ["dog"], per_class=2, seed=40)
    (tmp_path / "data" / "test" / "cat").mkdir()
    data = folder_dataset(cfg_for(tmp_path / "data", tmp_path))
    assert data.test is not None and data.test.labels.tolist() == [1, 1]


def test_images_in_nested_folders_belong_to_their_class(tmp_path):
    expected = make_split(tmp_path / "data" / "train", ["cat", "dog"], per_class=2)
    deeper = make_split(tmp_path / "data" / "train" / "dog" / "night", ["deep"], 2, seed=70)
    expected |= {image: "dog" for image in deeper}
    write_png(tmp_path / "data" / "train" / "cat" / ".hidden" / "x.png", pixels(5))
    data = folder_dataset(cfg_for(tmp_path / "data", tmp_path, val_size=1))
    assert data.classes == ("cat", "dog")
    assert as_set(data.train, data.classes) == expected
    files = folder.list_split(tmp_path / "data" / "train").files
    assert "dog/night/deep/000.png" in files and len(files) == 6

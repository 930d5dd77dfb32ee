"""`cifar-bp predict` on real image files against a real (tiny) trained run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from cifar_bp.checkpoint import load_checkpoint
from cifar_bp.config import ModelConfig, resolve_config
from cifar_bp.data import load_dataset
from cifar_bp.model import build_model
from tests.helpers import SMOKE, Cli


def train_tiny_run(logdir: Path) -> Path:
    """A real run from the real CLI, with normalisation on (so it matters) and a weight
    average (so choosing it matters)."""
    result = Cli()(
        "train", "-c", SMOKE, "--epochs", "1", "--logdir", logdir, "--run-name", "tiny", "-q",
        "--set", "data.train_size=256", "--set", "data.test_size=64",
        "--set", "data.normalize=true", "--set", "train.ema_decay=0.9",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return logdir / "tiny"


FEW = ["cat", "dog", "fox"]


def train_few_class_run(tmp: Path) -> Path:
    """A real folder run of three classes: the net still has ten outputs."""
    rng = np.random.default_rng(5)
    for split, count in (("train", 8), ("test", 2)):
        for name in FEW:
            (tmp / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp / "data" / split / name / f"{i}.png")
    result = Cli()(
        "train", "-c", SMOKE, "--epochs", "1", "--logdir", tmp, "--run-name", "few", "-q",
        "--set", "data.source=folder", "--set", f"data.root={tmp / 'data'}",
        "--set", f"data.cache_dir={tmp / 'cache'}", "--set", "train.batch_size=8",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return tmp / "few"


@pytest.fixture(scope="module")
def few_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_few_class_run(tmp_path_factory.mktemp("few"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("runs"))


def save(path: Path, size: tuple[int, int], mode: str, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    return path


def predict_json(cli: Cli, run_dir: Path, *args: object):
    result = cli("predict", *args, "--checkpoint", run_dir, "--json")
    return result, json.loads(result.stdout)


def reference_probs(run_dir: Path, path: Path, weights: str = "average") -> torch.Tensor:
    """The course's own pipeline (torchvision Resize, ToTensor, Normalize) on a model
    built here from the checkpoint's tensors: independent of cifar_bp.predict."""
    payload = load_checkpoint(run_dir)
    data = payload["config"]["data"]
    pipeline = transforms.Compose([
        transforms.Resize((32, 32)), transforms.ToTensor(),
        transforms.Normalize(data["mean"], data["std"]),
    ])  # fmt: skip
    x = pipeline(Image.open(path).convert("RGB"))[None]
    model = build_model(ModelConfig(channels_last=False))
    state = payload["average"]["weights"] if weights == "average" else payload["model"]
    model.load_state_dict(state)
    with torch.no_grad():
        return torch.softmax(model.eval()(x), dim=1)[0]


def test_sizes_modes_and_a_text_file(cli: Cli, run_dir: Path, tmp_path: Path) -> None:
    rgba = save(tmp_path / "wide.png", (64, 48), "RGBA")
    gray = save(tmp_path / "gray.jpg", (32, 32), "L", seed=1)
    text = tmp_path / "notes.txt"
    text.write_text("not a picture\n")
    rgb = save(tmp_path / "exact.png", (32, 32), "RGB", seed=2)
    result, entries = predict_json(cli, run_dir, rgba, gray, text, rgb, "--top-k", "3")
    assert result.exit_code == 1  # one file failed, the others were still classified
    assert [e["path"] for e in entries] == [str(p) for p in (rgba, gray, text, rgb)]
    assert entries[2] == {"path": str(text), "error": "not an image PIL can read"}
    assert result.stderr.strip().splitlines() == [f"error: {text}: not an image PIL can read"]
    assert entries[0]["notes"] == ["converted RGBA to RGB", "resized 64×48 to 32×32"]
    assert entries[1]["notes"] == ["converted L to RGB"]
    assert entries[3]["notes"] == []
    classes = load_checkpoint(run_dir)["classes"]
    for entry in (entries[0], entries[1], entries[3]):
        probs = [t["prob"] for t in entry["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert all(t["class"] in classes for t in entry["top"])


def test_probabilities_are_the_models_own(cli: Cli, run_dir: Path, tmp_path: Path) -> None:
    image = save(tmp_path / "big.png", (64, 48), "RGBA", seed=3)
    result, (entry,) = predict_json(cli, run_dir, image, "--top-k", "10")
    assert result.exit_code == 0, result.output
    ours = {t["class"]: t["prob"] for t in entry["top"]}
    assert sum(ours.values()) == pytest.approx(1.0, abs=1e-5)
    classes = load_checkpoint(run_dir)["classes"]
    expected = reference_probs(run_dir, image)
    got = torch.tensor([ours[name] for name in classes])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert entry["top"][0]["class"] == classes[int(expected.argmax())]
    # It is the weight average that answered, not the last weights.
    assert not torch.allclose(got, reference_probs(run_dir, image, "live"), atol=1e-4)


def test_folders_and_globs_expand_sorted(cli: Cli, run_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "shots"
    folder.mkdir()
    b, a = save(folder / "b.jpg", (40, 40), "RGB"), save(folder / "a.PNG", (32, 32), "RGB")
    (folder / "readme.txt").write_text("skipped: not an image extension")
    (folder / "nested").mkdir()
    other = tmp_path / "more"
    other.mkdir()
    z, y = save(other / "z.png", (32, 32), "L"), save(other / "y.png", (32, 32), "L")
    save(other / "x.bmp", (32, 32), "RGB")
    # b.jpg is named twice (by the folder and by itself): classified once.
    args = (folder, f"{other}/*.png", folder / "b.jpg", "--top-k", "1")
    result, entries = predict_json(cli, run_dir, *args)
    assert result.exit_code == 0, result.output
    assert [e["path"] for e in entries] == [str(p) for p in (a, b, y, z)]
    assert all(len(e["top"]) == 1 for e in entries)
    # A quoted "~/..." reaches the program unexpanded by the shell: it expands it.
    home = {"HOME": str(tmp_path)}
    result = cli("predict", "--checkpoint", run_dir, "--json", "~/more/*.png", env=home)
    assert [e["path"] for e in json.loads(result.stdout)] == [str(y), str(z)]


def test_human_output(cli: Cli, run_dir: Path, tmp_path: Path) -> None:
    image = save(tmp_path / "photo.png", (50, 30), "RGB")
    result = cli("predict", image, "--checkpoint", run_dir, "--top-k", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    # The tiny run keeps a weight average and scores its images as given (smoke.yaml).
    assert lines[0] == "scoring: the weight average, 1 view per image (as given)"
    assert lines[1] == f"{image}  (resized 50×30 to 32×32)"
    assert lines[2].startswith("  1. ") and lines[3].startswith("  2. ") and len(lines) == 4
    assert lines[2].endswith("%")


def test_a_folder_of_the_test_images_scores_what_evaluate_reports(cli: Cli, tmp_path: Path):
    """predict scores as evaluation does (weight average, 6 views): the run's own test
    images, saved as PNG files, get exactly the accuracy `evaluate` reports."""
    sets = ["data.train_size=256", "data.test_size=96", "train.ema_decay=0.9",
            "train.eval_flip=true", "train.eval_shift=2", "train.amp=false"]  # fmt: skip
    flags = [flag for item in sets for flag in ("--set", item)]
    trained = cli("train", "-c", SMOKE, "--epochs", "1", "--logdir", tmp_path, "--run-name",
                  "views", "-q", *flags)  # fmt: skip
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "views"
    test = load_dataset(resolve_config(SMOKE, {}, sets).data).test
    folder = tmp_path / "test-images"
    folder.mkdir()
    for i, image in enumerate(test.images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    result, entries = predict_json(cli, run, folder, "--top-k", "1")
    assert result.exit_code == 0, result.output
    assert {(e["weights"], e["views"]) for e in entries} == {("average", 6)}
    classes = load_checkpoint(run)["classes"]
    labels = test.labels.tolist()
    hits = [classes.index(e["top"][0]["class"]) == y for e, y in zip(entries, labels, strict=True)]
    scored = json.loads(cli("evaluate", "--checkpoint", run, "--json").stdout)
    assert (scored["weights"], scored["views"]) == ("average", 6)
    assert sum(hits) / len(hits) == scored["results"]["test"]["accuracy"]
    single = predict_json(cli, run, folder, "--top-k", "1", "--single-view")[1]
    assert {e["views"] for e in single} == {1}
    assert [e["top"] for e in single] != [e["top"] for e in entries]  # the views do count


def test_nothing_matched_and_bad_top_k(cli: Cli, run_dir: Path, tmp_path: Path) -> None:
    missing = cli("predict", tmp_path / "nope.png", f"{tmp_path}/*.jpg", "--checkpoint", run_dir)
    assert missing.exit_code == 2
    assert missing.stderr.startswith("error: no image found in ")
    image = save(tmp_path / "ok.png", (32, 32), "RGB")
    for k in ("0", "11"):
        bad = cli("predict", image, "--checkpoint", run_dir, "--top-k", k)
        assert bad.exit_code == 2
        assert (
            bad.stderr == f"error: --top-k must be between 1 and 10 (the run's classes), got {k}\n"
        )
    # A missing file beside a good one: an entry of its own, exit 1.
    result, entries = predict_json(cli, run_dir, image, tmp_path / "gone.png")
    assert result.exit_code == 1
    assert entries[1] == {"path": str(tmp_path / "gone.png"), "error": "no such file or directory"}


def test_a_16_bit_picture_reads_as_its_8_bit_twin(cli: Cli, run_dir: Path, tmp_path: Path):
    """PIL's own conversion clips 16-bit values at 255 (a white picture); the range is kept."""
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    deep = tmp_path / "deep.png"
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(deep)
    flat = tmp_path / "flat.png"
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(flat)
    white = save(tmp_path / "white.png", (32, 32), "L")
    Image.new("L", (32, 32), 255).save(white)
    floats = tmp_path / "floats.tiff"  # 32-bit float greyscale in 0..1
    Image.fromarray(ramp.astype(np.float32), "F").save(floats)
    result, entries = predict_json(cli, run_dir, deep, flat, white, floats, "--top-k", "10")
    assert result.exit_code == 0, result.output
    assert entries[0]["notes"][0].startswith("converted I")  # I;16 or I, by Pillow version
    assert entries[3]["notes"][0] == "converted F to RGB"
    probs = [{t["class"]: t["prob"] for t in e["top"]} for e in entries]
    for twin in (0, 3):
        assert all(probs[twin][c] == pytest.approx(probs[1][c], abs=1e-3) for c in probs[1])
    assert any(abs(probs[0][c] - probs[2][c]) > 1e-3 for c in probs[2])  # not the white one


def test_a_three_class_run_shares_probability_among_its_classes(
    cli: Cli, few_run: Path, tmp_path: Path
) -> None:
    """Its other seven outputs were never trained: they get no class name and no share."""
    image = save(tmp_path / "shot.png", (32, 32), "RGB", seed=4)
    result, (entry,) = predict_json(cli, few_run, image, "--top-k", "3")
    assert result.exit_code == 0, result.output
    ours = {t["class"]: t["prob"] for t in entry["top"]}
    assert sorted(ours) == FEW
    payload = load_checkpoint(few_run)
    model = build_model(ModelConfig(channels_last=False)).eval()
    model.load_state_dict(payload["model"])
    x = torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():  # smoke.yaml: no normalisation, no weight average, one view
        expected = torch.softmax(model(x)[0, :3], dim=0)
    got = torch.tensor([ours[name] for name in FEW])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    too_many = cli("predict", image, "--checkpoint", few_run, "--top-k", "4")
    assert too_many.exit_code == 2
    assert too_many.stderr == "error: --top-k must be between 1 and 3 (the run's classes), got 4\n"


def test_tiff_files_in_a_folder_are_classified(cli: Cli, run_dir: Path, tmp_path: Path) -> None:
    """A .tif named on its own always worked; a folder scan skipped it."""
    shots = tmp_path / "shots"
    shots.mkdir()
    paths = [save(shots / name, (32, 32), "RGB", seed=i)
             for i, name in enumerate(["a.png", "b.tif", "c.TIFF"])]  # fmt: skip
    result, entries = predict_json(cli, run_dir, shots, "--top-k", "1")
    assert result.exit_code == 0, result.output
    assert [e["path"] for e in entries] == [str(p) for p in paths]
    direct = predict_json(cli, run_dir, paths[1], "--top-k", "1")[1]
    assert direct[0]["top"] == entries[1]["top"]

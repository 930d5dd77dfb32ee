"""`cifar-bp evaluate`: the confusion matrix beside the accuracy, in JSON and in the terminal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import SMOKE, Cli, only_run, scalars

CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("eval")
    # --no-amp: float32, as evaluate scores, so the logged accuracy is the same number.
    args = ["train", "--config", SMOKE, "--logdir", logdir, "--epochs", "1",
            "--set", "data.train_size=256", "--set", "data.test_size=200",
            "--set", "data.val_size=64", "--no-amp", "-q"]  # fmt: skip
    result = Cli()(*args)
    assert result.exit_code == 0, result.stderr
    return only_run(logdir)


def test_json_confusion_matrix_explains_the_accuracy(cli, run_dir):
    result = cli("evaluate", "--checkpoint", run_dir, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["results"]) == {"val", "test"}
    logged = scalars(run_dir)
    for split, counts in (("val", 64), ("test", 200)):
        scores = report["results"][split]
        matrix = np.array(scores["confusion_matrix"])
        assert matrix.shape == (10, 10) and matrix.sum() == scores["count"] == counts
        assert np.trace(matrix) / matrix.sum() == pytest.approx(scores["accuracy"])
        # Rows are the true class: each row's diagonal share is that class's accuracy.
        for c, accuracy in enumerate(scores["per_class"]):
            if accuracy is not None:
                assert matrix[c, c] / matrix[c].sum() == pytest.approx(accuracy)
        # The same weights on the same split as the run's last evaluation.
        assert scores["accuracy"] == pytest.approx(logged[f"{split}/accuracy"][-1][1])
    assert list(report["results"]["test"]) == [
        "loss", "accuracy", "confusion_matrix", "per_class", "count"
    ]  # fmt: skip


def table_rows(text: str, title: str) -> list[list[str]]:
    """The body cells of the rich box table under `title`, row by row."""
    lines = text[text.index(title) :].splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("└"))
    return [[c.strip() for c in line.strip("│").split("│")] for line in lines[:end]
            if line.startswith("│")]  # fmt: skip


def confusion_of(text: str, split: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the borderless confusion table (cells split on spaces)."""
    lines = text[text.index(f"{split} confusion matrix") :].splitlines()[1:]
    header = next(line.split() for line in lines if line.split())
    rule = next(i for i, line in enumerate(lines) if line.strip().startswith("─"))
    body = [line.split() for line in lines[rule + 1 :]]
    return header, body[: next((i for i, r in enumerate(body) if not r), len(body))]


def test_terminal_shows_the_per_class_and_confusion_tables(cli, run_dir):
    result = cli("evaluate", "--checkpoint", run_dir)
    assert result.exit_code == 0, result.stderr
    report = json.loads(cli("evaluate", "--checkpoint", run_dir, "--json").stdout)["results"]
    matrix = report["test"]["confusion_matrix"]
    header, confusion = confusion_of(result.stdout, "test")
    assert header == ["true"] + [c[:5] for c in CLASSES]
    assert [row[0] for row in confusion] == CLASSES
    for c, row in enumerate(confusion):
        # Empty cells read "."; the diagonal always shows its count, 0 included.
        assert row[1:] == [str(n) if n or j == c else "." for j, n in enumerate(matrix[c])]
    per_class = table_rows(result.stdout, "test accuracy per class")
    for c, (name, images, correct, accuracy) in enumerate(per_class):
        assert (name, int(images), int(correct)) == (CLASSES[c], sum(matrix[c]), matrix[c][c])
        expected = report["test"]["per_class"][c]
        assert accuracy == ("-" if expected is None else f"{expected:.4f}")


def write_folder(root, classes, per_class):
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


@pytest.mark.slow
def test_a_three_class_folder_evaluates_with_its_own_class_names(cli, tmp_path):
    write_folder(tmp_path / "data", ["cat", "dog", "fox"], per_class=8)
    result = cli("train", "--config", SMOKE, "--set", "data.source=folder",
                 "--set", f"data.root={tmp_path / 'data'}", "--set", "train.batch_size=8",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", "--logdir", tmp_path / "runs",
                 "--epochs", "1", "-q")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    run_dir = only_run(tmp_path / "runs")
    shown = cli("evaluate", "--checkpoint", run_dir)
    assert shown.exit_code == 0, shown.stderr
    report = json.loads(cli("evaluate", "--checkpoint", run_dir, "--json").stdout)
    matrix = np.array(report["results"]["test"]["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 12 and matrix[3:].sum() == 0
    per_class = table_rows(shown.stdout, "test accuracy per class")
    assert [row[0] for row in per_class] == ["cat", "dog", "fox"]
    assert [int(row[1]) for row in per_class] == [4, 4, 4]
    # Columns: the three classes, then any other output something was predicted as.
    header, rows = confusion_of(shown.stdout, "test")
    assert header == ["true", "cat", "dog", "fox"] + [f"#{j}" for j in range(3, 10)
                                                      if matrix[:, j].any()]  # fmt: skip
    assert [row[0] for row in rows] == ["cat", "dog", "fox"]
    shown_total = sum(int(cell) for row in rows for cell in row[1:] if cell != ".")
    assert shown_total == 12


def write_images(folder, images, labels) -> None:
    """The images as PNG files in `folder/<class name>/`."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / CLASSES[label] / f"{i}.png")


@pytest.mark.parametrize("layout", ["plain", "test", "train-only"])
def test_another_folder_is_labelled_by_the_checkpoints_class_names(cli, run_dir, tmp_path, layout):
    """The run's own test images of three classes, as a folder: the folder's sorted names
    (cat, dog, ship) must not become labels 0, 1, 2, and the run's data.val_size=64 must
    not ask this folder for a training split."""
    from cifar_bp.checkpoint import config_of, load_checkpoint
    from cifar_bp.config import resolve_config
    from cifar_bp.data import load_dataset

    payload = load_checkpoint(run_dir)
    test = load_dataset(resolve_config(None, base=config_of(payload, run_dir)).data).test
    keep = [i for i, y in enumerate(test.labels.tolist()) if y in (3, 5, 8)]
    root = tmp_path / "photos"
    sub = {"plain": root, "test": root / "test", "train-only": root / "train"}[layout]
    write_images(sub, test.images[keep], test.labels[keep].tolist())
    if layout == "test":  # enough training images for data.val_size=64: not scored
        write_images(root / "train", test.images[keep * 2], test.labels[keep * 2].tolist())
    result = cli("evaluate", "--checkpoint", run_dir, "--json", "--set", "data.source=folder",
                 "--set", f"data.root={root}",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["classes"] == CLASSES and report["scored_folder"] == str(sub)
    own = json.loads(cli("evaluate", "--checkpoint", run_dir, "--json").stdout)
    own_matrix = np.array(own["results"]["test"]["confusion_matrix"])
    (split,) = report["results"]
    matrix = np.array(report["results"][split]["confusion_matrix"])
    # Every image scored under its true class: exactly the run's own rows for those classes.
    assert np.array_equal(matrix[[3, 5, 8]], own_matrix[[3, 5, 8]])
    assert matrix.sum() == len(keep) and matrix[[0, 1, 2, 4, 6, 7, 9]].sum() == 0
    hits = sum(own_matrix[c, c] for c in (3, 5, 8))
    assert report["results"][split]["accuracy"] == pytest.approx(hits / len(keep))
    assert report["results"][split]["accuracy"] > 0
    shown = cli(
        "evaluate",
        "--checkpoint",
        run_dir,
        "--set",
        "data.source=folder",
        "--set",
        f"data.root={root}",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    assert f"images: {sub}, labelled by the run's class names" in shown.stdout  # fmt: skip


def test_a_class_the_checkpoint_does_not_know_is_one_line(cli, run_dir, tmp_path):
    for name in ("cat", "zebra"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "photos" / name / "a.png")
    result = cli("evaluate", "--checkpoint", run_dir, "--set", "data.source=folder",
                 "--set", f"data.root={tmp_path / 'photos'}",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {tmp_path / 'photos'} has class folders the checkpoint does not know: zebra "
        f"(its classes: {', '.join(CLASSES)})\n"
    )


def test_another_folder_honours_an_explicit_test_size(cli, run_dir, tmp_path):
    rng = np.random.default_rng(1)
    for name in ("cat", "ship"):
        for i in range(6):
            (tmp_path / "photos" / name).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "photos" / name / f"{i}.png")
    sets = ["data.source=folder", f"data.root={tmp_path / 'photos'}",
            f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    flags = [flag for item in sets for flag in ("--set", item)]
    whole = json.loads(cli("evaluate", "--checkpoint", run_dir, "--json", *flags).stdout)
    # The run's data.test_size=200 was about its own data; an explicit one still applies.
    assert whole["results"]["test"]["count"] == 12
    part = cli("evaluate", "--checkpoint", run_dir, "--json", *flags, "--set", "data.test_size=4")
    matrix = np.array(json.loads(part.stdout)["results"]["test"]["confusion_matrix"])
    assert matrix.sum() == 4 and matrix[3].sum() == matrix[8].sum() == 2  # interleaved classes


def test_a_float16_gpu_run_is_scored_on_a_cpu(cli, run_dir, tmp_path):
    """A run trained with float16 autocast on CUDA: the CPU has no float16 autocast, so it
    is scored as `auto` picks there, with the same numbers as the float32 run it was."""
    import torch

    payload = torch.load(run_dir / "last.pt", weights_only=True)
    train = payload["config"]["train"]
    train.update(device="cuda", amp=True, amp_dtype="float16", grad_scaler=True)
    torch.save(payload, tmp_path / "gpu.pt")
    theirs = cli("evaluate", "--checkpoint", tmp_path / "gpu.pt", "--device", "cpu", "--json",
                 "--set", "train.eval_flip=false")  # fmt: skip
    assert theirs.exit_code == 0, theirs.stderr
    ours = cli("evaluate", "--checkpoint", run_dir / "last.pt", "--json",
               "--set", "train.eval_flip=false")  # fmt: skip
    got, want = (json.loads(r.stdout)["results"]["test"] for r in (theirs, ours))
    assert got["count"] == want["count"] == 200
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=0.02)

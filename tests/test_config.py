"""The config error matrix: every bad input is exit 2, one clear line, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cifar_bp.config import DEFAULT_CONFIG, Config, resolve_config
from tests.helpers import ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


BAD_FILES = [
    ("data:\n  sourc: synthetic\n", "unknown key 'data.sourc'"),
    ("train:\n  batch_size: abc\n", "train.batch_size: must be a valid integer"),
    ("train:\n  batch_size: 0\n", "train.batch_size: must be greater than or equal to 1"),
    ("optim:\n  lr: -1\n", "optim.lr: must be greater than 0"),
    ("loss:\n  name: hinge\n", "loss.name: must be 'ce', 'mse' or 'l1'"),
    ("loss:\n  reduction: avg\n", "loss.reduction: must be 'mean', 'sum' or 'none'"),
    ("train:\n  device: tpu\n", "device must be auto, cpu, cuda or cuda:N"),
    ("optim:\n  name: lion\n", "optim.name: must be 'sgd', 'adam', 'adamw' or 'muon'"),
    ("train:\n  epochs: [1\n", "malformed YAML at line"),
    ("optim: {lr: 0.1\n", "malformed YAML at line"),
    ("- just\n- a list\n", "expected a mapping"),
    ("bogus:\n  x: 1\n", "unknown key 'bogus'"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_bad_config_file_is_one_clear_line(cli, tmp_path, text, message):
    path = write(tmp_path, text)
    result = cli("config", "show", "--config", path)
    assert result.exit_code == 2
    assert message in result.stderr
    assert str(path) in result.stderr  # names the file
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loss", "hinge"], "--loss: loss.name: must be 'ce', 'mse' or 'l1'"),
        (["--reduction", "avg"], "--reduction: loss.reduction"),
        (["--device", "gpu"], "--device: train.device"),
        (["--batch-size", "0"], "--batch-size: train.batch_size"),
        (["--lr", "-1"], "--lr: optim.lr: must be greater than 0"),
        (["--set", "optim.name=lion"], "--set optim.name=lion: optim.name"),
        (["--set", "nokey"], "expected section.key=value"),
        (["--set", "train.batchsize=3"], "unknown key 'train.batchsize'"),
        (["--config", "missing.yaml"], "missing.yaml: config file not found"),
    ],
)
def test_bad_flags_name_their_origin(cli, args, message):
    result = cli("config", "show", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_train_rejects_reduction_none(cli, tmp_path):
    result = cli("train", "--config", ROOT / "configs/smoke.yaml", "--reduction", "none",
                 "--logdir", tmp_path)  # fmt: skip
    assert result.exit_code == 2
    assert "backward() needs a scalar" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_resolution_order_file_then_flags_then_set():
    cfg = resolve_config(
        ROOT / "configs/smoke.yaml", {"lr": 0.5, "loss": "mse"}, ["optim.lr=0.25", "train.amp=true"]
    )
    assert cfg.data.source == "synthetic"  # from the file
    assert cfg.loss.name == "mse"  # from a flag
    assert cfg.optim.lr == 0.25  # --set wins over --lr
    assert cfg.train.amp is True


def test_config_show_prints_resolved_yaml(cli):
    result = cli("config", "show", "--config", ROOT / "configs/smoke.yaml", "--epochs", "7")
    assert result.exit_code == 0
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["epochs"] == 7
    assert shown["data"]["source"] == "synthetic"
    assert Config.model_validate(shown).train.epochs == 7


def test_default_yaml_is_the_schema_default():
    """Without --config the tool reads configs/default.yaml; the schema agrees with it."""
    assert yaml.safe_load(DEFAULT_CONFIG.read_text()) == Config().model_dump(mode="json")
    assert resolve_config(None) == Config()


@pytest.mark.parametrize("name", ["default", "article", "smoke", "mse", "l1"])
def test_shipped_configs_validate(name):
    cfg = resolve_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.loss.reduction in {"mean", "sum"}


def test_article_is_the_tutorial_recipe():
    cfg = resolve_config(ROOT / "configs/article.yaml")
    assert (cfg.loss.name, cfg.optim.name, cfg.optim.lr, cfg.train.batch_size) == (
        "ce",
        "sgd",
        0.01,
        64,
    )
    assert cfg.optim.momentum == 0 and cfg.optim.scheduler == "none"
    assert cfg.data.normalize is False and cfg.data.augment is None
    assert cfg.train.epochs == 10
    # Nothing from default.yaml's stronger recipe may leak in through the schema defaults.
    assert cfg.loss.label_smoothing == 0 and cfg.optim.weight_decay == 0
    assert cfg.optim.grad_clip is None and cfg.train.eval_flip is False
    # The one addition is to scoring, not training: a weight average is evaluated.
    assert cfg.train.ema_decay == 0.999


def test_loss_overlays_are_the_default_recipe_with_another_loss():
    """configs/mse.yaml and l1.yaml only say what differs; everything else is default.yaml."""
    default = resolve_config(None).model_dump()
    for name in ["mse", "l1"]:
        path = ROOT / "configs" / f"{name}.yaml"
        assert yaml.safe_load(path.read_text())["extends"] == "default.yaml"
        overlay = resolve_config(path).model_dump()
        assert overlay["loss"] == {**default["loss"], "name": name, "label_smoothing": 0.0}
        assert {k: v for k, v in overlay.items() if k != "loss"} == {
            k: v for k, v in default.items() if k != "loss"
        }


def test_quick_is_the_default_recipe_with_a_smaller_budget():
    """The recipe is written once: quick.yaml names only its budget."""
    path = ROOT / "configs" / "quick.yaml"
    assert yaml.safe_load(path.read_text())["extends"] == "default.yaml"
    default, quick = resolve_config(None).model_dump(), resolve_config(path).model_dump()
    changed = {(s, k): v for s in quick for k, v in quick[s].items() if default[s][k] != v}
    assert changed == {
        ("optim", "lr"): 0.0015, ("train", "epochs"): 4, ("train", "batch_size"): 64,
        ("train", "eval_shift"): 0, ("train", "ema_decay"): None,
    }  # fmt: skip


def test_extends_chains_deep_merge_relative_to_each_file(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "data:\n  source: synthetic\n  train_size: 100\n  augment: {crop_padding: 4}\n"
        "optim:\n  name: sgd\n  lr: 0.5\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("extends: ../base.yaml\noptim:\n  lr: 0.25\n")
    top = tmp_path / "sub" / "top.yaml"
    top.write_text("extends: mid.yaml\ndata:\n  augment: null\n  test_size: 10\n")
    cfg = resolve_config(top, {"epochs": 2}, ["optim.momentum=0.5"])
    assert (cfg.data.source, cfg.data.train_size, cfg.data.test_size) == ("synthetic", 100, 10)
    assert cfg.data.augment is None  # an overlay's null replaces the base's section
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.25, 0.5)
    assert cfg.train.epochs == 2
    # The base's other defaults come from the schema, as for any file without extends.
    assert cfg.loss == Config().loss


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("optim.lr=1e-3", "optim.lr", 0.001),  # YAML 1.2 reads 1e-3 as a number
        ("optim.lr=1", "optim.lr", 1.0),  # an int is a fine float
        ("optim.betas=[0, 0.5]", "optim.betas", (0.0, 0.5)),
        ("loss.weight=[0, 1, 1, 1, 1, 1, 1, 1, 1, 1]", "loss.weight", [0.0] + [1.0] * 9),
        ("train.init_scale=3e38", "train.init_scale", 3e38),
        ("data.augment=null", "data.augment", None),
        ("train.amp=false", "train.amp", False),
        ("log.run_name=2024", "log.run_name", "2024"),  # digits are a name, as with --run-name
        ("data.root=2024", "data.root", "2024"),
        ("log.run_name=007", "log.run_name", "007"),  # as typed, not YAML's number 7
        ("data.cache_dir=0x1F", "data.cache_dir", "0x1F"),
        # The shell expands no `~` after "data.root=": the config does, as a shell would.
        ("data.root=~/photos", "data.root", str(Path.home() / "photos")),
        # Adam and AdamW use no momentum, so nesterov's need for one does not apply to them.
        ("optim.momentum=0", "optim.momentum", 0.0),
    ],
)
def test_sensible_values_stay_accepted(item, key, value):
    cfg = resolve_config(ROOT / "configs/smoke.yaml", {}, [item])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value

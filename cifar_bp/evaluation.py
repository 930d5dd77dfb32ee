"""`cifar-bp evaluate`: score a checkpoint on its own data or on other data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cifar_bp.checkpoint import (
    config_of,
    facts_of,
    load_checkpoint,
    load_model_state,
    weights_of,
)
from cifar_bp.cifar10 import CLASSES
from cifar_bp.config import Config, DataConfig, read_yaml, resolve_config
from cifar_bp.config_files import shown
from cifar_bp.engine import EvalResult, Scoring, evaluate
from cifar_bp.errors import UsageError
from cifar_bp.hardware import resolve_device, scoring_precision
from cifar_bp.losses import build_loss
from cifar_bp.model import build_model

if TYPE_CHECKING:
    from cifar_bp.data import Split

# Only these may differ from the checkpoint's config: the model is the checkpoint's.
EVAL_KEYS = (
    "data.",
    "train.eval_batch_size",
    "train.eval_flip",
    "train.eval_shift",
    "train.device",
)
SUBSET_KEYS = ("train_size", "test_size", "val_size")


@dataclass
class Evaluation:
    checkpoint: Path
    classes: list[str]
    results: dict[str, EvalResult]
    scoring: Scoring
    scored_folder: Path | None = None  # the images scored, when not the run's own data

    def as_dict(self) -> dict[str, Any]:
        folder = {} if self.scored_folder is None else {"scored_folder": str(self.scored_folder)}
        return {
            "checkpoint": str(self.checkpoint),
            "classes": self.classes,
            **folder,
            **self.scoring.as_dict(),
            "results": {split: split_dict(r) for split, r in self.results.items()},
        }


def split_dict(result: EvalResult) -> dict[str, Any]:
    """One split for --json: the confusion matrix (rows = true class, one column per network
    output) sits beside the accuracy it explains: its diagonal over its total."""
    return {
        "loss": result.loss,
        "accuracy": result.accuracy,
        "confusion_matrix": result.confusion,
        "per_class": result.per_class,
        "count": result.count,
    }


def eval_config(
    payload: dict[str, Any],
    path: Path,
    config_path: Path | None,
    sets: list[str],
    device: str | None = None,
) -> Config:
    """The checkpoint's config (a damaged one is the file's fault: exit 1), with the data of
    `config_path`, `--device` and the --set items (a mistake there is the user's: exit 2)."""
    base = config_of(payload, path)
    # The checkpoint's own config is valid, so whatever else is wrong came from the command.
    origin = "the checkpoint's config"
    if config_path is not None:
        data = read_yaml(config_path).get("data", {})
        if not isinstance(data, dict):
            raise UsageError(f"{config_path}: data: must be a mapping of keys (got {shown(data)})")
        base, origin = {**base, "data": data}, str(config_path)
    for item in sets:
        if not item.split("=", 1)[0].strip().startswith(EVAL_KEYS):
            raise UsageError(
                f"--set {item}: evaluate takes only data.*, train.eval_flip, train.eval_shift "
                "and train.device"
            )
    flags = {"device": device}
    cfg = resolve_config(None, flags, sets, base=base, base_origin=origin)
    if config_path is None and is_other_folder(cfg.data, base.get("data", {})):
        # The run's subset sizes and validation split were about its own data; another
        # folder is scored whole unless --set says otherwise.
        own = {k: v for k, v in base.get("data", {}).items() if k not in SUBSET_KEYS}
        cfg = resolve_config(None, flags, sets, base={**base, "data": own}, base_origin=origin)
    return cfg


def is_other_folder(data: DataConfig, run_data: dict[str, Any]) -> bool:
    """A folder source that is not the one the run trained on."""
    if data.source != "folder":
        return False
    if run_data.get("source") != "folder":
        return True
    return _resolved(data.root) != _resolved(str(run_data.get("root", "")))


def _resolved(root: str) -> Path:
    return Path(root).expanduser().resolve()


def evaluate_checkpoint(
    path: Path, config_path: Path | None, sets: list[str], device: str | None
) -> Evaluation:
    from cifar_bp.data import DeviceLoader

    payload = load_checkpoint(path)
    cfg = eval_config(payload, path, config_path, sets, device)
    dev = resolve_device(cfg.train.device)
    model = build_model(cfg.model, dev)
    # A run that kept a weight average reported the average's accuracy: score the same.
    load_model_state(model, weights_of(payload), path)
    classes, splits, scored = splits_to_score(cfg, payload, path)
    loss_fn = build_loss(cfg.loss).to(dev)
    # The precision the run trained and evaluated with, so the figures match its logs.
    precision = scoring_precision(cfg.train, dev)
    results = {}
    t = cfg.train
    for name, split in splits.items():
        loader = DeviceLoader(split, cfg.data, t.eval_batch_size, dev, train=False,
                              channels_last=cfg.model.channels_last)  # fmt: skip
        results[name] = evaluate(
            model, loss_fn, loader.epoch(0), precision, t.eval_flip, t.eval_shift
        )
    scoring = Scoring(facts_of(payload).averaged, t.eval_flip, t.eval_shift)
    return Evaluation(path, list(classes), results, scoring, scored)


def splits_to_score(
    cfg: Config, payload: dict[str, Any], path: Path
) -> tuple[tuple[str, ...], dict[str, Split], Path | None]:
    """The class names, the splits by name, and the folder scored when it is not the run's
    own data. Another folder's labels are the checkpoint's indices of its class names."""
    from cifar_bp.data import Split, load_dataset

    if is_other_folder(cfg.data, config_of(payload, path).get("data", {})):
        from cifar_bp.folder import load_to_score

        classes = facts_of(payload).classes or CLASSES
        (images, labels), folder = load_to_score(cfg.data, classes)
        size = min(len(labels), cfg.data.test_size or len(labels))
        split = Split(torch.from_numpy(images[:size]), torch.from_numpy(labels[:size]))
        return classes, {"test": split}, folder
    data = load_dataset(cfg.data, cfg.train.seed)
    splits = {name: s for name, s in (("val", data.val), ("test", data.test)) if s is not None}
    return data.classes, splits, None

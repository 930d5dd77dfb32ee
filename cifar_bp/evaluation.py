"""`cifar-bp evaluate`: score a checkpoint on its own data or on other data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_bp.checkpoint import config_of, load_checkpoint, load_model_state, weights_of
from cifar_bp.config import Config, read_yaml, resolve_config
from cifar_bp.engine import EvalResult, Scoring, evaluate
from cifar_bp.errors import UsageError
from cifar_bp.hardware import resolve_device, resolve_precision
from cifar_bp.losses import build_loss
from cifar_bp.model import build_model

# Only these may differ from the checkpoint's config: the model is the checkpoint's.
EVAL_KEYS = (
    "data.",
    "train.eval_batch_size",
    "train.eval_flip",
    "train.eval_shift",
    "train.device",
)


@dataclass
class Evaluation:
    checkpoint: Path
    classes: list[str]
    results: dict[str, EvalResult]
    scoring: Scoring

    def as_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "classes": self.classes,
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
    payload: dict[str, Any], path: Path, config_path: Path | None, sets: list[str]
) -> Config:
    base = config_of(payload, path)
    if config_path is not None:
        base = {**base, "data": read_yaml(config_path).get("data", {})}
    for item in sets:
        if not item.split("=", 1)[0].strip().startswith(EVAL_KEYS):
            raise UsageError(
                f"--set {item}: evaluate takes only data.*, train.eval_flip, train.eval_shift "
                "and train.device"
            )
    return resolve_config(None, {}, sets, base=base)


def evaluate_checkpoint(
    path: Path, config_path: Path | None, sets: list[str], device: str | None
) -> Evaluation:
    from cifar_bp.data import DeviceLoader, load_dataset

    payload = load_checkpoint(path)
    cfg = eval_config(
        payload, path, config_path, sets + ([f"train.device={device}"] if device else [])
    )
    dev = resolve_device(cfg.train.device)
    model = build_model(cfg.model, dev)
    # A run that kept a weight average reported the average's accuracy: score the same.
    load_model_state(model, weights_of(payload), path)
    data = load_dataset(cfg.data, cfg.train.seed)
    loss_fn = build_loss(cfg.loss).to(dev)
    # The precision the run trained and evaluated with, so the figures match its logs.
    precision = resolve_precision(cfg.train, dev)
    results = {}
    t = cfg.train
    for name, split in (("val", data.val), ("test", data.test)):
        if split is not None:
            loader = DeviceLoader(split, cfg.data, t.eval_batch_size, dev, train=False,
                                  channels_last=cfg.model.channels_last)  # fmt: skip
            results[name] = evaluate(
                model, loss_fn, loader.epoch(0), precision, t.eval_flip, t.eval_shift
            )
    scoring = Scoring(bool(payload.get("average")), t.eval_flip, t.eval_shift)
    return Evaluation(path, list(data.classes), results, scoring)

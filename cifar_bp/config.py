"""The one typed config: defaults, then a YAML file, then CLI flags, then `--set` overrides.

It is resolved once, validated once, and passed around as a `Config` object. Every
mistake becomes a `UsageError` naming the file, the key path and what would be accepted.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cifar_bp.errors import UsageError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"

# CIFAR-10 training-set channel statistics (on the 0..1 scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class _Section(BaseModel):
    # Unknown keys are errors: a typo must never be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Section):
    crop_padding: int = Field(2, ge=0, le=16, description="pixels of padding for random crops")
    pad_mode: Literal["reflect", "zero"] = "reflect"
    flip: bool = True


class DataConfig(_Section):
    source: Literal["cifar10", "folder", "synthetic"] = "cifar10"
    root: str = "data"
    download: bool = True
    cache_dir: str = "data/.cache"
    # synthetic: the sizes to generate; cifar10/folder: an optional subset (None = all).
    train_size: int | None = Field(None, ge=1)
    test_size: int | None = Field(None, ge=1)
    val_size: int = Field(0, ge=0, description="training images held out for validation")
    normalize: bool = True
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    augment: AugmentConfig | None = AugmentConfig()

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError("every std must be > 0")
        return std


class ModelConfig(_Section):
    # "none" is the tutorial's network; "relu" is a labelled variant that goes beyond it.
    activation: Literal["none", "relu"] = "none"
    channels_last: bool = True


class LossConfig(_Section):
    name: Literal["ce", "mse", "l1"] = "ce"
    reduction: Literal["mean", "sum", "none"] = "mean"
    # mse/l1 compare one-hot targets with softmax probabilities, or with the raw logits.
    input: Literal["probs", "logits"] = "probs"
    weight: list[float] | None = None
    ignore_index: int = -100
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)

    @field_validator("weight")
    @classmethod
    def _ten_weights(cls, weight: list[float] | None) -> list[float] | None:
        if weight is not None and (len(weight) != 10 or min(weight) < 0):
            raise ValueError("weight needs 10 non-negative numbers, one per class")
        return weight


class OptimConfig(_Section):
    # muon: Muon for weight matrices and conv filters, Adam for biases and the classifier.
    name: Literal["sgd", "adam", "adamw", "muon"] = "muon"
    lr: float = Field(0.0015, gt=0, description="peak learning rate")
    momentum: float = Field(0.95, ge=0, lt=1, description="SGD and Muon")
    nesterov: bool = True
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["none", "cosine", "onecycle"] = "onecycle"
    warmup_pct: float = Field(0.2, gt=0, lt=1, description="onecycle: fraction spent warming up")
    grad_clip: float | None = Field(None, gt=0, description="max total L2 norm of the gradients")

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, nesterov: bool, info: Any) -> bool:
        if nesterov and info.data.get("momentum", 0) == 0:
            raise ValueError("nesterov needs momentum > 0")
        return nesterov


class TrainConfig(_Section):
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(64, ge=1, description="per process; global = processes x this")
    eval_batch_size: int = Field(1000, ge=1)
    eval_flip: bool = Field(True, description="evaluate on each image and its mirror")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="evaluate a moving average of the weights (per step)"
    )
    device: str = "auto"
    amp: bool = False
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    # auto: a GradScaler exactly when float16 autocast is on (bf16 has fp32's range).
    grad_scaler: Literal["auto"] | bool = "auto"
    init_scale: float = Field(2.0**16, gt=0)
    compile: bool = False
    seed: int = 0
    checkpoint_every_n_steps: int = Field(0, ge=0, description="0 = only at epoch ends")
    max_nonfinite_steps: int = Field(3, ge=1)

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return device


class LogConfig(_Section):
    logdir: str = "runs"
    run_name: str | None = None
    every_n_steps: int = Field(50, ge=1, description="steps between host read-backs and logs")
    grad_norms: bool = True

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        if (name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", name)) or name in {".", ".."}:
            raise ValueError("run_name may use letters, digits, '_', '.' and '-' only")
        return name


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    log: LogConfig = LogConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Named CLI flags and the key each one sets.
FLAG_KEYS = {
    "loss": "loss.name",
    "reduction": "loss.reduction",
    "device": "train.device",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "optim.lr",
    "amp": "train.amp",
    "run_name": "log.run_name",
    "logdir": "log.logdir",
    "seed": "train.seed",
}


def read_yaml(path: Path) -> dict[str, Any]:
    """Load a config file with `safe_load`; a missing or malformed file is a UsageError."""
    if not path.is_file():
        raise UsageError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise UsageError(f"{path}: malformed YAML at {where}: {err.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: malformed YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of sections (data, model, ...) at the top")
    return data


def parse_set(item: str) -> tuple[str, Any]:
    """`section.key=value`, the value read as YAML (so 0.1, true and [1, 2] get their types)."""
    key, sep, raw = item.partition("=")
    if not sep or not re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", key.strip()):
        raise UsageError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=0.05")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _assign(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def resolve_config(
    path: Path | None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults (or `base`), then the file, then named flags, then `--set` items; validated once.

    Without a file, `configs/default.yaml` is read when it is present beside the package.
    """
    tree: dict[str, Any] = copy.deepcopy(base or {})
    if path is None and base is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    origins: dict[str, str] = {}
    if path is not None:
        tree = read_yaml(path)
    for name, value in (flags or {}).items():
        if value is not None:
            _assign(tree, FLAG_KEYS[name], value)
            origins[FLAG_KEYS[name]] = "--" + name.replace("_", "-")
    for item in sets or []:
        key, value = parse_set(item)
        _assign(tree, key, value)
        origins[key] = f"--set {item}"
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise UsageError(describe_validation_error(err, path, origins)) from None


def describe_validation_error(
    err: ValidationError, path: Path | None, origins: dict[str, str]
) -> str:
    """One line: where the bad value came from, its key path, and what would be accepted."""
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    source = origins.get(key) or next(
        (origin for k, origin in origins.items() if key.startswith(k + ".")), None
    )
    where = source or (str(path) if path else "defaults")
    if first["type"] == "extra_forbidden":
        section = _section_of(key)
        known = ", ".join(section.model_fields) if section else ""
        message = f"unknown key '{key}'" + (f" (known here: {known})" if known else "")
    else:
        got = first.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        message = f"{key}: {_accepts(first['msg'])}{shown}"
    more = len(err.errors()) - 1
    return f"{where}: {message}" + (f" [and {more} more problem(s)]" if more else "")


def _accepts(msg: str) -> str:
    return msg.replace("Input should be", "must be").replace("Value error, ", "")


def _section_of(key: str) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in key.split(".")[:-1]:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model

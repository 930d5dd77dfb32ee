"""The one typed config: defaults, then a YAML file, then CLI flags, then `--set` overrides.

It is resolved once, validated once, and passed around as a `Config` object. Every
mistake becomes a `UsageError` of one line: where the value came from (the file, the
named flag or the `--set` item), the key path, what would be accepted, and what was given.
A file may start from another one with `extends: other.yaml` and change only a few keys.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Ge, Lt
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    ValidationError,
    field_validator,
)

from cifar_bp import cifar10
from cifar_bp.config_files import Origins, dotted, load_tree, parse_yaml, shown
from cifar_bp.errors import UsageError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"

# Numbers are strict: `true` is not 1 and "3" is not 3, but an int is a fine float. NaN and
# infinity are refused everywhere: one of them in lr, mean or a loss weight poisons every
# weight in the first step, and the run would only say so later.
Number = Annotated[float, Strict(), AllowInfNan(False)]
Count = Annotated[int, Strict()]
Fraction = Annotated[float, Strict(), AllowInfNan(False), Ge(0), Lt(1)]
Unit = Annotated[float, Strict(), AllowInfNan(False), Field(ge=0, le=1)]
INT32 = 2**31 - 1  # sizes and steps reach torch as 32-bit ints on some paths
# The GradScaler holds its loss multiplier in float32: a larger one cannot even be stored.
FLOAT32_MAX = 3.4028234663852886e38
NAME_MAX = 255  # bytes in one path component on Linux and macOS file systems


def _path(value: str) -> str:
    # Caught here, a too-long folder name is one line; found by os.stat, a traceback.
    if any(len(part.encode()) > NAME_MAX for part in value.split("/")):
        raise ValueError(f"has a path component longer than {NAME_MAX} bytes")
    # The shell leaves `~` alone in `--set data.root=~/photos` (and in YAML): expand it here.
    return os.path.expanduser(value)


Path_ = Annotated[str, Field(min_length=1), AfterValidator(_path)]


class _Section(BaseModel):
    # Unknown keys are errors: a typo must never be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # A NUL byte reaches os.* as a ValueError deep inside a run: refuse it here.
        if isinstance(value, str) and "\0" in value:
            raise ValueError("must not contain a NUL character")
        return value


class AugmentConfig(_Section):
    crop_padding: Count = Field(2, ge=0, le=16, description="pixels of padding for random crops")
    pad_mode: Literal["reflect", "zero"] = "reflect"
    # alternate: each image flipped on every other epoch (which ones first is seeded), so
    # any two epochs in a row show both mirror images of every picture.
    flip: Literal["alternate"] | StrictBool = True


class DataConfig(_Section):
    source: Literal["cifar10", "folder", "synthetic"] = "cifar10"
    root: Path_ = "data"
    download: StrictBool = True
    cache_dir: Path_ = "data/.cache"
    # synthetic: the sizes to generate; cifar10/folder: an optional subset (None = all).
    train_size: Count | None = Field(None, ge=1, le=INT32)
    test_size: Count | None = Field(None, ge=1, le=INT32)
    val_size: Count = Field(0, ge=0, le=INT32, description="training images held out")
    normalize: StrictBool = True
    # On the 0..1 pixel scale: 0..255-scale statistics (125.3, 63.0) are a common slip.
    mean: tuple[Unit, Unit, Unit] = cifar10.MEAN
    std: tuple[Unit, Unit, Unit] = cifar10.STD
    augment: AugmentConfig | None = AugmentConfig()

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError("every std must be > 0 (and <= 1, on the 0..1 pixel scale)")
        return std


class ModelConfig(_Section):
    # "none" is the tutorial's network; "relu" is a labelled variant that goes beyond it.
    activation: Literal["none", "relu"] = "none"
    channels_last: StrictBool = True


class LossConfig(_Section):
    name: Literal["ce", "mse", "l1"] = "ce"
    reduction: Literal["mean", "sum", "none"] = "mean"
    # mse/l1 compare one-hot targets with softmax probabilities, or with the raw logits.
    input: Literal["probs", "logits"] = "probs"
    weight: list[Number] | None = None
    ignore_index: Count = Field(-100, ge=-INT32, le=INT32)
    label_smoothing: Fraction = 0.1

    @field_validator("weight")
    @classmethod
    def _ten_weights(cls, weight: list[float] | None) -> list[float] | None:
        # All zeros makes the mean loss 0/0: NaN on the first step.
        n = cifar10.NUM_CLASSES
        if weight is not None and (len(weight) != n or min(weight) < 0 or max(weight) == 0):
            raise ValueError(f"weight needs {n} numbers >= 0, one per class, not all zero")
        return weight


class OptimConfig(_Section):
    # muon: Muon for weight matrices and conv filters, Adam for biases and the classifier.
    name: Literal["sgd", "adam", "adamw", "muon"] = "muon"
    lr: Number = Field(0.002, gt=0, description="peak learning rate")
    momentum: Fraction = Field(0.95, description="SGD and Muon")
    # Checked even when left at its default: momentum 0 alone must not reach the optimizer.
    nesterov: StrictBool = Field(True, validate_default=True)
    weight_decay: Number = Field(0.0, ge=0)
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    scheduler: Literal["none", "cosine", "onecycle"] = "onecycle"
    warmup_pct: Number = Field(0.2, gt=0, lt=1, description="onecycle: fraction warming up")
    grad_clip: Number | None = Field(None, gt=0, description="max total L2 norm of the gradients")

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, nesterov: bool, info: Any) -> bool:
        # A missing momentum already failed on its own; do not add a second, false complaint.
        # Adam and AdamW use neither momentum nor nesterov, so they are not held to it.
        uses_momentum = info.data.get("name", "sgd") in {"sgd", "muon"}
        if nesterov and uses_momentum and info.data.get("momentum", 1) == 0:
            raise ValueError("nesterov needs momentum > 0 (set optim.nesterov: false)")
        return nesterov


class TrainConfig(_Section):
    epochs: Count = Field(10, ge=1, le=1_000_000)
    batch_size: Count = Field(128, ge=1, le=INT32, description="per process; global = N x this")
    eval_batch_size: Count = Field(1000, ge=1, le=INT32)
    eval_flip: StrictBool = Field(True, description="evaluate on each image and its mirror")
    # Pixels: also score two copies of each view shifted this far diagonally (up-left and
    # down-right, reflect-padded like the training crops); 0 = off.
    eval_shift: Count = Field(2, ge=0, le=16, description="test-time shift in pixels")
    ema_decay: Number | None = Field(
        0.999, gt=0, lt=1, description="evaluate a moving average of the weights (per step)"
    )
    device: str = "auto"
    # auto: bfloat16 on GPUs that have it (else float16 + GradScaler); on the CPU bfloat16
    # only where the CPU computes it natively, else float32. true/false force it.
    amp: Literal["auto"] | StrictBool = "auto"
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    # auto: a GradScaler exactly when float16 autocast is on (bf16 has fp32's range).
    grad_scaler: Literal["auto"] | StrictBool = "auto"
    # The GradScaler's first loss multiplier, held in float32 (max about 2^128); 2^64 is far
    # above any scale that leaves float16 gradients finite.
    init_scale: Number = Field(2.0**16, gt=0)
    compile: Literal["auto"] | StrictBool = "auto"  # auto: off (measured no gain)
    deterministic: StrictBool = Field(False, description="bitwise-reproducible kernels (slower)")
    # The data order seeds torch generators with seed * 1_000_033 + step: keep it in range.
    seed: Count = Field(0, ge=0, le=2**32 - 1)
    checkpoint_every_n_steps: Count = Field(0, ge=0, description="0 = only at epoch ends")
    max_nonfinite_steps: Count = Field(3, ge=1)

    @field_validator("device", mode="before")
    @classmethod
    def _known_device(cls, device: Any) -> str:
        # Before the str check: `cuda:` reads as a YAML mapping, and deserves this message too.
        if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?", device):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return device

    @field_validator("init_scale")
    @classmethod
    def _scale_fits(cls, scale: float) -> float:
        if scale > FLOAT32_MAX:
            raise ValueError("init_scale must be at most 3.4e38 (the scaler holds it in float32)")
        return scale


class LogConfig(_Section):
    logdir: Path_ = "runs"
    # One path component: 200 leaves room under the usual 255-byte limit for suffixes.
    run_name: str | None = Field(None, max_length=200)
    every_n_steps: Count = Field(50, ge=1, description="steps between host read-backs and logs")
    grad_norms: StrictBool = True
    # Weight and gradient histograms of every parameter: every N steps, or with 0 once per
    # epoch (on its last step); histograms: false writes none.
    histograms: StrictBool = True
    histograms_every_n_steps: Count = Field(0, ge=0)

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
    """A config file as a dict, with its `extends` chain merged in; mistakes are UsageErrors."""
    return load_tree(path, [])


def parse_set(item: str) -> tuple[str, Any]:
    """`section.key=value`, the value read as YAML (so 0.1, true and [1, 2] get their types)."""
    key, sep, raw = item.partition("=")
    if not sep or not re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", key.strip()):
        raise UsageError(f"--set {_flat(item)}: expected section.key=value, e.g. optim.lr=0.05")
    try:
        where = f"--set {_flat(item)}"
        value = parse_yaml(raw, where, tuple(key.strip().split("."))) if raw.strip() else None
    except UsageError as err:
        if "malformed YAML" not in str(err):
            raise
        value = raw  # not YAML: keep the text, and let validation say what it should be
    return key.strip(), value


def _assign(tree: dict[str, Any], parts: tuple, value: Any, where: str, origins: Origins) -> None:
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            # Below a section the value there is wrong (the file's fault); below a plain
            # value, the key given with it is.
            prefix = parts[: depth + 1]
            section = _section_of(dotted((*prefix, "x"))) is not None
            blame = (_origin(prefix, origins) or where) if section else where
            what = "must be a mapping of keys" if section else "holds a value, not keys"
            raise UsageError(f"{blame}: {dotted(prefix)}: {what} (got {shown(child)})")
        node = child
    node[parts[-1]] = value


def resolve_config(
    path: Path | None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    base: dict[str, Any] | None = None,
    base_origin: str = "the checkpoint's config",
) -> Config:
    """Defaults (or `base`), then the file, then named flags, then `--set` items; validated once.

    Without a file, `configs/default.yaml` is read when it is present beside the package.
    """
    tree: dict[str, Any] = copy.deepcopy(base or {})
    if path is None and base is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    origins: Origins = []  # (key path, where it came from), later ones win
    if path is not None:
        tree = load_tree(path, origins)
    for name, value in (flags or {}).items():
        if value is not None:
            parts, where = tuple(FLAG_KEYS[name].split(".")), "--" + name.replace("_", "-")
            _assign(tree, parts, value, where, origins)
            origins.append((parts, where))
    for item in sets or []:
        key, value = parse_set(item)
        if is_text_key(key) and isinstance(value, int | float) and not isinstance(value, bool):
            # A name or path made of digits is text: `--set log.run_name=007` means "007",
            # which YAML would read as the number 7.
            value = item.partition("=")[2].strip()
        where = f"--set {_flat(item)}"
        _assign(tree, tuple(key.split(".")), value, where, origins)
        origins.append((tuple(key.split(".")), where))
    fallback = str(path) if path else (base_origin if base is not None else "defaults")
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise UsageError(describe_validation_error(err, fallback, origins)) from None


# --- One line per mistake ----------------------------------------------------------------
# A check on one key that reads another: blame whichever of them the user set last.
_RELATED = {("optim", "nesterov"): [("optim", "momentum"), ("optim", "name")]}
_UNION_TAG = re.compile(r"[a-z-]+\[.*\]|bool|int|float|str|none")


def describe_validation_error(err: ValidationError, fallback: str, origins: Origins) -> str:
    """'<where>: <key>: <what is accepted> (got X)', for the first key with a problem."""
    errors = err.errors()
    loc = _field_loc(errors[0]["loc"])
    where = _origin(loc, origins) or fallback
    key = dotted(loc)
    if errors[0]["type"] == "extra_forbidden":
        section = _section_of(key)
        known = ", ".join(section.model_fields) if section else ""
        message = f"unknown key '{key}'" + (f" (known here: {known})" if known else "")
    else:
        # A union (e.g. "auto" or a boolean) reports one error per member: join them.
        msgs = [_accepts(e["msg"]) for e in errors if _field_loc(e["loc"]) == loc]
        accepts = msgs[0] + "".join(" or " + m.removeprefix("must be ") for m in msgs[1:])
        got = errors[0].get("input")
        given = "" if isinstance(got, dict) else f" (got {shown(got)})"
        message = f"{key}: {accepts}{given}"
    more = len({_field_loc(e["loc"]) for e in errors}) - 1
    return f"{where}: {message}" + (f" [and {more} more problem(s)]" if more else "")


def _field_loc(loc: tuple) -> tuple:
    return tuple(p for p in loc if isinstance(p, int) or not _UNION_TAG.fullmatch(p))


def _origin(loc: tuple, origins: Origins) -> str | None:
    """The last source that set this key, a section above it, or a key below it."""
    names = tuple(p for p in loc if isinstance(p, str))
    targets = [names, *_RELATED.get(names, [])]
    for parts, where in reversed(origins):
        for target in targets:
            n = min(len(parts), len(target))
            if parts[:n] == target[:n]:
                return where
    return None


def _accepts(msg: str) -> str:
    msg = re.sub(r"^(Input|String|List|Tuple|Dictionary) should", "must", msg)
    # A YAML file's `run_name: 007` is the number 7 by the time we see it: ask for quotes.
    msg = msg.replace("must be a valid string", "must be text (quote a name made of digits)")
    # A section given a plain value: pydantic would name our internal class.
    msg = re.sub(r"must be a valid dictionary or instance of \w+", "must be a mapping of keys", msg)
    return msg.replace("Value error, ", "").replace("Field required", "is missing")


def _flat(text: str) -> str:
    return text.replace("\n", "\\n").replace("\r", "\\r")


def is_text_key(key: str) -> bool:
    """Whether the schema wants text at `section.key` (a name, a path, the device)."""
    section = _section_of(key)
    field = section.model_fields.get(key.rpartition(".")[2]) if section else None
    annotation = getattr(field, "annotation", None)
    return annotation is str or str in getattr(annotation, "__args__", ())


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

"""Typed run configuration: dataclasses, YAML files and ``dotted.key=value`` command-line overrides.

    cfg = load_config("configs/default.yaml", ["train.epochs=2", "data.limit=2000"])
    cfg.train.epochs            # 2
    save_config(cfg, "out/run1/config.yaml")

Unknown keys and values of the wrong type raise ``ConfigError`` naming the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml


class ConfigError(ValueError):
    """A config key or value that cannot be used."""


# the choices of the fields that have a few; apply_mapping checks them. OptimizerName: the keys of
# ifc_ds.engine.make_optimizer's registry (a test holds them equal)
OptimizerName = Literal["sgd", "lars", "adamw"]
Auto = Literal["auto", "always", "never"]


def _require(checks: list[tuple[bool, str]]) -> None:
    """Raises ``ConfigError`` with the message of the first failed check: a section's ``__post_init__``
    validates the section (at construction and once the config is loaded, ``validate``)."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


@dataclass
class ModelConfig:
    name: str = "resnet18"  # any timm model name
    small_images: bool = False  # ResNet stem for 32x32 inputs: 3x3 stride-1 conv, no max-pool
    channels_last: bool = True
    head_hidden: int = 512  # projection head: Linear-BN-ReLU-Linear
    dim: int = 128  # D, the instance-classifier feature size
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments

    def __post_init__(self):
        _require([(self.dim > 0, "model.dim must be > 0")])


@dataclass
class DataConfig:
    train: str = "sklearn:digits"  # dataset spec, see ifc_ds.data.parse_spec
    limit: int | None = None  # use the first `limit` rows only
    image_size: int = 32
    num_workers: int = -1  # -1: one per spare CPU core of this rank, at most 8
    streaming: bool = False
    num_instances: int | None = None  # optional check: N the dataset must have
    # decode a map-style dataset once into (node-shared) memory: auto (images of one size whose decoded
    # bytes fit memory_gb), always, never (decode every sample every epoch, in the workers)
    in_memory: Auto = "auto"
    memory_gb: float = 16.0  # decoded bytes allowed per node for in_memory=auto
    # decode JPEGs on the accelerator (torchvision.io.decode_jpeg on CUDA: nvJPEG); the workers then
    # only read bytes. Other formats, and any image on CPU runs, are decoded by the workers
    decode_on_device: bool = False

    def __post_init__(self):
        _require([(self.limit is None or self.limit > 0, "data.limit must be > 0"),
                  (self.memory_gb >= 0, "data.memory_gb must be >= 0")])


@dataclass
class AugmentConfig:
    scale_min: float = 0.2
    scale_max: float = 1.0
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0  # 0.5 for ImageNet-sized images; off for 32x32
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0
    eval_crop_pct: float = 0.875  # eval transform: resize to size / crop_pct, centre-crop size (1.0: no crop)
    jpeg_draft: bool = True  # decode a JPEG larger than its crop needs at a reduced size (PIL draft)

    def __post_init__(self):
        _require([(0 < self.scale_min <= self.scale_max <= 1, "augment: need 0 < scale_min <= scale_max <= 1"),
                  (0 < self.blur_sigma_min <= self.blur_sigma_max,
                   "augment: need 0 < blur_sigma_min <= blur_sigma_max"),
                  (0 <= self.hue <= 0.5, "augment.hue must be in [0, 0.5]")])


@dataclass
class ClassifierConfig:
    temperature: float = 0.1
    chunk_size: int | None = None  # memory-lean mode: score C classes at a time
    # Triton kernels that never write the [N/P, B] logits: auto (on CUDA when triton is installed),
    # always, never (the block loops; CPU runs use them under auto)
    fused: Auto = "auto"

    def __post_init__(self):
        _require([(self.temperature > 0, "classifier.temperature must be > 0")])


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128  # per rank (DeepSpeed's train_micro_batch_size_per_gpu)
    ds_config: str = "ds_configs/zero0_fp32.json"
    optimizer: OptimizerName = "sgd"
    lr: float = 0.05  # per 256 images of global batch; scaled linearly
    momentum: float = 0.9
    weight_decay: float = 5e-4
    classifier_lr_scale: float = 10.0  # the rows are visited once per epoch: they need a larger step
    classifier_weight_decay: float = 0.0
    # global gradient-norm clip of the classifier rows (norm over all shards; 0 = off): a guard against
    # spikes that never binds in the CIFAR recipe (benchmarks/README.md). The backbone's clip is the
    # ds_config's "gradient_clipping" (0 when the JSON does not set it)
    classifier_grad_clip: float = 1.0
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    log_every: int = 10
    max_steps: int | None = None  # stop early (tests, smoke runs)
    nonfinite_patience: int = 5  # consecutive non-finite losses before the run stops

    def __post_init__(self):
        _require([(self.epochs > 0, "train.epochs must be > 0"),
                  (self.batch_size >= 2, "train.batch_size must be >= 2 (batch norm needs 2 samples per rank)"),
                  (self.lr > 0, "train.lr must be > 0"),
                  (self.classifier_grad_clip >= 0, "train.classifier_grad_clip must be >= 0 (0 = off)")])


@dataclass
class RawInitConfig:
    enabled: bool = True
    mode: Literal["full", "lazy"] = "full"  # full: one pass over the data before step 1 | lazy: on first sight
    batch_size: int = 256


@dataclass
class SmoothingConfig:
    enabled: bool = True
    k: int = 5
    eps: float = 0.1
    start_epoch: float = 1.0  # off before this epoch ...
    ramp_epochs: float = 1.0  # ... then eps grows linearly to its value over this many epochs

    def __post_init__(self):
        _require([(0 <= self.eps < 1, "hooks.smoothing.eps must be in [0, 1)"),
                  (self.k >= 0, "hooks.smoothing.k must be >= 0")])


@dataclass
class HooksConfig:
    raw_init: RawInitConfig = field(default_factory=RawInitConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)


@dataclass
class EvalConfig:
    train: str | None = "sklearn:digits"  # labelled bank for the kNN monitor (None: no monitor)
    test: str | None = None  # queries; None: a held-out split of `train` (see holdout)
    holdout: float = 0.3  # fraction of `train` used as queries when `test` is None (a fixed random split)
    limit_train: int | None = None
    limit_test: int | None = None
    every_epochs: int = 0  # 0: only after training
    k: int = 200
    temperature: float = 0.07
    batch_size: int = 256

    def __post_init__(self):
        _require([(0 <= self.holdout < 1, "eval.holdout must be in [0, 1)"),
                  (not self.train or self.test or self.holdout > 0,
                   "eval.holdout=0 with no eval.test leaves the kNN monitor without queries: set eval.test or "
                   "eval.holdout > 0")])


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end of each epoch and of the run
    every_epochs: int = 1
    keep_last: int = 2

    def __post_init__(self):
        _require([(self.keep_last >= 1, "checkpoint.keep_last must be >= 1")])


@dataclass
class DistConfig:
    timeout_s: float = 300.0  # collective timeout: a dead peer ends the run instead of hanging it

    def __post_init__(self):
        _require([(self.timeout_s > 0, "dist.timeout_s must be > 0")])


@dataclass
class LogConfig:
    progress: bool = True
    tensorboard: bool = False


@dataclass
class Config:
    output_dir: str = "out/run"
    seed: int = 0
    resume: str = "auto"  # auto | none | <checkpoint path> (a path: not a Literal)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)


# PyYAML follows YAML 1.1, whose floats need a dot: it reads ``5e-4`` (``weight_decay=5e-4``) as a string
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value, hint, key: str):
    """Checks/converts one value against a dataclass field annotation (strings from the CLI are YAML)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        # YAML reads an unquoted yes / no / on / off / true / false as a boolean, not the word typed
        typed = " (YAML reads yes / no / on / off as a boolean: use one of the words)"
        typed = typed if isinstance(value, bool) else ""
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}{typed}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if hint is list or origin is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {hint}")


def apply_mapping(obj, mapping: dict, prefix: str = "") -> None:
    """Sets the fields of the dataclass ``obj`` (nested sections included) from ``mapping``, each value
    checked against its field's type; an unknown key or a bad value is a one-line ``ConfigError``
    (``prefix`` names where the mapping sits in the file)."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a section (mapping), got {value!r}")
            apply_mapping(current, value, dotted + ".")
            continue
        if isinstance(current, dict) and isinstance(value, dict):  # `a.b.c=1` updates a mapping in place
            value = _merged(current, value)
        setattr(obj, key, _coerce(value, hints[key], dotted))


def _merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(base[key], value) if isinstance(base.get(key), dict) and isinstance(value, dict) else value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def validate(section) -> None:
    """Runs every section's own checks (``__post_init__``), nested sections first: once a config is
    loaded, since fields set one by one from a file and overrides bypass the constructor."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    if hasattr(section, "__post_init__"):
        section.__post_init__()


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML config file's mapping; ConfigError if the file is missing or holds something else."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- overrides, validated."""
    cfg = Config()
    if path is not None:
        apply_mapping(cfg, read_yaml_mapping(path))
    apply_mapping(cfg, parse_overrides(overrides or []))
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    apply_mapping(cfg, data)
    return cfg

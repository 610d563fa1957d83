"""Typed experiment configuration loaded from YAML.

A run is fully described by its config file plus `--set key.path=value` overrides. Unknown
keys, wrong types and impossible values are errors that name the key, e.g.
`config key 'stage1.lr': expected a float, got 'fast'`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A problem with the configuration; the message names the key and the fix."""


@dataclass
class DataConfig:
    # "swissroll" generates the paper's 2-D swiss-roll in memory; "synthetic" uniform noise of
    # model.data_shape (throughput checks); anything else is a shard set (local directory,
    # file:// or s3:// prefix holding manifest.json, or a brace pattern).
    train: str = "swissroll"
    test: str = "swissroll"
    batch_size: int = 32
    num_workers: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False  # infinite stream with replacement: for many ranks, few shards
    swissroll_samples: int = 5000  # also the size of the "synthetic" set
    swissroll_test_samples: int = 1000


@dataclass
class ModelConfig:
    # gapm, or a baseline from the paper (gapm/baselines.py): one stage of stage1.steps, every
    # network with stage1.autoencoder's Adam settings, method settings in `hyperparameters`.
    kind: Literal["gapm", "vae", "aae", "wae", "introvae", "age", "alae"] = "gapm"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    data_shape: list[int] = field(default_factory=lambda: [2])  # [2] points or [C, S, S]
    latent_dim: int = 128
    prior_dim: int = 128
    width: int = 64  # MLP hidden width for points, base channel count for images
    latent_norm: bool = True  # the paper's latent BatchNorm (ablation: false)
    latent_generator_widths: list[int] = field(default_factory=lambda: [400, 800, 400, 400])
    latent_generator_output_norm: bool = True  # BatchNorm1d over g's output, as the authors
    latent_discriminator_widths: list[int] = field(default_factory=lambda: [400, 400, 400, 64])
    latent_discriminator_spectral_norm: Literal["none", "hidden", "all"] = "hidden"  # authors: hidden
    latent_discriminator_activation: Literal["relu", "leaky_relu"] = "relu"


@dataclass
class OptimizerConfig:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.0
    # Learning rate over the stage: constant, or decayed from `lr` to `lr * final_lr_fraction`
    # (cosine or linear) starting at `decay_start` (a fraction of the stage's steps). A function
    # of the stage step alone, so resuming restores it exactly.
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    decay_start: float = 0.0
    final_lr_fraction: float = 0.0


@dataclass
class Stage1Config:
    steps: int = 1000
    autoencoder: OptimizerConfig = field(default_factory=OptimizerConfig)
    critic: OptimizerConfig = field(default_factory=OptimizerConfig)
    critic_steps: int = 2
    mix_gamma: float = 0.2
    critic_offset_lambda: float = 0.2
    omega_interpolation: float = 1.0
    omega_reconstruction: float = 1.0
    max_mixing: float = 0.5
    adversarial_regularizer: bool = True  # ablation: false trains a plain (BN-)autoencoder


@dataclass
class Stage2Config:
    steps: int = 1000
    latent_generator: OptimizerConfig = field(default_factory=OptimizerConfig)
    latent_discriminator: OptimizerConfig = field(default_factory=OptimizerConfig)
    discriminator_steps: int = 5


@dataclass
class TrainConfig:
    # null: whatever the launcher says (`accelerate launch --mixed_precision` or its config file),
    # else no; a value here overrides the launcher.
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    gradient_accumulation_steps: int = 1
    grad_clip_norm: float | None = None
    compile: bool = False
    checkpoint_dir: str | None = None  # local dir or s3://bucket/prefix; null: <run dir>/checkpoints
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the end of each stage
    keep_last_checkpoints: int = 3
    log_every: int = 50
    progress_bar: bool = True


@dataclass
class EvalConfig:
    samples: int = 5000  # generated samples for the end-of-training metrics
    # Checkpoint evaluation jobs (gapm eval / eval-watch, pipeline/eval_jobs.py):
    fid_stats: str | None = None  # reference statistics: a name, path or s3:// URL (gapm fid-stats)
    fid_samples: int = 50000  # generated samples per FID (the paper: 50,000)
    feature_extractor: str | None = None  # null: the one the statistics were computed with
    inception_weights: str | None = None  # path or s3:// URL of inception-2015-12-05.pt
    kid: bool = False  # also KID (needs statistics with features, the default of fid-stats)
    champion_alias: str = "champion"  # registry alias moved to the best-scoring checkpoint


@dataclass
class TrackingConfig:
    # MLflow: the server named by MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db.
    enabled: bool = True
    experiment: str | None = None  # MLflow experiment; null: the config's name. Comparisons share one.
    registered_model_name: str | None = None  # null: "gapm-" + name
    register_model: bool = True  # register the model logged at the end of stage 2 (logged either way)
    log_checkpoints: bool = True  # upload every checkpoint as run artifacts (else: location only)
    system_metrics: bool = True  # CPU/GPU/memory/disk/network every 10 s (needs psutil)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs"  # the run directory is output_dir/name
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _type_name(expected: Any) -> str:
    if typing.get_origin(expected) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(expected))
    if typing.get_origin(expected) is list:
        return f"a list of {_type_name(typing.get_args(expected)[0])}"
    names = {int: "an integer", float: "a float", bool: "true or false", str: "a string",
             type(None): "null"}
    return names.get(expected, getattr(expected, "__name__", str(expected)))


def _convert(value: Any, expected: Any, key: str) -> Any:
    """Checks `value` against the annotation `expected`, converting where YAML is lenient."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"config key '{key}': expected {' or '.join(_type_name(o) for o in options)},"
                          f" got {value!r}")
    if origin is Literal:
        if value is False and "no" in typing.get_args(expected):
            value = "no"  # YAML 1.1 reads a bare `no` as false
        if value not in typing.get_args(expected):
            raise ConfigError(f"config key '{key}': expected {_type_name(expected)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected {_type_name(expected)}, got {value!r}")
        (item_type,) = typing.get_args(expected)
        return [_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key '{key}': expected a mapping of names to values, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(expected):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of settings, got {value!r}")
        return from_dict(expected, value, prefix=f"{key}.")
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a float, got {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {expected!r} for {key}")


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from a mapping; unknown keys and bad types name the key."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}'; known keys under "
                              f"'{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(known))}")
    kwargs = {key: _convert(value, hints[key], prefix + key) for key, value in values.items()}
    return cls(**kwargs)


def apply_override(values: dict[str, Any], assignment: str) -> None:
    """Applies one `a.b.c=value` override (value parsed as YAML) to the raw mapping."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like key.path=value")
    path, raw_value = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{assignment}': '{key}' is not a section")
    node[keys[-1]] = yaml.safe_load(raw_value) if raw_value.strip() else ""


def validate(config: ExperimentConfig) -> None:
    """Value checks that types alone cannot express."""
    positive = {
        "data.batch_size": config.data.batch_size, "stage1.critic_steps": config.stage1.critic_steps,
        "stage2.discriminator_steps": config.stage2.discriminator_steps,
        "train.checkpoint_every": config.train.checkpoint_every,
        "train.keep_last_checkpoints": config.train.keep_last_checkpoints,
        "train.log_every": config.train.log_every, "model.latent_dim": config.model.latent_dim,
        "model.prior_dim": config.model.prior_dim, "model.width": config.model.width,
        "train.gradient_accumulation_steps": config.train.gradient_accumulation_steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be at least 1, got {value}")
    for key, value in {"stage1.steps": config.stage1.steps, "stage2.steps": config.stage2.steps}.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    accumulation = config.train.gradient_accumulation_steps
    for key, value in {"stage1.steps": config.stage1.steps, "stage2.steps": config.stage2.steps,
                       "train.checkpoint_every": config.train.checkpoint_every}.items():
        if value % accumulation:
            raise ConfigError(f"config key '{key}' ({value}) must be a multiple of "
                              f"train.gradient_accumulation_steps ({accumulation}) so that "
                              "checkpoints fall between optimizer steps")
    for section in ("stage1", "stage2"):
        for name, settings in vars(getattr(config, section)).items():
            if not isinstance(settings, OptimizerConfig):
                continue
            key = f"{section}.{name}"
            if settings.lr <= 0:
                raise ConfigError(f"config key '{key}.lr' must be positive, got {settings.lr}")
            if len(settings.betas) != 2 or not all(0.0 <= b < 1.0 for b in settings.betas):
                raise ConfigError(f"config key '{key}.betas' must be two numbers in [0, 1), got {settings.betas}")
            if settings.weight_decay < 0:
                raise ConfigError(f"config key '{key}.weight_decay' must be >= 0, got {settings.weight_decay}")
            if not 0.0 <= settings.decay_start < 1.0:
                raise ConfigError(f"config key '{key}.decay_start' must be in [0, 1), got {settings.decay_start}")
            if not 0.0 <= settings.final_lr_fraction <= 1.0:
                raise ConfigError(f"config key '{key}.final_lr_fraction' must be in [0, 1], "
                                  f"got {settings.final_lr_fraction}")
    if not 0.0 <= config.stage1.max_mixing <= 1.0:
        raise ConfigError(f"config key 'stage1.max_mixing' must be in [0, 1], got {config.stage1.max_mixing}")
    shape = config.model.data_shape
    is_points = len(shape) == 1 and shape[0] >= 1
    if not (is_points or (len(shape) == 3 and shape[1] == shape[2] and shape[1] in (28, 32, 64))):
        raise ConfigError(f"config key 'model.data_shape' must be [D] (points, e.g. [2]) or [C, S, S] "
                          f"with S in 28, 32, 64; got {shape}")
    if config.data.batch_size < 2 and config.model.latent_norm:
        raise ConfigError("config key 'data.batch_size' must be at least 2 with model.latent_norm "
                          "(BatchNorm needs more than one sample per batch)")
    if "/" in config.name or not config.name:
        raise ConfigError(f"config key 'name' must be a non-empty name without '/', got {config.name!r}")
    model_name = config.tracking.registered_model_name
    if model_name is not None and (not model_name or any(c in model_name for c in "/@:")):
        # models:/NAME@ALIAS and models:/NAME/VERSION could not name it.
        raise ConfigError(f"config key 'tracking.registered_model_name' must be a non-empty name "
                          f"without '/', '@' or ':', got {model_name!r}")
    if config.eval.fid_samples < 2:
        raise ConfigError(f"config key 'eval.fid_samples' must be at least 2, got {config.eval.fid_samples}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Reads YAML at `path` (None: all defaults), applies overrides, type- and value-checks."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file "
                              "(see configs/)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings at the top level")
        values = loaded or {}
    for assignment in overrides:
        apply_override(values, assignment)
    config = from_dict(ExperimentConfig, values)
    validate(config)
    return config


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)

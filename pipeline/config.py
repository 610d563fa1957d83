"""The experiment config: one YAML file describes a run, assembled from the typed settings
each component owns.

    data      pipeline.data.sources.DataConfig
    model     gapm.ModelShape (the networks) + the method's kind and its own hyper-parameters,
              typed by the method's `Hyperparameters` dataclass and checked at load time
    stage1    gapm.Stage1Hyperparameters (Eq. 9 / 10) + steps and the Adam settings of its networks
    stage2    gapm.Stage2Hyperparameters + steps and the Adam settings of its networks
    train     pipeline.train.settings.TrainConfig; its checkpoint keys (checkpoint_dir,
              checkpoint_every, keep_last_checkpoints) assemble the checkpoint component's
              pipeline.checkpoints.CheckpointConfig (`checkpoint_config`)
    eval      pipeline.eval.settings.EvalConfig
    tracking  pipeline.tracking.tracker.TrackingConfig

Defaults live in those classes only. `--set key.path=value` overrides any key (YAML value).
Unknown keys, wrong types and impossible values are errors that name the key, e.g.
`config key 'stage1.autoencoder.lr': expected a float, got 'fast'`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gapm import (
    METHODS,
    GAPMHyperparameters,
    ModelShape,
    Stage1Hyperparameters,
    Stage2Hyperparameters,
)
from pipeline.checkpoints.settings import STAGING, CheckpointConfig
from pipeline.data.sources import DataConfig
from pipeline.errors import ConfigError
from pipeline.eval.settings import EvalConfig
from pipeline.tracking.tracker import TrackingConfig
from pipeline.train.settings import OptimizerConfig, TrainConfig

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "ExperimentConfig", "ModelConfig",
           "OptimizerConfig", "Stage1Config", "Stage2Config", "TrackingConfig", "TrainConfig", "checkpoint_config",
           "dump_config", "load_config", "method_hyperparameters", "to_dict"]


@dataclass
class ModelConfig(ModelShape):
    # gapm, or a baseline from the paper (gapm/baselines/): a baseline trains one stage of
    # stage1.steps, every network with stage1.autoencoder's Adam settings.
    kind: str = "gapm"
    # A baseline's own settings, e.g. {kl_weight: 0.01}: the fields of its Hyperparameters class
    # (gapm/baselines/<kind>.py). GAPM's live in the stage1 / stage2 sections.
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def shape(self) -> ModelShape:
        return ModelShape(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelShape)})


@dataclass
class Stage1Config(Stage1Hyperparameters):
    steps: int = 1000  # iterations: each `critic_steps` critic updates + 1 autoencoder update
    autoencoder: OptimizerConfig = field(default_factory=OptimizerConfig)
    critic: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class Stage2Config(Stage2Hyperparameters):
    steps: int = 1000  # iterations: each `discriminator_steps` D updates + 1 g update
    latent_generator: OptimizerConfig = field(default_factory=OptimizerConfig)
    latent_discriminator: OptimizerConfig = field(default_factory=OptimizerConfig)


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


def checkpoint_config(config: ExperimentConfig) -> CheckpointConfig:
    """The checkpoint component's settings. Its keys stay under `train:` (stable YAML, --set
    and MLflow params), next to the storage retry budget they share with the data reader."""
    return CheckpointConfig(directory=config.train.checkpoint_dir or config.run_dir / "checkpoints",
                            every=config.train.checkpoint_every, keep_last=config.train.keep_last_checkpoints,
                            staging=config.run_dir / STAGING)


def method_hyperparameters(config: ExperimentConfig) -> dict[str, Any]:
    """The hyper-parameters the method of `model.kind` is built with: GAPM's from the stage
    sections (the fields of gapm.GAPMHyperparameters), a baseline's from model.hyperparameters."""
    if config.model.kind != "gapm":
        return dict(config.model.hyperparameters)
    sections = (config.stage1, config.stage2)
    return {f.name: next(getattr(s, f.name) for s in sections if hasattr(s, f.name))
            for f in dataclasses.fields(GAPMHyperparameters)}


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
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        item_type = typing.get_args(expected)[0]
        return tuple(_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
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
        number = value
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"config key '{key}': expected a float, got {value!r}")
        if not math.isfinite(number):  # nan passes every `<` check after this one
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return float(number)
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
    try:
        return cls(**kwargs)
    except ValueError as error:  # the dataclass's own checks (__post_init__)
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'top level'}': {error}") from None


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
    """Value checks that types alone cannot express: each section's own, then across sections."""
    config.data.validate()
    config.train.validate()
    config.eval.validate()
    config.tracking.validate()
    for section in ("stage1", "stage2"):
        stage = getattr(config, section)
        if stage.steps < 0:
            raise ConfigError(f"config key '{section}.steps' must be >= 0, got {stage.steps}")
        for name, settings in vars(stage).items():
            if isinstance(settings, OptimizerConfig):
                settings.validate(f"{section}.{name}")
    validate_model(config.model)
    accumulation = config.train.gradient_accumulation_steps
    for key, value in {"stage1.steps": config.stage1.steps, "stage2.steps": config.stage2.steps,
                       "train.checkpoint_every": config.train.checkpoint_every}.items():
        if value % accumulation:
            raise ConfigError(f"config key '{key}' ({value}) must be a multiple of "
                              f"train.gradient_accumulation_steps ({accumulation}) so that "
                              "checkpoints fall between optimizer steps")
    if config.data.batch_size < 2 and config.model.latent_norm:
        raise ConfigError("config key 'data.batch_size' must be at least 2 with model.latent_norm "
                          "(BatchNorm needs more than one sample per batch)")
    if "/" in config.name or not config.name:
        raise ConfigError(f"config key 'name' must be a non-empty name without '/', got {config.name!r}")


def validate_model(model: ModelConfig) -> None:
    for key in ("latent_dim", "prior_dim", "width"):
        if getattr(model, key) < 1:
            raise ConfigError(f"config key 'model.{key}' must be at least 1, got {getattr(model, key)}")
    shape = model.data_shape
    is_points = len(shape) == 1 and shape[0] >= 1
    if not (is_points or (len(shape) == 3 and shape[1] == shape[2] and shape[1] in (28, 32, 64))):
        raise ConfigError(f"config key 'model.data_shape' must be [D] (points, e.g. [2]) or [C, S, S] "
                          f"with S in 28, 32, 64; got {shape}")
    for key in ("latent_generator_widths", "latent_discriminator_widths"):
        if not all(width >= 1 for width in getattr(model, key)):
            raise ConfigError(f"config key 'model.{key}' must list positive widths, got {getattr(model, key)}")
    if model.kind not in METHODS:
        raise ConfigError(f"config key 'model.kind' must be one of {', '.join(sorted(METHODS))}; "
                          f"got {model.kind!r}")
    if model.kind == "gapm":
        if model.hyperparameters:
            raise ConfigError("config key 'model.hyperparameters' is for the baselines; GAPM's settings "
                              "live in stage1 (mix_gamma, critic_steps, ...) and stage2 (discriminator_steps)")
        return
    # The baseline's typed settings: unknown keys, wrong types and bad values named here.
    from_dict(METHODS[model.kind].Hyperparameters, model.hyperparameters, prefix="model.hyperparameters.")


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

"""The experiment config: one YAML file describes a run, assembled from the typed settings
each component owns.

    data        pipeline.data.settings.DataConfig
    model       gapm.ModelShape (the networks) + the method's kind and its own hyper-parameters
                (`model.hyperparameters`, every method GAPM included), typed by the method's
                `Hyperparameters` dataclass and checked at load time
    optimizers  Adam settings per trained network, by the method's network names (`default`:
                every network without an entry of its own)
    stage1      steps of stage 1 (GAPM: autoencoder + critic; a baseline: its only stage)
    stage2      steps of stage 2 (GAPM: latent generator + discriminator)
    train       pipeline.train.settings.TrainConfig; its checkpoint keys (checkpoint_dir,
                checkpoint_every, keep_last_checkpoints) assemble the checkpoint component's
                pipeline.checkpoints.CheckpointConfig (`checkpoint_config`)
    eval      pipeline.eval.settings.EvalConfig
    tracking  pipeline.tracking.settings.TrackingConfig

Each lives in its component's settings module, which imports nothing of the component's
runtime (readers, trackers, Accelerate): reading a config is cheap, and no component imports
this module (the import-linter contracts in pyproject.toml). Components get their own
sections: `training_job` assembles what `gapm train` runs, `checkpoint_config` the checkpoint
component's settings.

Defaults live in those classes only. `--set key.path=value` overrides any key (YAML value).
Spellings of earlier releases (GAPM's settings and the Adam settings inside stage1 / stage2)
still load, with a warning naming the new key (`_move_deprecated_keys`).
Unknown keys, wrong types and impossible values are errors that name the key, e.g.
`config key 'stage1.autoencoder.lr': expected a float, got 'fast'`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gapm import METHODS, GAPMHyperparameters, ModelShape
from pipeline.checkpoints.settings import STAGING, CheckpointConfig
from pipeline.data.settings import DataConfig
from pipeline.errors import ConfigError
from pipeline.eval.settings import EvalConfig
from pipeline.tracking.settings import TrackingConfig
from pipeline.train.settings import OptimizerConfig, TrainConfig, TrainingJob, optimizer_settings
from pipeline.typed_settings import from_dict

log = logging.getLogger(__name__)

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "ExperimentConfig", "ModelConfig",
           "OptimizerConfig", "StageConfig", "TrackingConfig", "TrainConfig", "checkpoint_config", "dump_config", "from_dict",
           "load_config", "method_hyperparameters", "optimizer_settings", "to_dict", "training_job"]


@dataclass
class ModelConfig(ModelShape):
    # gapm, or a baseline from the paper (gapm/baselines/): vae, aae, wae, introvae, age, alae; a
    # baseline trains one stage of stage1.steps.
    kind: str = "gapm"
    # The method's own settings, e.g. {mix_gamma: 0.2} for GAPM or {kl_weight: 0.01} for the VAE:
    # the fields of its Hyperparameters class (gapm/model.py, gapm/baselines/<kind>.py). After
    # loading it holds every field, defaults included, so the logged config is complete.
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def shape(self) -> ModelShape:
        return ModelShape(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelShape)})


@dataclass
class StageConfig:
    """One stage of the method: GAPM's stage 1 trains the autoencoder and the critic (each
    iteration `critic_steps` critic updates + 1 autoencoder update), its stage 2 the latent
    generator g and discriminator D (`discriminator_steps` D updates + 1 g update); a baseline
    has one stage."""

    steps: int = 1000  # iterations of the stage (0: skip it)


def default_optimizers() -> dict[str, OptimizerConfig]:
    return {"default": OptimizerConfig()}


@dataclass
class ExperimentConfig:
    name: str = "experiment"  # the run's name: its directory, MLflow run and checkpoints' experiment
    seed: int = 0  # weight init, data order and every random draw (iteration t on rank r: from (seed, r, t))
    output_dir: str = "runs"  # the run directory is output_dir/name
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # Adam per trained network: {network name: settings}; `default` for every network without
    # an entry (GAPM's networks: autoencoder, critic, latent_generator, latent_discriminator;
    # a baseline's: its `stages` in gapm/baselines/<kind>.py).
    optimizers: dict[str, OptimizerConfig] = field(default_factory=default_optimizers)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)
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
    """The hyper-parameters the method of `model.kind` is built with (model.hyperparameters)."""
    return dict(config.model.hyperparameters)


def training_job(config: ExperimentConfig) -> TrainingJob:
    """What `gapm train` runs: the training component's view of the experiment."""
    return TrainingJob(
        name=config.name, seed=config.seed, run_dir=config.run_dir, model_kind=config.model.kind,
        model_shape=config.model.shape(), hyperparameters=method_hyperparameters(config),
        stage_steps=(config.stage1.steps, config.stage2.steps), data=config.data, optimizers=config.optimizers,
        train=config.train, checkpoints=checkpoint_config(config), tracking=config.tracking,
        end_of_run_samples=config.eval.samples, record=to_dict(config))


def network_names(kind: str) -> list[str]:
    """The trained networks of method `kind`, in stage order."""
    return [name for stage in METHODS[kind].stages for name in stage]


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
    validate_model(config.model)
    networks = network_names(config.model.kind)
    for name, settings in config.optimizers.items():
        if name != "default" and name not in networks:
            raise ConfigError(f"config key 'optimizers.{name}': {config.model.kind} has no network '{name}'; "
                              f"its networks are {', '.join(networks)} (or 'default' for all of them)")
        settings.validate(f"optimizers.{name}")
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
    # The method's typed settings: unknown keys, wrong types and bad values named here; then
    # every field, defaults included, so that the logged and checkpointed config is complete.
    typed = from_dict(METHODS[model.kind].Hyperparameters, model.hyperparameters, prefix="model.hyperparameters.")
    model.hyperparameters = dataclasses.asdict(typed)


# Keys of earlier releases: GAPM's settings lived in the stage sections, with the Adam settings
# of the networks each stage trains (a baseline's networks all took stage1.autoencoder's).
_GAPM_SETTINGS = {f.name for f in dataclasses.fields(GAPMHyperparameters)}
_STAGE_OPTIMIZERS = {"stage1": ("autoencoder", "critic"), "stage2": ("latent_generator", "latent_discriminator")}


def _move_deprecated_keys(values: dict[str, Any]) -> None:
    """Rewrites the raw mapping from the old spellings to the new ones, warning once per key."""
    kind = (values.get("model") or {}).get("kind", "gapm") if isinstance(values.get("model"), dict) else "gapm"
    for section, optimizer_keys in _STAGE_OPTIMIZERS.items():
        stage = values.get(section)
        if not isinstance(stage, dict):
            continue
        for key in [k for k in stage if k in _GAPM_SETTINGS or k in optimizer_keys]:
            if key in _GAPM_SETTINGS:
                new_section, new_key = "model", f"hyperparameters.{key}"
                target = values.setdefault("model", {}).setdefault("hyperparameters", {})
                name = key
            else:
                name = key if kind == "gapm" else "default"
                new_section, new_key = "optimizers", name
                target = values.setdefault("optimizers", {})
            if not isinstance(target, dict):
                continue  # the type check of the new key reports it
            log.warning("config key '%s.%s' is deprecated: write it as '%s.%s'", section, key, new_section, new_key)
            old = stage.pop(key)
            # Both spellings (a YAML in the new one, an old `--set`): the old one applies on top.
            if isinstance(old, dict) and isinstance(target.get(name), dict):
                target[name] = {**target[name], **old}
            else:
                target[name] = old


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
    _move_deprecated_keys(values)
    config = from_dict(ExperimentConfig, values)
    validate(config)
    return config


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)

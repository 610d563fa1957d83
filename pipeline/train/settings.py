"""The settings of the training loop (`train:`) and of each network's optimizer
(`optimizers.autoencoder`, `optimizers.latent_generator`, ...), with the learning-rate schedule,
and `TrainingJob`: everything one training needs, assembled by pipeline.config
(`training_job`) from the experiment's sections.

Kept apart from the loop so that reading a config does not import Accelerate, the data readers
or the trackers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gapm import ModelShape
from pipeline.checkpoints.settings import CheckpointConfig
from pipeline.data.settings import DataConfig
from pipeline.errors import ConfigError
from pipeline.tracking.settings import TrackingConfig


@dataclass
class OptimizerConfig:
    """Adam for one network."""

    lr: float = 2e-4  # Adam's learning rate (the authors': 2e-4)
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])  # Adam's betas (the authors': 0, 0.999)
    weight_decay: float = 0.0  # Adam's (L2) weight decay
    # Learning rate over the stage: constant, or decayed from `lr` to `lr * final_lr_fraction`
    # (cosine or linear) starting at `decay_start` (a fraction of the stage's steps). A function
    # of the stage step alone, so resuming restores it exactly.
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    decay_start: float = 0.0  # fraction of the stage's steps after which the decay starts (0.5: the second half)
    final_lr_fraction: float = 0.0  # the learning rate at the end of the stage, as a fraction of `lr`

    def validate(self, key: str) -> None:
        if not self.lr > 0:  # also nan
            raise ConfigError(f"config key '{key}.lr' must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"config key '{key}.betas' must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ConfigError(f"config key '{key}.weight_decay' must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.decay_start < 1.0:
            raise ConfigError(f"config key '{key}.decay_start' must be in [0, 1), got {self.decay_start}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ConfigError(f"config key '{key}.final_lr_fraction' must be in [0, 1], got {self.final_lr_fraction}")


def optimizer_settings(optimizers: dict[str, OptimizerConfig], network: str) -> OptimizerConfig:
    """The Adam settings of `network`: its own entry, else `default`, else Adam's defaults here."""
    return optimizers.get(network) or optimizers.get("default") or OptimizerConfig()


def scheduled_lr(settings: OptimizerConfig, stage_step: int, stage_steps: int) -> float:
    """The learning rate of iteration `stage_step` (0-based) of a stage of `stage_steps`."""
    progress = stage_step / max(stage_steps, 1)
    if settings.schedule == "constant" or progress <= settings.decay_start:
        return settings.lr
    decayed = (progress - settings.decay_start) / (1.0 - settings.decay_start)
    shape = 0.5 * (1 + math.cos(math.pi * decayed)) if settings.schedule == "cosine" else 1.0 - decayed
    return settings.lr * (settings.final_lr_fraction + (1 - settings.final_lr_fraction) * shape)


@dataclass
class TrainConfig:
    # null: whatever the launcher says (`accelerate launch --mixed_precision` or its config file),
    # else no; a value here overrides the launcher.
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    gradient_accumulation_steps: int = 1  # iterations whose gradients are summed per optimizer step
    grad_clip_norm: float | None = None  # clip each network's gradient norm to this (null: no clipping)
    compile: bool = False  # torch.compile every trained network
    checkpoint_dir: str | None = None  # local dir or s3://bucket/prefix; null: <run dir>/checkpoints
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the end of each stage
    keep_last_checkpoints: int = 3  # older complete checkpoints are deleted
    log_every: int = 50  # steps between metric lines (losses averaged over the window and the ranks)
    progress_bar: bool = True  # rank 0's progress bar (in batch logs: redrawn rarely)
    # How long transient storage errors (an S3 endpoint restarting, a network blip) are retried
    # before the run stops with the resumable status; checkpoint uploads wait in the background.
    storage_retry_seconds: float = 600.0

    def validate(self) -> None:
        for key in ("gradient_accumulation_steps", "checkpoint_every", "keep_last_checkpoints", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'train.{key}' must be at least 1, got {getattr(self, key)}")
        if self.storage_retry_seconds < 0:
            raise ConfigError(f"config key 'train.storage_retry_seconds' must be >= 0, got {self.storage_retry_seconds}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ConfigError(f"config key 'train.grad_clip_norm' must be positive or null, got {self.grad_clip_norm}")


@dataclass(frozen=True)
class TrainingJob:
    """One training, as the loop runs it: the method and its shape, each stage's length, and
    the sections of the components the loop drives (data, optimizers, checkpoints, tracking)."""

    name: str  # the experiment: the MLflow run's name, the checkpoints' `experiment`
    seed: int  # weight init, data order, every random draw
    run_dir: Path  # the run directory: config.yaml, metrics, outputs (and checkpoints by default)
    model_kind: str  # a key of gapm.METHODS
    model_shape: ModelShape
    hyperparameters: dict[str, Any]  # the method's own settings, every field
    stage_steps: tuple[int, ...]  # iterations of stage 1, 2, ... (a method uses as many as it has stages)
    data: DataConfig
    optimizers: dict[str, OptimizerConfig]  # by network name; `default` for the others
    train: TrainConfig
    checkpoints: CheckpointConfig
    tracking: TrackingConfig
    end_of_run_samples: int  # generated samples for the end-of-training metrics and pictures
    # The resolved experiment config as the record of the run: written to config.yaml and
    # logged as params (secrets masked). Only recorded, never read back by the loop.
    record: dict[str, Any] = field(default_factory=dict)

    def stage_length(self, stage: int) -> int:
        return self.stage_steps[stage - 1]

"""The trained networks as the loop drives them: Accelerate's DDP wrappers (or one DeepSpeed
engine per network), their optimizers, and the `update(name, loss)` the step functions call.

`update` is the seam between the method (gapm, plain PyTorch) and the infrastructure: the
method computes a loss and names the network it trains; here that becomes backward with the
mixed-precision scaling, gradient accumulation, clipping and the optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from gapm import Method
from pipeline.config import ExperimentConfig
from pipeline.train import deepspeed_engines
from pipeline.train.settings import OptimizerConfig

Update = Callable[[str, torch.Tensor], None]


def optimizer_settings(config: ExperimentConfig, stage: int, name: str) -> OptimizerConfig:
    """`stage<K>.<name>` when the config has such a section, else `stage1.autoencoder` (the
    baselines' networks share those Adam settings)."""
    section = config.stage1 if stage == 1 else config.stage2
    settings = getattr(section, name, None)
    return settings if isinstance(settings, OptimizerConfig) else config.stage1.autoencoder


def adam(parameters, settings: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=settings.lr, betas=tuple(settings.betas),
                            weight_decay=settings.weight_decay)


def build_optimizers(model: Method, config: ExperimentConfig) -> dict[str, torch.optim.Optimizer]:
    """One Adam per trained network, named as in `model.stages`."""
    return {name: adam(getattr(model, name).parameters(), optimizer_settings(config, stage, name))
            for stage, names in enumerate(model.stages, start=1) for name in names}


@dataclass
class Engines:
    networks: dict[str, nn.Module]  # what the step functions call for forwards with gradients
    optimizers: dict[str, Any]
    update: Update
    deepspeed: bool

    def checkpointed_optimizers(self) -> dict[str, Any]:
        """The optimizers whose state a checkpoint keeps: under DeepSpeed, ZeRO partitions the
        moments across ranks, so none (weights only)."""
        return {} if self.deepspeed else self.optimizers


class AccelerateUpdate:
    """Backward, then every `accumulation` calls for a network: clip and step. Accelerate
    scales fp16 losses and skips steps whose gradients overflowed."""

    def __init__(self, accelerator: Accelerator, networks: dict[str, nn.Module], optimizers: dict[str, Any],
                 accumulation: int, grad_clip_norm: float | None):
        self.accelerator, self.networks, self.optimizers = accelerator, networks, optimizers
        self.accumulation, self.grad_clip_norm = accumulation, grad_clip_norm
        self.backward_calls = {name: 0 for name in optimizers}

    def __call__(self, name: str, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss / self.accumulation)
        self.backward_calls[name] += 1
        if self.backward_calls[name] % self.accumulation:
            return
        if self.grad_clip_norm is not None:
            self.accelerator.clip_grad_norm_(self.networks[name].parameters(), self.grad_clip_norm)
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)


def prepare_engines(accelerator: Accelerator, model: Method, optimizers: dict[str, torch.optim.Optimizer],
                    config: ExperimentConfig) -> Engines:
    """Wraps every trained network for the launcher's distributed setting."""
    if deepspeed_engines.enabled(accelerator):
        networks, optimizers, update = deepspeed_engines.prepare(accelerator, model, optimizers, config)
        engines = Engines(networks, optimizers, update, deepspeed=True)
    else:
        names = list(optimizers)
        prepared = accelerator.prepare(*(getattr(model, n) for n in names), *(optimizers[n] for n in names))
        networks = dict(zip(names, prepared[: len(names)]))
        prepared_optimizers = dict(zip(names, prepared[len(names):]))
        update = AccelerateUpdate(accelerator, networks, prepared_optimizers,
                                  config.train.gradient_accumulation_steps, config.train.grad_clip_norm)
        engines = Engines(networks, prepared_optimizers, update, deepspeed=False)
    if config.train.compile:
        engines.networks = {name: torch.compile(net) for name, net in engines.networks.items()}
    return engines

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
from pipeline.train import deepspeed_engines
from pipeline.train.distributed import fix_gradient_buckets
from pipeline.train.settings import OptimizerConfig, TrainConfig, optimizer_settings

Update = Callable[[str, torch.Tensor], None]


def adam(parameters, settings: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=settings.lr, betas=tuple(settings.betas),
                            weight_decay=settings.weight_decay)


def build_optimizers(model: Method, settings: dict[str, OptimizerConfig]) -> dict[str, torch.optim.Optimizer]:
    """One Adam per trained network, named as in `model.stages`, with its `settings` entry."""
    return {name: adam(getattr(model, name).parameters(), optimizer_settings(settings, name))
            for names in model.stages for name in names}


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
    """Backward, then every `accumulation` calls for a network: clip and step. fp16 losses are
    scaled with Accelerate's GradScaler, whose step skips updates with inf/NaN gradients.

    This drives the optimizers Accelerate prepared directly, not through its per-call wrappers
    (`accelerator.backward`, `AcceleratedOptimizer.step` / `zero_grad`): in accelerate 1.x every
    optimizer step looks for the optional `lomo_optim` package on disk twice (importlib
    `find_spec`, 137 us each measured on the 2-core CPU machine) and every zero_grad inspects the
    optimizer's signature. Stage 2 makes six small optimizer steps per iteration, so that was most
    of the loop's overhead over a bare PyTorch loop (issue 16). For what this pipeline runs (one
    process or DDP, no XLA, no LOMO optimizers, accumulation counted here) the wrappers add
    nothing else: the scaler is the same object and clipping unscales first, as Accelerate does.
    """

    def __init__(self, accelerator: Accelerator, networks: dict[str, nn.Module], optimizers: dict[str, Any],
                 accumulation: int, grad_clip_norm: float | None):
        self.networks, self.scaler = networks, accelerator.scaler
        # The torch optimizers inside Accelerate's AcceleratedOptimizer wrappers (same state).
        self.optimizers = {name: getattr(optimizer, "optimizer", optimizer) for name, optimizer in optimizers.items()}
        self.accumulation, self.grad_clip_norm = accumulation, grad_clip_norm
        self.backward_calls = {name: 0 for name in optimizers}

    def __call__(self, name: str, loss: torch.Tensor) -> None:
        if self.accumulation > 1:
            loss = loss / self.accumulation
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        self.backward_calls[name] += 1
        if self.backward_calls[name] % self.accumulation:
            return
        optimizer = self.optimizers[name]
        if self.grad_clip_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.networks[name].parameters(), self.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def prepare_engines(accelerator: Accelerator, model: Method, optimizers: dict[str, torch.optim.Optimizer],
                    settings: TrainConfig, batch_size: int) -> Engines:
    """Wraps every trained network for the launcher's distributed setting; `batch_size`: per process."""
    if deepspeed_engines.enabled(accelerator):
        networks, optimizers, update = deepspeed_engines.prepare(accelerator, model, optimizers, settings, batch_size)
        engines = Engines(networks, optimizers, update, deepspeed=True)
    else:
        names = list(optimizers)
        prepared = accelerator.prepare(*(getattr(model, n) for n in names), *(optimizers[n] for n in names))
        networks = dict(zip(names, prepared[: len(names)]))
        for network in networks.values():  # one reduction order for fresh and resumed processes
            fix_gradient_buckets(network)
        prepared_optimizers = dict(zip(names, prepared[len(names):]))
        update = AccelerateUpdate(accelerator, networks, prepared_optimizers,
                                  settings.gradient_accumulation_steps, settings.grad_clip_norm)
        engines = Engines(networks, prepared_optimizers, update, deepspeed=False)
    if settings.compile:
        engines.networks = {name: torch.compile(net) for name, net in engines.networks.items()}
    return engines

"""DeepSpeed ZeRO through an accelerate config: one DeepSpeed engine per trained network.

Accelerate's DeepSpeed integration drives one engine per `Accelerator`, while every GAPM stage
trains two networks (and a baseline up to four). So when `accelerate launch` selects DeepSpeed,
the loop builds the engines itself from the launcher's DeepSpeed settings:

- each trained network gets `deepspeed.initialize(model=..., optimizer=its Adam)` with the
  accelerate file's `zero_optimization` block (stage 0, 1 or 2; offload as configured);
- "auto" batch settings are filled from the experiment config (per-GPU batch, accumulation);
- mixed precision is torch autocast around the forwards with fp32 master weights, so the
  frozen forwards a step makes on the plain modules see the same weights. bf16 only: fp16
  would need one loss scaler per engine outside DeepSpeed's own;
- ZeRO-3 is refused: it shards the parameters themselves, and the frozen forwards (the
  critic scoring the autoencoder, D scoring g) need whole networks.

Checkpoints under DeepSpeed hold the full weights (ZeRO-2 keeps every parameter on every
rank) but not the optimizer moments, which ZeRO partitions across ranks: a resumed run
restarts Adam's moments (a warning says so).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, convert_outputs_to_fp32
from torch import nn

from pipeline.errors import ConfigError
from pipeline.train.settings import TrainConfig

log = logging.getLogger(__name__)


def enabled(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def engine_config(accelerator: Accelerator, settings: TrainConfig, batch_size: int) -> dict[str, Any]:
    """The DeepSpeed config for one engine: the launcher's ZeRO settings, our batch settings."""
    launcher = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = launcher.get("zero_optimization", {})
    stage = int(zero.get("stage", 0)) if str(zero.get("stage", 0)) != "auto" else 2
    if stage == 3:
        raise ConfigError("DeepSpeed ZeRO-3 is not supported: it shards parameters, and each GAPM step runs "
                          "frozen forwards of whole networks; use zero_stage 2 "
                          "(launch/accelerate/deepspeed_zero2.yaml) or DDP (launch/accelerate/multi_gpu.yaml)")
    if accelerator.mixed_precision == "fp16":
        raise ConfigError("DeepSpeed with fp16 is not supported (one loss scaler per engine would be needed); "
                          "use bf16 (--set train.mixed_precision=bf16) or DDP with fp16")
    accumulation = settings.gradient_accumulation_steps
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": batch_size * accumulation * world_size,
        "gradient_clipping": settings.grad_clip_norm or 0.0,
        "zero_optimization": {**{k: v for k, v in zero.items() if v != "auto"}, "stage": stage},
        "zero_allow_untested_optimizer": True,  # torch's Adam, built by the pipeline
        "bf16": {"enabled": False},  # autocast instead, see the module docstring
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
    }


def prepare(accelerator: Accelerator, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer],
            settings: TrainConfig, batch_size: int
            ) -> tuple[dict[str, nn.Module], dict[str, Any], Callable[[str, torch.Tensor], None]]:
    """(engines by network name, their optimizers, the `update` the step functions call)."""
    import deepspeed  # an optional extra (pip install gapm[deepspeed]), needed only when launched with it

    engine_settings = engine_config(accelerator, settings, batch_size)
    if accelerator.mixed_precision == "bf16":
        for name in optimizers:  # the frozen forwards on the plain modules get autocast too
            module = getattr(model, name)
            autocast_forward = torch.autocast(accelerator.device.type, dtype=torch.bfloat16)(module.forward)
            module.forward = convert_outputs_to_fp32(autocast_forward)  # as Accelerate's own wrapper
    engines, engine_optimizers = {}, {}
    for name, optimizer in optimizers.items():
        engine, engine_optimizer, _, _ = deepspeed.initialize(
            model=getattr(model, name), optimizer=optimizer, config=copy.deepcopy(engine_settings),
            dist_init_required=None)  # accelerate has usually initialised it already
        engines[name], engine_optimizers[name] = engine, engine_optimizer
    log.info("DeepSpeed: one ZeRO-%d engine for each of %s", engine_settings["zero_optimization"]["stage"],
             ", ".join(engines))

    def update(name: str, loss: torch.Tensor) -> None:
        engines[name].backward(loss)  # scales by 1/accumulation itself
        engines[name].step()  # steps (and clips) only at accumulation boundaries

    return engines, engine_optimizers, update

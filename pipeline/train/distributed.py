"""What multi-process training needs beyond Accelerate: averaging BatchNorm statistics across
ranks, checking that ranks hold the same model, and refusing launches whose processes would
each train alone. (Stopping on a signal: pipeline.stopping.)"""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator
from torch import nn

log = logging.getLogger(__name__)


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one (one all-reduce of one number)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([1.0 if flag else 0.0], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


def average_batchnorm_statistics(model: nn.Module, accelerator: Accelerator) -> None:
    """Replaces every BatchNorm running mean/var by its average over ranks.

    DDP runs with broadcast_buffers=False (see train.py), so each rank's running statistics
    come from its own data. Averaging them before stage 2 and before each checkpoint gives
    every rank, and the saved model, one shared latent normalisation.
    """
    if accelerator.num_processes == 1:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                buffer.copy_(accelerator.reduce(buffer.detach().clone(), reduction="mean"))


@torch.no_grad()
def parameter_fingerprint(model: nn.Module) -> torch.Tensor:
    """Three float64 numbers per tensor (sum, sum of squares, ramp-weighted sum) of every
    parameter and buffer: equal fingerprints mean equal models, for all practical purposes."""
    parts = []
    for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        flat = tensor.detach().double().flatten()
        ramp = torch.linspace(-1, 1, len(flat), dtype=torch.float64, device=flat.device)
        parts.append(torch.stack([flat.sum(), flat.pow(2).sum(), (flat * ramp).sum()]))
    return torch.cat(parts)


def max_parameter_divergence(model: nn.Module, accelerator: Accelerator) -> float:
    """Largest difference between any rank's fingerprint and rank 0's (0.0 when in sync)."""
    if accelerator.num_processes == 1:
        return 0.0
    fingerprints = accelerator.gather(parameter_fingerprint(model).unsqueeze(0))
    return (fingerprints - fingerprints[0]).abs().max().item()


CPU_RECIPE = ("to train with several processes on CPUs, launch with ACCELERATE_USE_CPU=1, e.g. "
              "`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m pipeline.cli train --config ...` "
              "(README: Multi-process training)")


def launcher_process_count(parent_pid: int | None = None) -> int | None:
    """How many processes `accelerate launch --num_processes N` was asked for, when it is this
    process's parent and ran the training itself (its simple launcher does not export N)."""
    try:
        with open(f"/proc/{parent_pid or os.getppid()}/cmdline", "rb") as handle:
            arguments = [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return None
    is_accelerate = any("accelerate" in os.path.basename(part) for part in arguments[:3])
    if not is_accelerate or "launch" not in arguments:
        return None
    for index, part in enumerate(arguments):
        value = None
        if part in ("--num_processes", "--num-processes") and index + 1 < len(arguments):
            value = arguments[index + 1]
        elif part.startswith(("--num_processes=", "--num-processes=")):
            value = part.split("=", 1)[1]
        if value is not None and value.isdigit():
            return int(value)
    return None


def check_world_size(accelerator: Accelerator) -> None:
    """Refuses to train when the launcher started several processes but each would train on
    its own (world size 1): they would write the same run directory and MLflow run twice."""
    from pipeline.errors import ConfigError

    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes == 1:
        raise ConfigError(f"the launcher started {launched} processes (WORLD_SIZE={launched}) but each would "
                          f"train alone: this machine has no GPU for them and ACCELERATE_USE_CPU is not set; "
                          f"{CPU_RECIPE}")
    asked = launcher_process_count()
    if asked is not None and asked > accelerator.num_processes:
        raise ConfigError(f"`accelerate launch --num_processes {asked}` started {accelerator.num_processes} "
                          f"training process (its --cpu mode runs one process without mpirun); {CPU_RECIPE}")

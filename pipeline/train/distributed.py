"""What multi-process training needs beyond Accelerate: one gradient-reduction order for the
whole run (exact resume at any world size), averaging BatchNorm statistics across ranks,
checking that ranks hold the same model, and refusing launches whose processes would each
train alone. (Stopping on a signal: pipeline.stopping.)"""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one (one all-reduce of one number)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([1.0 if flag else 0.0], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


def fix_gradient_buckets(network: nn.Module) -> None:
    """Gives a DistributedDataParallel-wrapped network the gradient-bucket layout it keeps for
    the whole process now, before its first step, so that a resumed process sums each
    gradient over the ranks in the same order as the uninterrupted run did (issue 24).

    Why: DDP's first backward in a process reduces every gradient in one bucket in parameter
    order; it then rebuilds the buckets in the order the gradients arrived and keeps those.
    A ring allreduce (gloo's, measured in tests/integration/rank_probes.py; NCCL's ring follows
    the same design) adds the ranks' values in an order that depends on an element's offset in
    its bucket. With 2 ranks that cannot matter (a + b == b + a); with 3 or
    more, (a + b) + c and (b + c) + a can differ in the last bit. So the first step after a
    resume was reduced in another order than the same step of the uninterrupted run: 1-ulp
    differences that Adam and the GAN games then amplify (20 of 63 tensors differed by up to
    2e-3 at 4 ranks, 50 steps after resuming).

    How: a backward of zero gradients, one parameter at a time in reverse registration order,
    makes DDP record that as its arrival order; it then rebuilds its buckets right here, and
    never again. Every process, fresh or resumed, therefore reduces every step in the same
    layout. Reverse registration order is DDP's own estimate of the arrival order (what it uses
    before it has measured one) and what a network whose modules are registered in forward
    order produces, and the buckets keep DDP's size caps, so reduction still overlaps the
    backward pass on GPUs. Cost: one allreduce of zeros per network at start-up, nothing per step.
    """
    if not isinstance(network, DistributedDataParallel) or network._has_rebuilt_buckets:
        return
    reducer = network.reducer
    trained = [parameter for parameter in network.module.parameters() if parameter.requires_grad]
    held_gradients = [parameter.grad for parameter in trained]
    with torch.enable_grad():
        # What DDP's forward does before a backward it reduces; the graph is one leaf at a time.
        reducer.prepare_for_forward()
        reducer.prepare_for_backward([])
        for parameter in reversed(trained):
            parameter.grad = None
            parameter.backward(torch.zeros_like(parameter))
    for parameter, gradient in zip(trained, held_gradients):
        parameter.grad = gradient  # the zeros DDP averaged are no step's gradients
    if reducer._rebuild_buckets():
        network._has_rebuilt_buckets = True


def batchnorm_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The running mean and variance of every BatchNorm that tracks them, in module order."""
    return [buffer for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            for buffer in (module.running_mean, module.running_var)]


def _set_batchnorm_statistics(buffers: list[torch.Tensor], values: torch.Tensor) -> None:
    offset = 0
    for buffer in buffers:
        buffer.copy_(values[offset:offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()


@torch.no_grad()
def average_batchnorm_statistics(model: nn.Module, accelerator: Accelerator) -> None:
    """Replaces every BatchNorm running mean/var by its average over ranks.

    DDP runs with broadcast_buffers=False (see loop.prepare), so each rank's running statistics
    come from its own data. Averaging them before stage 2 and before each checkpoint gives
    every rank, and the saved model, one shared latent normalisation.

    Values on which all ranks agree already are kept as they are: the float mean of equal
    numbers is not always that number (((a + a) + a) / 3 != a for 15% of random float32 a;
    summed over 6 ranks, even a value that is itself such a mean changes in 8% of cases), so
    averaging again at a resume would move a resumed run off the uninterrupted one.
    """
    if accelerator.num_processes == 1:
        return
    buffers = batchnorm_statistics(model)
    if not buffers:
        return
    own = torch.cat([buffer.detach().flatten() for buffer in buffers])
    mean = own.clone()
    torch.distributed.all_reduce(mean)
    mean /= accelerator.num_processes
    extremes = torch.cat([own, -own])  # the largest and (negated) smallest value in one reduction
    torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
    agreed = extremes[: len(own)] == -extremes[len(own):]
    _set_batchnorm_statistics(buffers, torch.where(agreed, own, mean))


@torch.no_grad()
def gather_batchnorm_statistics(model: nn.Module, accelerator: Accelerator) -> torch.Tensor | None:
    """Every rank's own BatchNorm running statistics, one row per rank, on the CPU (None with
    one process or no BatchNorm): what a checkpoint written between two averagings keeps so
    that a resume continues each rank from its own statistics."""
    buffers = batchnorm_statistics(model)
    if accelerator.num_processes == 1 or not buffers:
        return None
    own = torch.cat([buffer.detach().flatten() for buffer in buffers])
    return accelerator.gather(own.unsqueeze(0)).cpu()


@torch.no_grad()
def restore_rank_batchnorm_statistics(model: nn.Module, per_rank: torch.Tensor, rank: int, world_size: int) -> bool:
    """Loads this rank's row of `gather_batchnorm_statistics`; False (nothing changed) when the
    checkpoint was written by another number of ranks or another model."""
    buffers = batchnorm_statistics(model)
    if not buffers or tuple(per_rank.shape) != (world_size, sum(buffer.numel() for buffer in buffers)):
        return False
    _set_batchnorm_statistics(buffers, per_rank[rank].to(buffers[0].device))
    return True


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
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes == 1:
        raise ConfigError(f"the launcher started {launched} processes (WORLD_SIZE={launched}) but each would "
                          f"train alone: this machine has no GPU for them and ACCELERATE_USE_CPU is not set; "
                          f"{CPU_RECIPE}")
    asked = launcher_process_count()
    if asked is not None and asked > accelerator.num_processes:
        raise ConfigError(f"`accelerate launch --num_processes {asked}` started {accelerator.num_processes} "
                          f"training process (its --cpu mode runs one process without mpirun); {CPU_RECIPE}")

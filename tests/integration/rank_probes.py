"""Run by tests/integration/test_distributed.py under `torchrun --nproc_per_node N` (gloo, CPU):
small DDP experiments that show why a resumed multi-rank run diverged (issue 24) and that
`pipeline.train.distributed` prevents it. Rank 0 writes what it found as JSON to argv[1].

- position: gloo's allreduce of the same numbers at other offsets in the buffer;
- layout_*: the averaged gradients of one batch, reduced in a fresh DDP's first backward and
  again in its second (after DDP rebuilt its buckets), without and with fix_gradient_buckets;
- resume_*: a run of STEPS steps against one whose DDP wrapper is rebuilt after RESUME_AT
  steps (what a resumed process does), without and with fix_gradient_buckets;
- batchnorm_*: averaging statistics the ranks already agree on, and averaging twice.
"""

import json
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.train.distributed import (
    average_batchnorm_statistics,
    batchnorm_statistics,
    fix_gradient_buckets,
)

STEPS, RESUME_AT, WIDTH = 16, 6, 64


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(),
                         nn.Linear(WIDTH, 2))


def wrap(module: nn.Module, fixed: bool) -> DistributedDataParallel:
    wrapped = DistributedDataParallel(module, broadcast_buffers=False)
    if fixed:
        fix_gradient_buckets(wrapped)
    return wrapped


def batch(step: int) -> torch.Tensor:
    return torch.randn(32, 2, generator=torch.Generator().manual_seed(1000 * step + dist.get_rank()))


def backward(wrapped: DistributedDataParallel, step: int) -> None:
    points = batch(step)
    (wrapped(points) - points.flip(1)).pow(2).mean().backward()


def averaged_gradients(wrapped: DistributedDataParallel) -> torch.Tensor:
    backward(wrapped, 0)
    gradients = torch.cat([p.grad.flatten() for p in wrapped.module.parameters()]).clone()
    wrapped.module.zero_grad(set_to_none=True)
    return gradients


def layout_changes(fixed: bool) -> int:
    """Gradient elements whose average differs between a DDP's first and second backward."""
    wrapped = wrap(network(), fixed)
    first, second = averaged_gradients(wrapped), averaged_gradients(wrapped)
    return int((first != second).sum())


def train(module: nn.Module, wrapped: DistributedDataParallel, optimizer, steps: range) -> None:
    for step in steps:
        backward(wrapped, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def resume_differences(fixed: bool) -> int:
    """Tensors that differ between an uninterrupted run and one re-wrapped after RESUME_AT steps."""
    module = network()
    optimizer = torch.optim.Adam(module.parameters(), 1e-2)
    train(module, wrap(module, fixed), optimizer, range(STEPS))
    straight = {k: v.clone() for k, v in module.state_dict().items()}
    module = network()
    optimizer = torch.optim.Adam(module.parameters(), 1e-2)
    train(module, wrap(module, fixed), optimizer, range(RESUME_AT))
    weights, moments = module.state_dict(), optimizer.state_dict()
    module = network()  # a new process: new module, optimizer and DDP wrapper from the "checkpoint"
    module.load_state_dict(weights)
    optimizer = torch.optim.Adam(module.parameters(), 1e-2)
    optimizer.load_state_dict(moments)
    train(module, wrap(module, fixed), optimizer, range(RESUME_AT, STEPS))
    return sum(not torch.equal(straight[k], v) for k, v in module.state_dict().items())


def batchnorm_probe(accelerator: Accelerator) -> dict:
    module = nn.Sequential(nn.BatchNorm1d(4096))
    statistics = batchnorm_statistics(module)
    shared = torch.randn(4096, generator=torch.Generator().manual_seed(7)).abs()
    for buffer in statistics:
        buffer.copy_(shared)  # the same numbers on every rank (as after loading one checkpoint)
    average_batchnorm_statistics(module, accelerator)
    kept = all(torch.equal(buffer, shared) for buffer in statistics)
    for buffer in statistics:  # each rank's own numbers
        buffer.copy_(torch.randn(4096, generator=torch.Generator().manual_seed(dist.get_rank())).abs())
    average_batchnorm_statistics(module, accelerator)
    once = [buffer.clone() for buffer in statistics]
    average_batchnorm_statistics(module, accelerator)
    gathered = accelerator.gather(torch.cat(once).unsqueeze(0))
    return {"batchnorm_agreed_values_kept": kept,
            "batchnorm_second_average_changes": sum(int((a != b).sum()) for a, b in zip(once, statistics)),
            "batchnorm_ranks_agree": bool((gathered == gathered[0]).all())}


def main() -> None:
    accelerator = Accelerator(cpu=True)
    torch.set_num_threads(1)
    values = torch.randn(999, generator=torch.Generator().manual_seed(dist.get_rank()))
    in_place, moved = values.clone(), values.flip(0).clone()
    dist.all_reduce(in_place)
    dist.all_reduce(moved)
    found = {"world_size": dist.get_world_size(),
             "position_changes": int((in_place != moved.flip(0)).sum()),
             "layout_changes_plain": layout_changes(False), "layout_changes_fixed": layout_changes(True),
             "resume_differences_plain": resume_differences(False),
             "resume_differences_fixed": resume_differences(True),
             **batchnorm_probe(accelerator)}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(found, handle)


if __name__ == "__main__":
    main()

"""Seeded sampling and reconstruction in data space: the one way every part of the pipeline
draws from a model (end-of-run metrics, evaluation jobs, `gapm sample`, the registry and the
model MLflow serves), so that the same weights and seed give the same samples everywhere.

The samples are a pure function of the weights, the seed and the sizes of the draws: one
`torch.Generator` seeded once feeds the model's own prior (`Method.sample`), batch after batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gapm.method import Method
from gapm.spaces import to_data_space, to_model_space

SAMPLE_BATCH = 500  # samples drawn per forward pass; part of "the same seed gives the same samples"


class SampleStream:
    """Samples of `model` from one generator seeded with `seed`, in data space on the model's
    device (or `device`): each `draw` continues the same random stream."""

    def __init__(self, model: Method, seed: int, device: torch.device | str | None = None):
        self.model = model
        self.data_shape = list(model.shape.data_shape)
        device = device if device is not None else next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def draw(self, count: int) -> Tensor:
        return to_data_space(self.model.sample(count, self.generator).float(), self.data_shape)


def sample(model: Method, count: int, seed: int, batch_size: int = SAMPLE_BATCH) -> Tensor:
    """`count` samples in data space on the CPU, drawn `batch_size` at a time."""
    stream = SampleStream(model, seed)
    sizes = [min(batch_size, count - start) for start in range(0, count, batch_size)]
    drawn = [stream.draw(size).cpu() for size in sizes]
    return torch.cat(drawn) if drawn else torch.zeros(0, *stream.data_shape)


@torch.no_grad()
def reconstruct(model: Method, data: Tensor, batch_size: int = SAMPLE_BATCH) -> Tensor:
    """Reconstructions of `data` (N, *data_shape) in data space, on the CPU."""
    shape = list(model.shape.data_shape)
    device = next(model.parameters()).device
    out = [to_data_space(model.reconstruct(to_model_space(chunk.to(device), shape)).float(), shape).cpu()
           for chunk in data.split(batch_size)]
    return torch.cat(out) if out else torch.zeros(0, *shape)

"""End-of-training metrics that need no external model.

Points (swiss-roll): reconstruction MSE on held-out points, also relative to the data's
variance; generation quality as the mean distance from each generated point to its nearest
data point (precision: are samples on the roll?) and a multi-bandwidth RBF-kernel MMD against
held-out points (coverage and proportions). When the data is a known roll, also the roll's own
coverage metrics (`pipeline.data.swissroll.roll_coverage`): the share of samples off the roll and
the total variation of their distribution along it. Images: reconstruction MSE with pixels in
[0, 1]. FID lives in the evaluation jobs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gapm import Method, is_image_shape, reconstruct, sample
from pipeline.data.swissroll import RollGeometry, roll_coverage

MMD_BANDWIDTHS = (0.02, 0.05, 0.1, 0.2, 0.5)


def mean_nearest_distance(points: Tensor, reference: Tensor) -> float:
    """Mean over `points` of the Euclidean distance to the closest `reference` point."""
    return torch.cdist(points.double(), reference.double()).min(dim=1).values.mean().item()


def rbf_mmd(first: Tensor, second: Tensor, bandwidths: tuple[float, ...] = MMD_BANDWIDTHS) -> float:
    """Biased (V-statistic) squared MMD with a sum of Gaussian kernels; 0 for identical sets."""
    first, second = first.double(), second.double()

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        squared = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-squared / (2 * h * h)) for h in bandwidths)

    return (kernel(first, first).mean() + kernel(second, second).mean()
            - 2 * kernel(first, second).mean()).item()


def relative_reconstruction_error(data: Tensor, reconstruction: Tensor) -> float:
    """Σ‖x − x̂‖² / Σ‖x − mean(x)‖²: the share of the data's variance the reconstruction misses."""
    data, reconstruction = data.double(), reconstruction.double()
    return ((reconstruction - data).pow(2).sum() / (data - data.mean(0)).pow(2).sum()).item()


def evaluate(model: Method, held_out: Tensor, sample_count: int, seed: int,
             roll: RollGeometry | None = None) -> tuple[dict[str, float], Tensor, Tensor]:
    """Returns (metrics, reconstructions of held_out, generated samples), all in data space.
    `roll`: the roll the data comes from, for its coverage metrics."""
    model.eval()
    data_shape = list(model.shape.data_shape)
    reconstructions = reconstruct(model, held_out)
    samples = sample(model, sample_count, seed)
    metrics = {"eval/reconstruction_mse": torch.mean((reconstructions - held_out) ** 2).item()}
    if not is_image_shape(data_shape):
        metrics["eval/relative_reconstruction_mse"] = relative_reconstruction_error(held_out, reconstructions)
        metrics["eval/sample_nearest_distance"] = mean_nearest_distance(samples, held_out)
        metrics["eval/sample_mmd"] = rbf_mmd(samples[: len(held_out)], held_out)
        if roll is not None and roll.dimension == data_shape[0]:
            metrics.update({f"eval/{key}": value for key, value in roll_coverage(samples, roll).items()})
    return metrics, reconstructions, samples

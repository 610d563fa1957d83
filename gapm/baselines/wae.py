"""WAE-MMD (Tolstikhin et al. 2018), a baseline of the paper's Table 1, on GAPM's networks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gapm.baselines import losses
from gapm.baselines.families import PlainAutoencoderMethod
from gapm.method import Update


@dataclass(frozen=True)
class WAEHyperparameters:
    mmd_weight: float = 10.0  # λ (Tolstikhin et al. 2018 use 10 on MNIST, 100 on CelebA)
    kernel_scales: tuple[float, ...] = losses.WAE_IMQ_SCALES  # multiples of C = 2·d_z·σ²
    prior_variance: float = 1.0  # σ² of the N(0, σ²I) prior
    kernel: str = "imq"  # "imq" (inverse multiquadratics, the authors' choice) or "rbf"

    def __post_init__(self) -> None:
        if self.kernel not in losses.WAE_KERNELS:
            raise ValueError(f"kernel must be one of {sorted(losses.WAE_KERNELS)}, got {self.kernel!r}")


class WAE(PlainAutoencoderMethod):
    """Wasserstein autoencoder with the MMD penalty (Tolstikhin et al. 2018, Algorithm 2):
    deterministic encoder, loss ||x − x̂||² + λ·MMD²_IMQ(P_Z, Q_Z) over one batch of prior
    samples and the batch's embeddings. One update per step."""

    kind = "wae"
    stages = [["autoencoder"]]
    Hyperparameters = WAEHyperparameters

    def _prior(self, count: int, device: torch.device) -> Tensor:
        return torch.randn(count, self.prior_dim, device=device) * self.hp.prior_variance**0.5

    def prior_sample(self, count: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
        return super().prior_sample(count, generator, device) * self.hp.prior_variance**0.5

    def stage_step(self, stage: int, trained: Mapping[str, nn.Module], data: Tensor,
                   update: Update) -> dict[str, float]:
        self.check_stage(stage, trained)
        embeddings, reconstruction, _ = trained["autoencoder"](data)
        prior = self._prior(len(data), data.device)
        total, reconstruction_term, mmd_term = losses.wae_mmd_loss(
            data, reconstruction.float(), prior, embeddings.float(), self.hp.mmd_weight,
            self.hp.kernel_scales, self.hp.prior_variance, self.hp.kernel)
        update("autoencoder", total)
        return {"wae_loss": total.item(), "reconstruction_error": reconstruction_term.item(),
                "mmd": mmd_term.item(),
                "reconstruction_mse": F.mse_loss(reconstruction.detach().float(), data).item()}

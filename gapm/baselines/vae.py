"""VAE (Kingma & Welling 2014), a baseline of the paper's Table 1 and Fig. 4, on GAPM's networks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gapm import networks
from gapm.baselines import losses
from gapm.method import MethodBase, Update
from gapm.shape import ModelShape


class VariationalAutoencoder(nn.Module):
    """Gaussian encoder and decoder; one forward returns (mean, log-variance, reconstruction of
    one reparameterised sample)."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.encoder = networks.GaussianEncoder(shape.data_shape, shape.latent_dim, shape.width)
        self.decoder = networks.build_decoder(shape.data_shape, shape.latent_dim, shape.width)

    def forward(self, data: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, log_variance = self.encoder(data)
        return mean, log_variance, self.decoder(networks.reparameterize(mean, log_variance, torch.randn_like(mean)))


@dataclass(frozen=True)
class VAEHyperparameters:
    # β on the KL term; 1 is the plain VAE (Kingma & Welling 2014). With the summed squared
    # error, β·KL is a Gaussian decoder of variance β/2: for data of small scale (the swiss roll
    # in about [-1, 1.5]) β = 1 collapses the posterior, so lower it there.
    kl_weight: float = 1.0


class VAE(MethodBase):
    """Variational autoencoder (Kingma & Welling 2014): Gaussian q(z|x), Gaussian decoder,
    loss = ||x − x̂||² + β·KL(q(z|x) ‖ N(0, I)) (`losses.vae_loss`). One update per step.
    `encode` returns the posterior mean."""

    kind = "vae"
    stages = [["autoencoder"]]
    Hyperparameters = VAEHyperparameters

    def __init__(self, shape: ModelShape, **hyperparameters: Any):
        super().__init__(shape, **hyperparameters)
        self.autoencoder = VariationalAutoencoder(shape)

    def stage_step(self, stage: int, trained: Mapping[str, nn.Module], data: Tensor,
                   update: Update) -> dict[str, float]:
        self.check_stage(stage, trained)
        mean, log_variance, reconstruction = trained["autoencoder"](data)
        total, reconstruction_term, kl_term = losses.vae_loss(
            data, reconstruction.float(), mean.float(), log_variance.float(), self.hp.kl_weight)
        update("autoencoder", total)
        return {"vae_loss": total.item(), "reconstruction_error": reconstruction_term.item(),
                "kl": kl_term.item(),
                "reconstruction_mse": F.mse_loss(reconstruction.detach().float(), data).item()}

    def _encode(self, data: Tensor) -> Tensor:
        return self.autoencoder.encoder(data)[0]

    def _decode(self, latent: Tensor) -> Tensor:
        return self.autoencoder.decoder(latent)

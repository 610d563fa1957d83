"""AAE (Makhzani et al. 2015), a baseline of the paper's Table 1 and Fig. 4, on GAPM's networks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gapm import networks
from gapm.baselines import losses
from gapm.baselines.families import PlainAutoencoderMethod
from gapm.method import Update, frozen, require_positive_steps
from gapm.shape import ModelShape


@dataclass(frozen=True)
class AAEHyperparameters:
    adversarial_weight: float = 1.0  # weight of the encoder's adversarial term vs ||x − x̂||²
    discriminator_steps: int = 1  # latent-discriminator updates per autoencoder update

    def __post_init__(self) -> None:
        require_positive_steps("discriminator_steps", self.discriminator_steps)


class AAE(PlainAutoencoderMethod):
    """Adversarial autoencoder (Makhzani et al. 2015), deterministic encoder: a latent
    discriminator (GAPM's D, paper: same architectures) tells N(0, I) samples from E(x) with the
    GAN loss; the autoencoder minimises ||x − x̂||² + w_adv·softplus(−D(E(x))). The paper's two
    phases (reconstruction, then regularisation of the encoder) are summed into one update."""

    kind = "aae"
    stages = [["autoencoder", "latent_discriminator"]]
    Hyperparameters = AAEHyperparameters

    def __init__(self, shape: ModelShape, **hyperparameters: Any):
        super().__init__(shape, **hyperparameters)
        self.latent_discriminator = networks.LatentDiscriminator(
            shape.latent_dim, shape.latent_discriminator_widths, shape.latent_discriminator_spectral_norm,
            shape.latent_discriminator_activation)

    def stage_step(self, stage: int, trained: Mapping[str, nn.Module], data: Tensor,
                   update: Update) -> dict[str, float]:
        self.check_stage(stage, trained)
        batch = len(data)
        for _ in range(self.hp.discriminator_steps):
            with torch.no_grad():
                embeddings = self.autoencoder.encode(data)
            prior = self._prior(batch, data.device)
            scores = trained["latent_discriminator"](torch.cat([prior, embeddings])).float()
            on_prior, on_embeddings = scores.split(batch)
            discriminator_loss = losses.aae_discriminator_loss(on_prior, on_embeddings)
            update("latent_discriminator", discriminator_loss)

        embeddings, reconstruction, _ = trained["autoencoder"](data)
        with frozen(self.latent_discriminator):
            on_embeddings = self.latent_discriminator(embeddings).float()
        total, reconstruction_term, adversarial_term = losses.aae_autoencoder_loss(
            data, reconstruction.float(), on_embeddings, self.hp.adversarial_weight)
        update("autoencoder", total)
        return {"latent_discriminator_loss": discriminator_loss.item(), "autoencoder_loss": total.item(),
                "reconstruction_error": reconstruction_term.item(),
                "adversarial_loss": adversarial_term.item(),
                "reconstruction_mse": F.mse_loss(reconstruction.detach().float(), data).item()}

"""ALAE (Pidhorskyi et al. 2020), the baseline of the paper's Fig. 4-5, on GAPM's networks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gapm import networks
from gapm.baselines import losses
from gapm.method import MethodBase, Update, frozen
from gapm.shape import ModelShape


class ALAEGenerator(nn.Module):
    """ALAE's generator side G∘F: mapping F (prior -> w, an MLP) then decoder G (w -> x).
    One forward returns (w, x)."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.mapping = networks.mlp(shape.prior_dim, shape.latent_generator_widths, shape.latent_dim)
        self.decoder = networks.build_decoder(shape.data_shape, shape.latent_dim, shape.width)

    def forward(self, prior: Tensor) -> tuple[Tensor, Tensor]:
        latent = self.mapping(prior)
        return latent, self.decoder(latent)


class ALAEDiscriminator(nn.Module):
    """ALAE's discriminator side D∘E: encoder E (x -> w) then a latent MLP D (w -> logit).
    One forward returns (w, logit)."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.encoder = networks.build_encoder(shape.data_shape, shape.latent_dim, shape.width)
        self.head = networks.ScoreMLP(shape.latent_dim, shape.latent_discriminator_widths)

    def forward(self, data: Tensor) -> tuple[Tensor, Tensor]:
        latent = self.encoder(data)
        return latent, self.head(latent)


@dataclass(frozen=True)
class ALAEHyperparameters:
    r1_gamma: float = 10.0  # γ of the R1 penalty (ALAE's default config)
    latent_weight: float = 1.0  # weight of L_err = ||F(z) − E(G(F(z)))||²


class ALAE(MethodBase):
    """Adversarial latent autoencoder (Pidhorskyi et al. 2020, Algorithm 1) with the shared
    networks: F = MLP (prior_dim -> latent_dim), G = shared decoder, E = shared encoder, D = MLP on
    w. Two networks as in the authors' two optimizers: `generator` = G∘F and
    `discriminator` = D∘E. Non-saturating logistic loss with R1 on real data.

    Algorithm 1 takes three steps per batch (E,D on L_adv; F,G on L_adv; E,G on L_err). Here the
    reciprocity term L_err is folded into the two adversarial updates — E's part (w.r.t. E, on
    detached generated images) into the D∘E update, G's and F's part (through G(F(z)), target F(z)
    detached, as in the authors' code) into the G∘F update — so each network runs one forward and
    receives gradients in all its parameters per update.
    """

    kind = "alae"
    stages = [["generator", "discriminator"]]
    Hyperparameters = ALAEHyperparameters

    def __init__(self, shape: ModelShape, **hyperparameters: Any):
        super().__init__(shape, **hyperparameters)
        self.generator = ALAEGenerator(shape)
        self.discriminator = ALAEDiscriminator(shape)

    @property
    def prior_dim(self) -> int:
        return self.shape.prior_dim

    def _latent_from_prior(self, prior: Tensor) -> Tensor:
        return self.generator.mapping(prior)

    def stage_step(self, stage: int, trained: Mapping[str, nn.Module], data: Tensor,
                   update: Update) -> dict[str, float]:
        self.check_stage(stage, trained)
        batch = len(data)
        with torch.no_grad():
            mapped, generated = self.generator(self._prior(batch, data.device))
        real = data.detach().requires_grad_(True)
        latents, scores = trained["discriminator"](torch.cat([real, generated]))
        on_real, on_fake = scores.float().split(batch)
        (real_gradients,) = torch.autograd.grad(on_real.sum(), real, create_graph=True)
        adversarial = losses.alae_discriminator_loss(on_real, on_fake, real_gradients, self.hp.r1_gamma)
        latent_error_encoder = losses.alae_latent_reconstruction(mapped, latents[batch:].float())
        discriminator_loss = adversarial + self.hp.latent_weight * latent_error_encoder
        update("discriminator", discriminator_loss)

        mapped, generated = trained["generator"](self._prior(batch, data.device))
        with frozen(self.discriminator):
            recovered, on_generated = self.discriminator(generated)
        generator_adversarial = losses.nonsaturating_generator_loss(on_generated.float())
        latent_error = losses.alae_latent_reconstruction(mapped.detach().float(), recovered.float())
        generator_loss = generator_adversarial + self.hp.latent_weight * latent_error
        update("generator", generator_loss)
        return {"discriminator_loss": discriminator_loss.item(), "generator_loss": generator_loss.item(),
                "discriminator_adversarial": adversarial.item(),
                "generator_adversarial": generator_adversarial.item(),
                "latent_reconstruction": latent_error.item(),
                "r1_penalty": losses.r1_penalty(real_gradients.detach()).item()}

    def _encode(self, data: Tensor) -> Tensor:
        return self.discriminator.encoder(data)

    def _decode(self, latent: Tensor) -> Tensor:
        return self.generator.decoder(latent)

"""The two-stage GAPM model: x -E-> z -BN-> ẑ -G-> x̂ (stage 1) and z_prior -g-> ẑ (stage 2).

Data lives in "model space": points as given, images scaled to [-1, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gapm import networks
from gapm.method import MethodBase, Update, interpolate_latents
from gapm.shape import ModelShape
from gapm.steps import (
    Stage1Hyperparameters,
    Stage2Hyperparameters,
    stage1_step,
    stage2_step,
)


class Autoencoder(nn.Module):
    """E, the affine-free latent BatchNorm, and G.

    One forward returns the embedding, the reconstruction and the decoded interpolation
    x_μ = G(μ·ẑ1 + (1-μ)·ẑ2), so a distributed wrapper sees exactly one forward per step.
    The interpolation partner ẑ2 is the batch reversed, as in ACAI.
    """

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.encoder = networks.build_encoder(shape.data_shape, shape.latent_dim, shape.width)
        # No affine parameters: BN only standardises the embedding (paper Eq. 11).
        self.latent_norm: nn.Module = (
            nn.BatchNorm1d(shape.latent_dim, affine=False) if shape.latent_norm else nn.Identity())
        self.decoder = networks.build_decoder(shape.data_shape, shape.latent_dim, shape.width)

    def encode(self, data: Tensor) -> Tensor:
        return self.latent_norm(self.encoder(data))

    def forward(self, data: Tensor, mixing_coefficient: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        latent = self.encode(data)
        if mixing_coefficient is None:
            return latent, self.decoder(latent), None
        mixed_latent = interpolate_latents(latent, latent.flip(0), mixing_coefficient)
        # Decode reconstruction and interpolation in one batch: one pass, same BN/statistics.
        decoded = self.decoder(torch.cat([latent, mixed_latent]))
        reconstruction, interpolation = decoded.split(len(data))
        return latent, reconstruction, interpolation


@dataclass
class GAPMHyperparameters(Stage1Hyperparameters, Stage2Hyperparameters):
    """GAPM's settings, flat: those of stage 1 (Eq. 9 / 10) and of stage 2 (Eq. 12 / 13)."""

    def __post_init__(self) -> None:
        Stage1Hyperparameters.__post_init__(self)
        Stage2Hyperparameters.__post_init__(self)


class GAPM(MethodBase):
    """All five networks. Stage 1 trains `autoencoder` and `critic`; stage 2 trains
    `latent_generator` and `latent_discriminator` with the autoencoder frozen. Sampling is
    G(g(z)) with z ~ N(0, I) of `prior_dim`; the user API runs in the caller's mode (eval:
    running BN statistics)."""

    kind = "gapm"
    stages = [["autoencoder", "critic"], ["latent_generator", "latent_discriminator"]]
    Hyperparameters = GAPMHyperparameters

    def __init__(self, shape: ModelShape, **hyperparameters: Any):
        super().__init__(shape, **hyperparameters)
        self.autoencoder = Autoencoder(shape)
        self.critic = networks.build_critic(shape.data_shape, shape.latent_dim, shape.width)
        self.latent_generator = networks.build_latent_generator(
            shape.prior_dim, shape.latent_dim, shape.latent_generator_widths, shape.latent_generator_output_norm)
        self.latent_discriminator = networks.LatentDiscriminator(
            shape.latent_dim, shape.latent_discriminator_widths, shape.latent_discriminator_spectral_norm,
            shape.latent_discriminator_activation)

    @property
    def prior_dim(self) -> int:
        return self.shape.prior_dim

    def stage_step(self, stage: int, trained: Mapping[str, nn.Module], data: Tensor,
                   update: Update) -> dict[str, float]:
        """Stage 1: Eq. 9 / 10 on `trained` autoencoder and critic. Stage 2: Eq. 12 / 13 on
        `trained` g and D, with this model's autoencoder frozen (the caller puts it in eval)."""
        self.check_stage(stage, trained)
        if stage == 1:
            return stage1_step(trained["autoencoder"], trained["critic"], self.critic, data, self.hp, update)
        return stage2_step(self.autoencoder, trained["latent_generator"], trained["latent_discriminator"],
                           self.latent_discriminator, data, self.shape.prior_dim, self.hp, update)

    def _encode(self, data: Tensor) -> Tensor:
        return self.autoencoder.encode(data)

    def _decode(self, latent: Tensor) -> Tensor:
        return self.autoencoder.decoder(latent)

    def _latent_from_prior(self, prior: Tensor) -> Tensor:
        return self.latent_generator(prior)

"""The two-stage GAPM model: x -E-> z -BN-> ẑ -G-> x̂ (stage 1) and z_prior -g-> ẑ (stage 2).

Data lives in "model space": points as given, images scaled to [-1, 1].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gapm import networks
from gapm.steps import Stage1Hyperparameters, Stage2Hyperparameters, Update, stage1_step, stage2_step


@dataclass
class ModelShape:
    """Everything needed to rebuild the networks from a checkpoint."""

    data_shape: list[int]
    latent_dim: int
    prior_dim: int
    width: int = 64
    latent_norm: bool = True
    latent_generator_widths: list[int] = field(default_factory=lambda: [400, 800, 400, 400])
    latent_generator_output_norm: bool = True
    latent_discriminator_widths: list[int] = field(default_factory=lambda: [400, 400, 400, 64])
    latent_discriminator_spectral_norm: networks.SpectralNormLayers = "hidden"
    latent_discriminator_activation: networks.Activation = "relu"

    # What checkpoints written before these options existed were built with.
    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {
        "latent_generator_output_norm": False, "latent_discriminator_spectral_norm": "all",
        "latent_discriminator_activation": "leaky_relu"}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelShape":
        """Rebuilds a shape saved with `dataclasses.asdict`; keys an older version did not
        save take the values that version built."""
        return cls(**{**cls.LEGACY_DEFAULTS, **values})


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


def interpolate_latents(first: Tensor, second: Tensor, mixing_coefficient: Tensor) -> Tensor:
    """μ·first + (1-μ)·second with one μ per sample."""
    weight = mixing_coefficient.view(-1, *([1] * (first.dim() - 1)))
    return weight * first + (1 - weight) * second


class GAPM(nn.Module):
    """All five networks. Stage 1 trains `autoencoder` and `critic`; stage 2 trains
    `latent_generator` and `latent_discriminator` with the autoencoder frozen.

    Follows the training protocol every method shares (see gapm.baselines): `kind`, `stages`,
    `stage_step`, `hyperparameters`. Hyper-parameters are the fields of Stage1Hyperparameters
    and Stage2Hyperparameters, given flat.
    """

    kind = "gapm"
    stages = [["autoencoder", "critic"], ["latent_generator", "latent_discriminator"]]

    def __init__(self, shape: ModelShape, **hyperparameters: Any):
        super().__init__()
        stage1_keys = {f.name for f in dataclasses.fields(Stage1Hyperparameters)}
        stage2_keys = {f.name for f in dataclasses.fields(Stage2Hyperparameters)}
        unknown = set(hyperparameters) - stage1_keys - stage2_keys
        if unknown:
            raise TypeError(f"GAPM got unknown hyper-parameters {sorted(unknown)}")
        self.stage1_hp = Stage1Hyperparameters(**{k: v for k, v in hyperparameters.items() if k in stage1_keys})
        self.stage2_hp = Stage2Hyperparameters(**{k: v for k, v in hyperparameters.items() if k in stage2_keys})
        self.shape = shape
        self.autoencoder = Autoencoder(shape)
        self.critic = networks.build_critic(shape.data_shape, shape.latent_dim, shape.width)
        self.latent_generator = networks.build_latent_generator(
            shape.prior_dim, shape.latent_dim, shape.latent_generator_widths, shape.latent_generator_output_norm)
        self.latent_discriminator = networks.LatentDiscriminator(
            shape.latent_dim, shape.latent_discriminator_widths, shape.latent_discriminator_spectral_norm,
            shape.latent_discriminator_activation)

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.stage1_hp), **dataclasses.asdict(self.stage2_hp)}

    def stage_step(self, stage: int, trained: Mapping[str, nn.Module], data: Tensor,
                   update: Update) -> dict[str, float]:
        """Stage 0: Eq. 9 / 10 on `trained` autoencoder and critic. Stage 1: Eq. 12 / 13 on
        `trained` g and D, with this model's autoencoder frozen (the caller puts it in eval)."""
        if stage == 0:
            return stage1_step(trained["autoencoder"], trained["critic"], self.critic, data,
                               self.stage1_hp, update)
        if stage == 1:
            return stage2_step(self.autoencoder, trained["latent_generator"], trained["latent_discriminator"],
                               self.latent_discriminator, data, self.shape.prior_dim, self.stage2_hp, update)
        raise ValueError(f"gapm has stages 0 and 1, not {stage}")

    # The user-facing API below runs in eval mode (running BN statistics) and without grads.

    @torch.no_grad()
    def encode(self, data: Tensor) -> Tensor:
        return self.autoencoder.encode(data)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        return self.autoencoder.decoder(latent)

    @torch.no_grad()
    def reconstruct(self, data: Tensor) -> Tensor:
        return self.decode(self.encode(data))

    def prior_sample(self, count: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
        device = device or next(self.parameters()).device
        return torch.randn(count, self.shape.prior_dim, generator=generator, device=device)

    @torch.no_grad()
    def sample_latents(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        return self.latent_generator(self.prior_sample(count, generator))

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        """G(g(z)), z ~ N(0, I)."""
        return self.decode(self.sample_latents(count, generator))

    @torch.no_grad()
    def interpolate(self, first: Tensor, second: Tensor, steps: int = 8) -> Tensor:
        """Decodes `steps` evenly spaced mixes of the embeddings of two batches:
        returns (steps, B, ...) from `first` (μ=1) to `second` (μ=0)."""
        latent_first, latent_second = self.encode(first), self.encode(second)
        frames = []
        for mu in torch.linspace(1.0, 0.0, steps):
            coefficient = torch.full((len(first),), float(mu), device=latent_first.device)
            frames.append(self.decode(interpolate_latents(latent_first, latent_second, coefficient)))
        return torch.stack(frames)

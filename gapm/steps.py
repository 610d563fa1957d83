"""One training iteration per stage, as plain PyTorch.

The step functions compute losses and hand each one to `update(name, loss)`, which owns
backward and the optimizer step. Plain PyTorch passes `plain_update(optimizers)`; the
pipeline passes an Accelerate-aware one (mixed-precision scaling, accumulation, clipping).
That keeps this module free of any distributed or tracking code.

Networks may arrive wrapped (e.g. by DistributedDataParallel). A network that is only
*evaluated* to give another network its loss is passed separately as `..._for_loss`: the
caller gives the unwrapped module there, so that extra forward pass neither triggers
gradient synchronisation nor computes gradients for the frozen network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gapm import losses
from gapm.method import Update, frozen


@dataclass
class Stage1Hyperparameters:
    """Defaults from the authors' public code (γ = λ = 0.2, ω1 = ω2 = 1, 2 critic steps)."""

    mix_gamma: float = 0.2  # γ in Eq. 9: weight of x in the data/reconstruction mix
    critic_offset_lambda: float = 0.2  # λ in Eq. 9
    omega_interpolation: float = 1.0  # ω1 in Eq. 10
    omega_reconstruction: float = 1.0  # ω2 in Eq. 10
    max_mixing: float = 0.5  # μ ~ U[0, max_mixing]
    critic_steps: int = 2  # critic updates per stage-1 iteration (the same batch, fresh μ)
    adversarial_regularizer: bool = True  # False trains a plain (BN-)autoencoder: ablation

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_mixing <= 1.0:
            raise ValueError(f"max_mixing must be in [0, 1], got {self.max_mixing}")
        if self.critic_steps < 1:
            raise ValueError(f"critic_steps must be at least 1, got {self.critic_steps}")


@dataclass
class Stage2Hyperparameters:
    discriminator_steps: int = 5  # D updates per g update (authors: 5)

    def __post_init__(self) -> None:
        if self.discriminator_steps < 1:
            raise ValueError(f"discriminator_steps must be at least 1, got {self.discriminator_steps}")


def sample_mixing_coefficient(batch_size: int, max_mixing: float, device: torch.device) -> Tensor:
    return torch.rand(batch_size, device=device) * max_mixing


def stage1_step(autoencoder: nn.Module, critic: nn.Module, critic_for_loss: nn.Module,
                data: Tensor, hp: Stage1Hyperparameters, update: Update) -> dict[str, float]:
    """`hp.critic_steps` critic updates (Eq. 9) then one autoencoder update (Eq. 10).

    The critic steps reuse `data` with fresh μ each time, so one iteration consumes one batch.
    Returns the last value of each loss as Python floats.
    """
    logs: dict[str, float] = {}
    if hp.adversarial_regularizer:
        for _ in range(hp.critic_steps):
            with torch.no_grad():
                mu = sample_mixing_coefficient(len(data), hp.max_mixing, data.device)
                _, reconstruction, interpolation = autoencoder(data, mu)
            recon_mix = hp.mix_gamma * data + (1 - hp.mix_gamma) * reconstruction
            # One critic forward over all three inputs: one synchronised pass per step.
            scores = critic(torch.cat([data, recon_mix, interpolation])).float()
            on_data, on_recon_mix, on_interpolation = scores.split(len(data))
            critic_loss = losses.interpolation_critic_loss(
                on_data, on_recon_mix, on_interpolation, mu, hp.critic_offset_lambda)
            update("critic", critic_loss)
        logs["critic_loss"] = critic_loss.item()

    if hp.adversarial_regularizer:
        mu = sample_mixing_coefficient(len(data), hp.max_mixing, data.device)
        _, reconstruction, interpolation = autoencoder(data, mu)
        with frozen(critic_for_loss):
            scores = critic_for_loss(torch.cat([interpolation, reconstruction])).float()
        on_interpolation, on_reconstruction = scores.split(len(data))
    else:
        _, reconstruction, _ = autoencoder(data)
        on_interpolation = on_reconstruction = torch.zeros(len(data), device=data.device)
    autoencoder_loss, reconstruction_error = losses.regularized_autoencoder_loss(
        data, reconstruction.float(), on_interpolation, on_reconstruction,
        hp.omega_interpolation, hp.omega_reconstruction)
    update("autoencoder", autoencoder_loss)
    logs["autoencoder_loss"] = autoencoder_loss.item()
    logs["reconstruction_mse"] = reconstruction_error.item()
    return logs


def stage2_step(frozen_autoencoder: nn.Module, latent_generator: nn.Module,
                latent_discriminator: nn.Module, discriminator_for_loss: nn.Module,
                data: Tensor, prior_dim: int, hp: Stage2Hyperparameters,
                update: Update) -> dict[str, float]:
    """`hp.discriminator_steps` updates of D (Eq. 12) then one update of g (Eq. 13).

    `frozen_autoencoder` must be in eval mode: the embeddings BN(E(x)) use the running
    statistics, the same normalisation used when reconstructing and sampling later.
    """
    with torch.no_grad():
        embeddings = frozen_autoencoder.encode(data).float()
    batch = len(data)
    for _ in range(hp.discriminator_steps):
        with torch.no_grad():
            mapped_prior = latent_generator(torch.randn(batch, prior_dim, device=data.device))
        scores = latent_discriminator(torch.cat([embeddings, mapped_prior.float()])).float()
        on_embeddings, on_mapped_prior = scores.split(batch)
        discriminator_loss = losses.latent_discriminator_hinge_loss(on_embeddings, on_mapped_prior)
        update("latent_discriminator", discriminator_loss)

    mapped_prior = latent_generator(torch.randn(batch, prior_dim, device=data.device))
    with frozen(discriminator_for_loss):
        generator_loss = losses.latent_generator_loss(discriminator_for_loss(mapped_prior).float())
    update("latent_generator", generator_loss)
    return {"latent_discriminator_loss": discriminator_loss.item(),
            "latent_generator_loss": generator_loss.item()}

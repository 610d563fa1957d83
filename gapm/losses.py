"""The paper's four losses as pure functions of network outputs.

Notation follows the paper (Geng et al., AAAI 2021). ``||v||²`` is read as the mean of the
squared entries over the batch (and, for the reconstruction term, over pixels too), which is
how the authors' and ACAI's reference code compute it; it keeps loss scales independent of
batch size and image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def interpolation_critic_loss(
    critic_on_data: Tensor,
    critic_on_data_recon_mix: Tensor,
    critic_on_interpolation: Tensor,
    mixing_coefficient: Tensor,
    target_offset: float,
) -> Tensor:
    """Eq. 9: L_dis = ||d(x)||² + ||d(γx + (1-γ)x̂) − λ||² + ||d(x_μ) − μ − λ||².

    ``critic_on_data`` is d(x), ``critic_on_data_recon_mix`` is d(γx + (1-γ)x̂),
    ``critic_on_interpolation`` is d(x_μ), ``mixing_coefficient`` is μ (one per sample) and
    ``target_offset`` is λ. All critic outputs are shaped (B,).
    """
    real_term = critic_on_data.pow(2).mean()
    recon_mix_term = (critic_on_data_recon_mix - target_offset).pow(2).mean()
    interpolation_term = (critic_on_interpolation - mixing_coefficient - target_offset).pow(2).mean()
    return real_term + recon_mix_term + interpolation_term


def regularized_autoencoder_loss(
    data: Tensor,
    reconstruction: Tensor,
    critic_on_interpolation: Tensor,
    critic_on_reconstruction: Tensor,
    interpolation_weight: float,
    reconstruction_critic_weight: float,
) -> tuple[Tensor, Tensor]:
    """Eq. 10: L_ae = ||x − G(E(x))||² + ω1·||d(x_μ)||² + ω2·||d(x̂)||².

    Returns (total loss, reconstruction term) so the caller can log the reconstruction
    error without recomputing it. ``interpolation_weight`` is ω1 and
    ``reconstruction_critic_weight`` is ω2.
    """
    reconstruction_term = F.mse_loss(reconstruction, data)
    total = (
        reconstruction_term
        + interpolation_weight * critic_on_interpolation.pow(2).mean()
        + reconstruction_critic_weight * critic_on_reconstruction.pow(2).mean()
    )
    return total, reconstruction_term


def latent_discriminator_hinge_loss(
    discriminator_on_embeddings: Tensor, discriminator_on_mapped_prior: Tensor
) -> Tensor:
    """Eq. 12: L_D = E[relu(1 − D(BN(E(x))))] + E[relu(1 + D(g(z)))]."""
    return torch.relu(1.0 - discriminator_on_embeddings).mean() + torch.relu(
        1.0 + discriminator_on_mapped_prior
    ).mean()


def latent_generator_loss(discriminator_on_mapped_prior: Tensor) -> Tensor:
    """Eq. 13: L_g = −E[D(g(z))]."""
    return -discriminator_on_mapped_prior.mean()

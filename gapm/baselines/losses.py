"""Losses of the baselines the paper compares against (VAE, AAE, WAE, IntroVAE, AGE, ALAE),
as pure functions of network outputs.

Conventions (they differ from `gapm.losses` on purpose: each baseline keeps the scale of its own
reference so that its published weights keep their meaning):
- ``||x − x̂||²`` is the squared error *summed* over a sample's entries and averaged over the
  batch, as in the VAE/WAE/IntroVAE references (a per-sample log-likelihood or transport cost).
- Per-sample quantities are returned with shape (B,) where the reference applies a non-linearity
  (a margin, a weight) after averaging; the caller averages.
- Discriminator/critic outputs are logits shaped (B,).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Tolstikhin et al. (2018), public code (wae.py, mmd_penalty): the IMQ kernel is summed over
# these multiples of its base scale C = 2·d_z·σ².
WAE_IMQ_SCALES: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


# --- shared terms --------------------------------------------------------------------------

def squared_error(data: Tensor, reconstruction: Tensor) -> Tensor:
    """``||x − x̂||²``: squared error summed over each sample's entries, averaged over the batch.

    The reconstruction cost c(x, y) = ||x − y||² of WAE (Tolstikhin et al. 2018, Sec. 4), the
    L_AE of IntroVAE (Huang et al. 2018, Sec. 3.1; their code sums over pixels without the ½),
    and −log p(x|z) of a Gaussian decoder with variance ½ up to a constant (VAE).
    """
    return (data - reconstruction).pow(2).flatten(1).sum(1).mean()


def gaussian_kl_to_standard_normal(mean: Tensor, log_variance: Tensor) -> Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_j (μ_j² + σ_j² − log σ_j² − 1), one value per sample (B,).

    Kingma & Welling (2014), Appendix B (the analytic KL of the SGVB estimator, Eq. 10); it is
    also IntroVAE's L_REG (Huang et al. 2018, Sec. 3.1).
    """
    return 0.5 * (mean.pow(2) + log_variance.exp() - log_variance - 1.0).sum(1)


def gan_discriminator_loss(on_real: Tensor, on_fake: Tensor) -> Tensor:
    """−E[log σ(D(real))] − E[log(1 − σ(D(fake)))] on logits = E[softplus(−real)] + E[softplus(fake)].

    Goodfellow et al. (2014), Eq. 1 (the discriminator's side of the value function).
    """
    return F.softplus(-on_real).mean() + F.softplus(on_fake).mean()


def nonsaturating_generator_loss(on_fake: Tensor) -> Tensor:
    """−E[log σ(D(fake))] = E[softplus(−D(fake))]: the non-saturating generator loss
    (Goodfellow et al. 2014, Sec. 3)."""
    return F.softplus(-on_fake).mean()


# --- VAE -----------------------------------------------------------------------------------

def vae_loss(data: Tensor, reconstruction: Tensor, mean: Tensor, log_variance: Tensor,
             kl_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """Negative ELBO (paper Eq. 2; Kingma & Welling 2014, Eq. 10 with the KL of Appendix B),
    with a β weight on the KL as in β-VAE:  ||x − x̂||² + β·KL(q(z|x) ‖ N(0, I)).

    ``reconstruction`` is decoded from one reparameterised sample z = μ + σ·ε. Returns
    (total, reconstruction term, KL term), each averaged over the batch.
    """
    reconstruction_term = squared_error(data, reconstruction)
    kl_term = gaussian_kl_to_standard_normal(mean, log_variance).mean()
    return reconstruction_term + kl_weight * kl_term, reconstruction_term, kl_term


# --- AAE -----------------------------------------------------------------------------------

def aae_autoencoder_loss(data: Tensor, reconstruction: Tensor, discriminator_on_embeddings: Tensor,
                         adversarial_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """Makhzani et al. (2015), Sec. 2: the reconstruction phase (||x − x̂||²) and the generator
    side of the regularisation phase (the encoder fools the latent discriminator, here with the
    non-saturating loss E[softplus(−D(E(x)))]) summed into one update:
    ||x − x̂||² + w_adv·E[softplus(−D(E(x)))]. Returns (total, reconstruction, adversarial)."""
    reconstruction_term = squared_error(data, reconstruction)
    adversarial_term = nonsaturating_generator_loss(discriminator_on_embeddings)
    return (reconstruction_term + adversarial_weight * adversarial_term,
            reconstruction_term, adversarial_term)


def aae_discriminator_loss(discriminator_on_prior: Tensor, discriminator_on_embeddings: Tensor) -> Tensor:
    """Makhzani et al. (2015), Sec. 2: the latent discriminator tells prior samples (positive)
    from embeddings E(x) (negative) with the GAN loss of Goodfellow et al. (2014), Eq. 1."""
    return gan_discriminator_loss(discriminator_on_prior, discriminator_on_embeddings)


# --- WAE-MMD -------------------------------------------------------------------------------

def imq_kernel(first: Tensor, second: Tensor, scales: Sequence[float] = WAE_IMQ_SCALES,
               prior_variance: float = 1.0) -> Tensor:
    """Inverse multiquadratics kernel summed over scales, as a (N, M) matrix:
    k(x, y) = Σ_s C_s / (C_s + ||x − y||²),  C_s = s · 2·d_z·σ²
    (Tolstikhin et al. 2018, Sec. 4 "Experiments": C = 2·d_z·σ² for a N(0, σ²I) prior; the sum
    over scales is from their public code)."""
    squared_distances = torch.cdist(first, second).pow(2)
    base = 2.0 * first.shape[1] * prior_variance
    return sum(base * s / (base * s + squared_distances) for s in scales)


def rbf_kernel(first: Tensor, second: Tensor, scales: Sequence[float] = WAE_IMQ_SCALES,
               prior_variance: float = 1.0) -> Tensor:
    """Gaussian (RBF) kernel summed over the same scales, as a (N, M) matrix:
    k(x, y) = Σ_s exp(−||x − y||² / C_s),  C_s = s · 2·d_z·σ² (Tolstikhin et al. 2018 report
    WAE-MMD with both kernels; the RBF one has lighter tails)."""
    squared_distances = torch.cdist(first, second).pow(2)
    base = 2.0 * first.shape[1] * prior_variance
    return sum(torch.exp(-squared_distances / (base * s)) for s in scales)


WAE_KERNELS = {"imq": imq_kernel, "rbf": rbf_kernel}


def mmd_imq(prior_samples: Tensor, embeddings: Tensor, scales: Sequence[float] = WAE_IMQ_SCALES,
            prior_variance: float = 1.0, kernel: str = "imq") -> Tensor:
    """Unbiased estimate of MMD²_k(P_Z, Q_Z) (Tolstikhin et al. 2018, Algorithm 2):
    1/(n(n−1)) Σ_{l≠j} k(z_l, z_j) + 1/(n(n−1)) Σ_{l≠j} k(z̃_l, z̃_j) − 2/n² Σ_{l,j} k(z_l, z̃_j),
    z ~ P_Z (``prior_samples``), z̃ = E(x) (``embeddings``); both (n, d_z) with n ≥ 2.
    ``kernel``: "imq" (default) or "rbf"."""
    k = WAE_KERNELS[kernel]
    n = prior_samples.shape[0]
    off_diagonal = 1.0 - torch.eye(n, device=prior_samples.device, dtype=prior_samples.dtype)
    prior_term = (k(prior_samples, prior_samples, scales, prior_variance) * off_diagonal).sum()
    embedding_term = (k(embeddings, embeddings, scales, prior_variance) * off_diagonal).sum()
    cross_term = k(prior_samples, embeddings, scales, prior_variance).sum()
    return (prior_term + embedding_term) / (n * (n - 1)) - 2.0 * cross_term / n**2


def wae_mmd_loss(data: Tensor, reconstruction: Tensor, prior_samples: Tensor, embeddings: Tensor,
                 mmd_weight: float, scales: Sequence[float] = WAE_IMQ_SCALES,
                 prior_variance: float = 1.0, kernel: str = "imq") -> tuple[Tensor, Tensor, Tensor]:
    """WAE objective with D_Z = MMD (paper Eq. 6; Tolstikhin et al. 2018, Eq. 4 and Algorithm 2):
    ||x − G(E(x))||² + λ·MMD²_k(P_Z, Q_Z). Returns (total, reconstruction, MMD)."""
    reconstruction_term = squared_error(data, reconstruction)
    mmd_term = mmd_imq(prior_samples, embeddings, scales, prior_variance, kernel)
    return reconstruction_term + mmd_weight * mmd_term, reconstruction_term, mmd_term


# --- IntroVAE ------------------------------------------------------------------------------

def introvae_encoder_loss(kl_real: Tensor, kl_reconstructed: Tensor, kl_sampled: Tensor,
                          reconstruction_error: Tensor, alpha: float, beta: float,
                          margin: float) -> Tensor:
    """Huang et al. (2018), the encoder's objective (Sec. 3.3, Algorithm 1):
    L_E = L_REG(z) + α·Σ_{s=r,p} [m − L_REG(Enc(ng(x_s)))]⁺ + β·L_AE(x, x_r).

    Arguments are batch means: ``kl_real`` = L_REG(Enc(x)), ``kl_reconstructed`` and
    ``kl_sampled`` = L_REG of the encodings of the (detached) reconstruction x_r and prior
    sample x_p, ``reconstruction_error`` = L_AE. As in the authors' code, the hinge is applied to
    the batch-mean KL.
    """
    hinge = torch.relu(margin - kl_reconstructed) + torch.relu(margin - kl_sampled)
    return kl_real + alpha * hinge + beta * reconstruction_error


def introvae_decoder_loss(kl_reconstructed: Tensor, kl_sampled: Tensor, reconstruction_error: Tensor,
                          alpha: float, beta: float) -> Tensor:
    """Huang et al. (2018), the generator's objective (Sec. 3.3, Algorithm 1):
    L_G = α·Σ_{s=r,p} L_REG(Enc(x_s)) + β·L_AE(x, x_r), with the encoder fixed."""
    return alpha * (kl_reconstructed + kl_sampled) + beta * reconstruction_error


# --- AGE -----------------------------------------------------------------------------------

def age_batch_kl(latents: Tensor, eps: float = 1e-8) -> Tensor:
    """Δ(Q ‖ N(0, I)) as AGE estimates it (Ulyanov et al. 2017, Sec. 3, "parametric" KL): fit
    N(m, diag s²) to the batch (biased per-dimension mean and variance) and return
    KL(N(m, diag s²) ‖ N(0, I)) per dimension, (s_j² + m_j²)/2 − log s_j − ½, averaged over the
    dimensions j (the authors' code averages rather than sums, so their loss weights apply).
    ``eps`` keeps log s finite for a collapsed batch. Note: the authors' code (KLN01Loss) puts the
    variance where the paper has s_j; we follow the paper."""
    mean = latents.mean(0)
    variance = (latents - mean).pow(2).mean(0)
    return ((variance + mean.pow(2)) / 2 - 0.5 * torch.log(variance + eps) - 0.5).mean()


def age_encoder_loss(kl_real: Tensor, kl_fake: Tensor, data: Tensor, reconstruction: Tensor,
                     reconstruction_weight: float) -> tuple[Tensor, Tensor]:
    """Ulyanov et al. (2017), the encoder's side of the game (Sec. 3): e maximises
    V = Δ(e(g(Z)) ‖ Y) − Δ(e(X) ‖ Y), plus the data-space reconstruction ||x − g(e(x))||₁ (L1 mean
    over entries, as their `match_x` L1):  Δ(e(X)) − Δ(e(g(Z))) + λ_X·||x − g(e(x))||₁.
    Returns (total, reconstruction term)."""
    reconstruction_term = (data - reconstruction).abs().mean()
    return kl_real - kl_fake + reconstruction_weight * reconstruction_term, reconstruction_term


def age_decoder_loss(kl_fake: Tensor, prior: Tensor, recovered_prior: Tensor,
                     latent_weight: float) -> tuple[Tensor, Tensor]:
    """Ulyanov et al. (2017), the generator's side (Sec. 3): g minimises V, i.e. Δ(e(g(Z)) ‖ Y), plus
    the latent reconstruction ||z − e(g(z))||² (squared error averaged over entries):
    Δ(e(g(Z))) + λ_Z·||z − e(g(z))||². Returns (total, latent reconstruction term)."""
    latent_term = (prior - recovered_prior).pow(2).mean()
    return kl_fake + latent_weight * latent_term, latent_term


# --- ALAE ----------------------------------------------------------------------------------

def r1_penalty(real_gradients: Tensor) -> Tensor:
    """E[||∇_x D(x)||²] over real x: squared gradient norm per sample, averaged over the batch
    (Mescheder et al. 2018, Eq. 9, without the γ/2)."""
    return real_gradients.pow(2).flatten(1).sum(1).mean()


def alae_discriminator_loss(on_real: Tensor, on_fake: Tensor, real_gradients: Tensor,
                            r1_gamma: float) -> Tensor:
    """Pidhorskyi et al. (2020), Algorithm 1, L_adv^{E,D}:
    E[softplus(D∘E∘G∘F(z))] + E[softplus(−D∘E(x))] + γ/2·E[||∇_x D∘E(x)||²]."""
    return gan_discriminator_loss(on_real, on_fake) + 0.5 * r1_gamma * r1_penalty(real_gradients)


def alae_latent_reconstruction(mapped_prior: Tensor, recovered: Tensor) -> Tensor:
    """Pidhorskyi et al. (2020), Algorithm 1, L_err^{E,G} = ||F(z) − E∘G∘F(z)||² (averaged over
    entries, as in their code)."""
    return (mapped_prior - recovered).pow(2).mean()

"""The paper's baselines — VAE, AAE, WAE-MMD, IntroVAE, AGE (Table 1) and ALAE (Fig. 4–5) —
built from GAPM's own networks ("we apply the same architectures", paper Sec. Experiments), so
every method runs on 2-D points and on 28×28, 32×32 and 64×64 images.

Every method, GAPM included, is driven by the training loop through one protocol:

    kind: str                  "vae", "aae", "wae", "introvae", "age", "alae" (and "gapm")
    stages: list[list[str]]    per stage (0-based), the names of the submodules trained in it;
                               each name is a direct submodule attribute and gets its own optimizer
    stage_step(stage, trained, data, update) -> dict[str, float]
        `trained` maps each name of the stage to the module to call for forward passes that
        produce gradients (possibly a DistributedDataParallel wrapper of getattr(self, name));
        `self.<name>` is the unwrapped module, used for extra forwards whose parameters must not
        get gradients (inside `gapm.steps.frozen`). `update(name, loss)` owns backward and the
        optimizer step (`gapm.steps.plain_update` outside the pipeline). `data` is in model
        space: points as given, images in [-1, 1]. Returns the losses as floats.

Within one `update(name, loss)`, every trained network that ran a forward with gradients is
called exactly once, all its parameters receive gradients from that loss, and no other
network's parameters receive any (extra forwards run on the unwrapped module, frozen or under
no_grad). That is what DistributedDataParallel needs without `find_unused_parameters`, and what
`plain_update` needs since it only zeroes the gradients of the network it steps.

The user API matches `gapm.model.GAPM` (no gradients; the caller chooses eval mode): encode,
decode, reconstruct, prior_sample, sample_latents, sample, interpolate.

The prior is N(0, I) in the latent space itself (latent_dim) for VAE, AAE, WAE and IntroVAE —
they match the prior there directly, which is the paper's point — and for AGE normalised onto
the unit sphere as in its reference. ALAE maps N(0, I) of prior_dim through its mapping network F.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gapm import baseline_losses as losses
from gapm import networks
from gapm.model import GAPM, Autoencoder, ModelShape, interpolate_latents
from gapm.steps import Update, frozen


# --- networks shared by several baselines --------------------------------------------------

class GaussianEncoder(nn.Module):
    """x -> (mean, log-variance) of q(z|x): the shared encoder with 2·latent_dim outputs."""

    def __init__(self, data_shape: Sequence[int], latent_dim: int, width: int):
        super().__init__()
        self.body = networks.build_encoder(data_shape, 2 * latent_dim, width)

    def forward(self, data: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_variance = self.body(data).chunk(2, dim=1)
        return mean, log_variance


class VariationalAutoencoder(nn.Module):
    """Gaussian encoder and decoder; one forward returns (mean, log-variance, reconstruction of
    one reparameterised sample)."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.encoder = GaussianEncoder(shape.data_shape, shape.latent_dim, shape.width)
        self.decoder = networks.build_decoder(shape.data_shape, shape.latent_dim, shape.width)

    def forward(self, data: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, log_variance = self.encoder(data)
        return mean, log_variance, self.decoder(reparameterize(mean, log_variance, torch.randn_like(mean)))


class SphereEncoder(nn.Module):
    """AGE's encoder: the shared encoder, its output projected onto the unit sphere."""

    def __init__(self, data_shape: Sequence[int], latent_dim: int, width: int):
        super().__init__()
        self.body = networks.build_encoder(data_shape, latent_dim, width)

    def forward(self, data: Tensor) -> Tensor:
        return F.normalize(self.body(data), dim=1)


class ScoreMLP(nn.Module):
    """Vector -> logit (B,): a plain MLP."""

    def __init__(self, in_features: int, widths: Sequence[int]):
        super().__init__()
        self.net = networks.mlp(in_features, widths, 1)

    def forward(self, latent: Tensor) -> Tensor:
        return self.net(latent).squeeze(1)


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
        self.head = ScoreMLP(shape.latent_dim, shape.latent_discriminator_widths)

    def forward(self, data: Tensor) -> tuple[Tensor, Tensor]:
        latent = self.encoder(data)
        return latent, self.head(latent)


def reparameterize(mean: Tensor, log_variance: Tensor, noise: Tensor) -> Tensor:
    """z = μ + σ·ε (Kingma & Welling 2014, Sec. 2.4)."""
    return mean + (0.5 * log_variance).exp() * noise


def require_positive_steps(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def split_pairs(tensors: Sequence[Tensor], sizes: Sequence[int]) -> list[tuple[Tensor, ...]]:
    """Splits each tensor along the batch into `sizes`; returns one tuple per part."""
    return list(zip(*(t.split(list(sizes)) for t in tensors)))


# --- the common model interface ------------------------------------------------------------

class BaselineModel(nn.Module):
    """Shared user API and protocol checks; subclasses set `kind`, `stages`, `Hyperparameters`,
    build their networks and implement `stage_step` and the `_encode`/`_decode` hooks."""

    kind: ClassVar[str]
    stages: ClassVar[list[list[str]]]
    Hyperparameters: ClassVar[type]

    def __init__(self, shape: ModelShape, **hyperparameters: Any):
        super().__init__()
        self.shape = shape
        self.hp = self.Hyperparameters(**hyperparameters)

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return dataclasses.asdict(self.hp)

    @property
    def prior_dim(self) -> int:
        return self.shape.latent_dim

    def check_stage(self, stage: int, trained: Mapping[str, nn.Module]) -> None:
        if not 0 <= stage < len(self.stages):
            raise ValueError(f"{self.kind} has stages 0..{len(self.stages) - 1}, not {stage}")
        if set(trained) != set(self.stages[stage]):
            raise ValueError(f"{self.kind} stage {stage} trains {self.stages[stage]}, "
                             f"got networks {sorted(trained)}")

    def stage_step(self, stage: int, trained: Mapping[str, nn.Module], data: Tensor,
                   update: Update) -> dict[str, float]:
        raise NotImplementedError

    # Hooks on the unwrapped networks.
    def _encode(self, data: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode(self, latent: Tensor) -> Tensor:
        raise NotImplementedError

    def _latent_from_prior(self, prior: Tensor) -> Tensor:
        return prior

    def _mix(self, first: Tensor, second: Tensor, coefficient: Tensor) -> Tensor:
        return interpolate_latents(first, second, coefficient)

    def _prior(self, count: int, device: torch.device) -> Tensor:
        return torch.randn(count, self.prior_dim, device=device)

    # The user-facing API: no gradients; eval/train mode is the caller's choice, as for GAPM.

    @torch.no_grad()
    def encode(self, data: Tensor) -> Tensor:
        return self._encode(data)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        return self._decode(latent)

    @torch.no_grad()
    def reconstruct(self, data: Tensor) -> Tensor:
        return self._decode(self._encode(data))

    def prior_sample(self, count: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
        device = device or next(self.parameters()).device
        return torch.randn(count, self.prior_dim, generator=generator, device=device)

    @torch.no_grad()
    def sample_latents(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        return self._latent_from_prior(self.prior_sample(count, generator))

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        return self._decode(self.sample_latents(count, generator))

    @torch.no_grad()
    def interpolate(self, first: Tensor, second: Tensor, steps: int = 8) -> Tensor:
        """Decodes `steps` evenly spaced mixes of the embeddings of two batches:
        returns (steps, B, ...) from `first` (μ=1) to `second` (μ=0)."""
        latent_first, latent_second = self._encode(first), self._encode(second)
        frames = []
        for mu in torch.linspace(1.0, 0.0, steps):
            coefficient = torch.full((len(first),), float(mu), device=latent_first.device)
            frames.append(self._decode(self._mix(latent_first, latent_second, coefficient)))
        return torch.stack(frames)


# --- VAE -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAEHyperparameters:
    # β on the KL term; 1 is the plain VAE (Kingma & Welling 2014). With the summed squared
    # error, β·KL is a Gaussian decoder of variance β/2: for data of small scale (the swiss roll
    # in about [-1, 1.5]) β = 1 collapses the posterior, so lower it there.
    kl_weight: float = 1.0


class VAE(BaselineModel):
    """Variational autoencoder (Kingma & Welling 2014): Gaussian q(z|x), Gaussian decoder,
    loss = ||x − x̂||² + β·KL(q(z|x) ‖ N(0, I)) (`baseline_losses.vae_loss`). One update per step.
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


# --- AAE -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AAEHyperparameters:
    adversarial_weight: float = 1.0  # weight of the encoder's adversarial term vs ||x − x̂||²
    discriminator_steps: int = 1  # latent-discriminator updates per autoencoder update

    def __post_init__(self) -> None:
        require_positive_steps("discriminator_steps", self.discriminator_steps)


class AAE(BaselineModel):
    """Adversarial autoencoder (Makhzani et al. 2015), deterministic encoder: a latent
    discriminator (GAPM's D, paper: same architectures) tells N(0, I) samples from E(x) with the
    GAN loss; the autoencoder minimises ||x − x̂||² + w_adv·softplus(−D(E(x))). The paper's two
    phases (reconstruction, then regularisation of the encoder) are summed into one update."""

    kind = "aae"
    stages = [["autoencoder", "latent_discriminator"]]
    Hyperparameters = AAEHyperparameters

    def __init__(self, shape: ModelShape, **hyperparameters: Any):
        super().__init__(shape, **hyperparameters)
        self.autoencoder = Autoencoder(dataclasses.replace(shape, latent_norm=False))
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

    def _encode(self, data: Tensor) -> Tensor:
        return self.autoencoder.encode(data)

    def _decode(self, latent: Tensor) -> Tensor:
        return self.autoencoder.decoder(latent)


# --- WAE-MMD -------------------------------------------------------------------------------

@dataclass(frozen=True)
class WAEHyperparameters:
    mmd_weight: float = 10.0  # λ (Tolstikhin et al. 2018 use 10 on MNIST, 100 on CelebA)
    kernel_scales: tuple[float, ...] = losses.WAE_IMQ_SCALES  # multiples of C = 2·d_z·σ²
    prior_variance: float = 1.0  # σ² of the N(0, σ²I) prior
    kernel: str = "imq"  # "imq" (inverse multiquadratics, the authors' choice) or "rbf"

    def __post_init__(self) -> None:
        if self.kernel not in losses.WAE_KERNELS:
            raise ValueError(f"kernel must be one of {sorted(losses.WAE_KERNELS)}, got {self.kernel!r}")


class WAE(BaselineModel):
    """Wasserstein autoencoder with the MMD penalty (Tolstikhin et al. 2018, Algorithm 2):
    deterministic encoder, loss ||x − x̂||² + λ·MMD²_IMQ(P_Z, Q_Z) over one batch of prior
    samples and the batch's embeddings. One update per step."""

    kind = "wae"
    stages = [["autoencoder"]]
    Hyperparameters = WAEHyperparameters

    def __init__(self, shape: ModelShape, **hyperparameters: Any):
        super().__init__(shape, **hyperparameters)
        self.autoencoder = Autoencoder(dataclasses.replace(shape, latent_norm=False))

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

    def _encode(self, data: Tensor) -> Tensor:
        return self.autoencoder.encode(data)

    def _decode(self, latent: Tensor) -> Tensor:
        return self.autoencoder.decoder(latent)


# --- IntroVAE ------------------------------------------------------------------------------

@dataclass(frozen=True)
class IntroVAEHyperparameters:
    # Defaults from the authors' CelebA-HQ 256 run (hhb072/IntroVAE run_256.sh: weight_neg 0.5,
    # halved in main.py, so α = 0.25; weight_rec 0.05 = β; m_plus 120 for a 512-d latent and
    # images in [0, 1]). The margin grows with the latent size: set it per experiment.
    alpha: float = 0.25  # α, weight of the adversarial (introspective) KL terms
    beta: float = 0.05  # β, weight of L_AE = ||x − x_r||²
    margin: float = 120.0  # m, hinge margin on L_REG of generated samples


class IntroVAE(BaselineModel):
    """Introspective VAE (Huang et al. 2018, Algorithm 1): the encoder is also the discriminator.
    Per step: one encoder update on L_E, then one decoder update on L_G with the encoder fixed
    (evaluated by the just-updated encoder, as in the authors' code). No VAE warm-up epochs."""

    kind = "introvae"
    stages = [["encoder", "decoder"]]
    Hyperparameters = IntroVAEHyperparameters

    def __init__(self, shape: ModelShape, **hyperparameters: Any):
        super().__init__(shape, **hyperparameters)
        self.encoder = GaussianEncoder(shape.data_shape, shape.latent_dim, shape.width)
        self.decoder = networks.build_decoder(shape.data_shape, shape.latent_dim, shape.width)

    def stage_step(self, stage: int, trained: Mapping[str, nn.Module], data: Tensor,
                   update: Update) -> dict[str, float]:
        self.check_stage(stage, trained)
        batch = len(data)
        noise = torch.randn(batch, self.shape.latent_dim, device=data.device)
        prior = self._prior(batch, data.device)
        # x_r and x_p for the encoder's "fake" inputs, without gradients, so the wrapped encoder
        # runs once on [x, ng(x_r), ng(x_p)]. The same ε makes this x_r the one L_AE sees below.
        with torch.no_grad():
            mean, log_variance = self.encoder(data)
            decoded = self.decoder(torch.cat([reparameterize(mean, log_variance, noise), prior]))
        means, log_variances = trained["encoder"](torch.cat([data, decoded]))
        (mean, log_variance), (mean_fake, log_variance_fake) = split_pairs(
            [means.float(), log_variances.float()], [batch, 2 * batch])
        latent = reparameterize(mean, log_variance, noise)
        with frozen(self.decoder):
            reconstruction = self.decoder(latent).float()
        kl_fake = losses.gaussian_kl_to_standard_normal(mean_fake, log_variance_fake)
        kl_real = losses.gaussian_kl_to_standard_normal(mean, log_variance).mean()
        reconstruction_error = losses.squared_error(data, reconstruction)
        encoder_loss = losses.introvae_encoder_loss(
            kl_real, kl_fake[:batch].mean(), kl_fake[batch:].mean(), reconstruction_error,
            self.hp.alpha, self.hp.beta, self.hp.margin)
        update("encoder", encoder_loss)

        generated = trained["decoder"](torch.cat([latent.detach(), prior])).float()
        reconstruction = generated[:batch]
        with frozen(self.encoder):
            means, log_variances = self.encoder(generated)
        kl_generated = losses.gaussian_kl_to_standard_normal(means.float(), log_variances.float())
        reconstruction_error = losses.squared_error(data, reconstruction)
        decoder_loss = losses.introvae_decoder_loss(
            kl_generated[:batch].mean(), kl_generated[batch:].mean(), reconstruction_error,
            self.hp.alpha, self.hp.beta)
        update("decoder", decoder_loss)
        return {"encoder_loss": encoder_loss.item(), "decoder_loss": decoder_loss.item(),
                "kl_real": kl_real.item(), "kl_reconstructed": kl_generated[:batch].mean().item(),
                "kl_sampled": kl_generated[batch:].mean().item(),
                "reconstruction_error": reconstruction_error.item(),
                "reconstruction_mse": F.mse_loss(reconstruction.detach(), data).item()}

    def _encode(self, data: Tensor) -> Tensor:
        return self.encoder(data)[0]

    def _decode(self, latent: Tensor) -> Tensor:
        return self.decoder(latent)


# --- AGE -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AGEHyperparameters:
    # Defaults from the authors' CelebA/CIFAR-10 commands (DmitryUlyanov/AGE README):
    # e_updates '1;KL_fake:1,KL_real:1,match_x:10', g_updates '2;KL_fake:1,match_z:1000' with
    # match_z = cos. On the unit sphere their cos match 2 − mean(ẑ·z) equals half the mean squared
    # error plus a constant, so weight 1000 there is 500 here.
    reconstruction_weight: float = 10.0  # λ_X on ||x − g(e(x))||₁ (encoder)
    latent_weight: float = 500.0  # λ_Z on ||z − e(g(z))||² (generator)
    decoder_steps: int = 2  # generator updates per encoder update

    def __post_init__(self) -> None:
        require_positive_steps("decoder_steps", self.decoder_steps)


class AGE(BaselineModel):
    """Adversarial generator-encoder networks (Ulyanov et al. 2017): no discriminator; the
    encoder (onto the unit sphere) and the generator play a game on the KL of the batch latent
    statistics to N(0, I). Per step: one encoder update, then `decoder_steps` generator updates.
    The prior is N(0, I) normalised onto the sphere (uniform on the sphere)."""

    kind = "age"
    stages = [["encoder", "decoder"]]
    Hyperparameters = AGEHyperparameters

    def __init__(self, shape: ModelShape, **hyperparameters: Any):
        super().__init__(shape, **hyperparameters)
        self.encoder = SphereEncoder(shape.data_shape, shape.latent_dim, shape.width)
        self.decoder = networks.build_decoder(shape.data_shape, shape.latent_dim, shape.width)

    def _prior(self, count: int, device: torch.device) -> Tensor:
        return F.normalize(torch.randn(count, self.prior_dim, device=device), dim=1)

    def _latent_from_prior(self, prior: Tensor) -> Tensor:
        return F.normalize(prior, dim=1)

    def _mix(self, first: Tensor, second: Tensor, coefficient: Tensor) -> Tensor:
        # The generator only ever sees points on the sphere.
        return F.normalize(interpolate_latents(first, second, coefficient), dim=1)

    def stage_step(self, stage: int, trained: Mapping[str, nn.Module], data: Tensor,
                   update: Update) -> dict[str, float]:
        self.check_stage(stage, trained)
        batch = len(data)
        with torch.no_grad():
            generated = self.decoder(self._prior(batch, data.device))
        latents = trained["encoder"](torch.cat([data, generated])).float()
        latent_real, latent_fake = latents.split(batch)
        with frozen(self.decoder):
            reconstruction = self.decoder(latent_real).float()
        kl_real, kl_fake = losses.age_batch_kl(latent_real), losses.age_batch_kl(latent_fake)
        encoder_loss, reconstruction_term = losses.age_encoder_loss(
            kl_real, kl_fake, data, reconstruction, self.hp.reconstruction_weight)
        update("encoder", encoder_loss)

        for _ in range(self.hp.decoder_steps):
            prior = self._prior(batch, data.device)
            generated = trained["decoder"](prior)
            with frozen(self.encoder):
                recovered = self.encoder(generated).float()
            kl_generated = losses.age_batch_kl(recovered)
            decoder_loss, latent_term = losses.age_decoder_loss(
                kl_generated, prior, recovered, self.hp.latent_weight)
            update("decoder", decoder_loss)
        return {"encoder_loss": encoder_loss.item(), "decoder_loss": decoder_loss.item(),
                "kl_real": kl_real.item(), "kl_fake": kl_fake.item(),
                "reconstruction_l1": reconstruction_term.item(),
                "latent_reconstruction": latent_term.item(),
                "reconstruction_mse": F.mse_loss(reconstruction.detach(), data).item()}

    def _encode(self, data: Tensor) -> Tensor:
        return self.encoder(data)

    def _decode(self, latent: Tensor) -> Tensor:
        return self.decoder(latent)


# --- ALAE ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ALAEHyperparameters:
    r1_gamma: float = 10.0  # γ of the R1 penalty (ALAE's default config)
    latent_weight: float = 1.0  # weight of L_err = ||F(z) − E(G(F(z)))||²


class ALAE(BaselineModel):
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


# --- registry ------------------------------------------------------------------------------

METHODS: dict[str, type[nn.Module]] = {
    "gapm": GAPM, "vae": VAE, "aae": AAE, "wae": WAE, "introvae": IntroVAE, "age": AGE, "alae": ALAE,
}


def build_model(kind: str, shape: ModelShape, **hyperparameters: Any) -> nn.Module:
    """The model for `kind` (a key of METHODS) built for `shape`. Unknown hyper-parameters raise
    TypeError naming them; each baseline's `Hyperparameters` dataclass lists the valid ones."""
    if kind not in METHODS:
        raise ValueError(f"unknown method {kind!r}: expected one of {sorted(METHODS)}")
    return METHODS[kind](shape, **hyperparameters)


__all__ = [
    "AAE", "AGE", "ALAE", "AAEHyperparameters", "AGEHyperparameters", "ALAEHyperparameters",
    "BaselineModel", "IntroVAE", "IntroVAEHyperparameters", "METHODS", "VAE", "VAEHyperparameters",
    "WAE", "WAEHyperparameters", "build_model",
]

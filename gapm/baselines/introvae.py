"""IntroVAE (Huang et al. 2018), a baseline of the paper's Table 1, on GAPM's networks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gapm import networks
from gapm.baselines import losses
from gapm.baselines.families import EncoderDecoderMethod
from gapm.method import Update, frozen
from gapm.shape import ModelShape


def split_pairs(tensors: Sequence[Tensor], sizes: Sequence[int]) -> list[tuple[Tensor, ...]]:
    """Splits each tensor along the batch into `sizes`; returns one tuple per part."""
    return list(zip(*(t.split(list(sizes)) for t in tensors)))


@dataclass(frozen=True)
class IntroVAEHyperparameters:
    # Defaults from the authors' CelebA-HQ 256 run (hhb072/IntroVAE run_256.sh: weight_neg 0.5,
    # halved in main.py, so α = 0.25; weight_rec 0.05 = β; m_plus 120 for a 512-d latent and
    # images in [0, 1]). The margin grows with the latent size: set it per experiment.
    alpha: float = 0.25  # α, weight of the adversarial (introspective) KL terms
    beta: float = 0.05  # β, weight of L_AE = ||x − x_r||²
    margin: float = 120.0  # m, hinge margin on L_REG of generated samples


class IntroVAE(EncoderDecoderMethod):
    """Introspective VAE (Huang et al. 2018, Algorithm 1): the encoder is also the discriminator.
    Per step: one encoder update on L_E, then one decoder update on L_G with the encoder fixed
    (evaluated by the just-updated encoder, as in the authors' code). No VAE warm-up epochs."""

    kind = "introvae"
    Hyperparameters = IntroVAEHyperparameters

    def build_encoder(self, shape: ModelShape) -> nn.Module:
        return networks.GaussianEncoder(shape.data_shape, shape.latent_dim, shape.width)

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
            decoded = self.decoder(torch.cat([networks.reparameterize(mean, log_variance, noise), prior]))
        means, log_variances = trained["encoder"](torch.cat([data, decoded]))
        (mean, log_variance), (mean_fake, log_variance_fake) = split_pairs(
            [means.float(), log_variances.float()], [batch, 2 * batch])
        latent = networks.reparameterize(mean, log_variance, noise)
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

"""AGE (Ulyanov et al. 2017), a baseline of the paper's Table 1, on GAPM's networks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gapm import networks
from gapm.baselines import losses
from gapm.baselines.families import EncoderDecoderMethod
from gapm.method import (
    Update,
    frozen,
    interpolate_latents,
    require_positive_steps,
)
from gapm.shape import ModelShape


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


class AGE(EncoderDecoderMethod):
    """Adversarial generator-encoder networks (Ulyanov et al. 2017): no discriminator; the
    encoder (onto the unit sphere) and the generator play a game on the KL of the batch latent
    statistics to N(0, I). Per step: one encoder update, then `decoder_steps` generator updates.
    The prior is N(0, I) normalised onto the sphere (uniform on the sphere)."""

    kind = "age"
    Hyperparameters = AGEHyperparameters

    def build_encoder(self, shape: ModelShape) -> nn.Module:
        return networks.SphereEncoder(shape.data_shape, shape.latent_dim, shape.width)

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

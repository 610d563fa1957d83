"""What several baselines share: the networks they are built from and how they encode and
decode. Each family builds its networks in the same order and under the same names as its
methods always have, so their checkpoints' weights keep their keys."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from gapm import networks
from gapm.method import MethodBase
from gapm.model import Autoencoder
from gapm.shape import ModelShape


class PlainAutoencoderMethod(MethodBase):
    """A method on GAPM's autoencoder without the latent BatchNorm (AAE, WAE): it matches the
    prior in the latent space itself, so nothing may normalise the embeddings."""

    def __init__(self, shape: ModelShape, **hyperparameters: Any):
        super().__init__(shape, **hyperparameters)
        self.autoencoder = Autoencoder(dataclasses.replace(shape, latent_norm=False))

    def _encode(self, data: Tensor) -> Tensor:
        return self.autoencoder.encode(data)

    def _decode(self, latent: Tensor) -> Tensor:
        return self.autoencoder.decoder(latent)


class EncoderDecoderMethod(MethodBase):
    """A method that trains its encoder and decoder as two networks of its one stage, each
    with its own loss (IntroVAE, AGE); `build_encoder` says which encoder."""

    stages = [["encoder", "decoder"]]

    def __init__(self, shape: ModelShape, **hyperparameters: Any):
        super().__init__(shape, **hyperparameters)
        self.encoder = self.build_encoder(shape)
        self.decoder = networks.build_decoder(shape.data_shape, shape.latent_dim, shape.width)

    def build_encoder(self, shape: ModelShape) -> nn.Module:
        raise NotImplementedError

    def _decode(self, latent: Tensor) -> Tensor:
        return self.decoder(latent)

"""Networks for the two stages: encoder E, decoder G, interpolation critic d (stage 1) and the
latent generator g and latent discriminator D (stage 2).

Two families share one interface:
- points (the paper's 2-D swiss-roll): small MLPs;
- images (28×28 grayscale, 32×32 and 64×64 RGB): ACAI-style convolution stacks that halve
  the resolution with strided convolutions down to 4×4 (7×7 for 28×28), so one builder
  covers every image size the paper uses.
The critic uses the encoder's architecture and averages its output vector to one scalar,
as in ACAI. g and D default to the authors' public code (gengcong940126/AGE,
`models/dcgan32px.py`): g an MLP 400-800-400-400 with BatchNorm and ReLU after every hidden
layer, ending Linear then BatchNorm1d over the latent; D an MLP 400-400-400-64-1 with ReLU and
spectral norm on the hidden layers, the last Linear plain. Their widths, g's output
BatchNorm, D's spectral norm and D's activation are options (`ModelShape`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from gapm.spaces import is_image_shape

IMAGE_SIZES = {28: 2, 32: 3, 64: 4}  # image side -> number of stride-2 downsamplings
SpectralNormLayers = Literal["none", "hidden", "all"]
Activation = Literal["relu", "leaky_relu"]
SPECTRAL_NORM_LAYERS = ("none", "hidden", "all")
ACTIVATIONS = ("relu", "leaky_relu")


def activation_layer(name: Activation) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.2)
    raise ValueError(f"unknown activation {name!r}: expected one of {', '.join(ACTIVATIONS)}")


def mlp(in_features: int, widths: Sequence[int], out_features: int, *, batch_norm: bool = False,
        spectral: SpectralNormLayers = "none", activation: Activation = "leaky_relu") -> nn.Sequential:
    """A plain MLP. `spectral` chooses the linear layers wrapped in spectral normalisation:
    none, the hidden ones, or all including the output layer."""
    if spectral not in SPECTRAL_NORM_LAYERS:
        raise ValueError(f"unknown spectral-norm choice {spectral!r}: expected one of "
                         f"{', '.join(SPECTRAL_NORM_LAYERS)}")
    layers: list[nn.Module] = []
    previous = in_features
    for width in widths:
        linear = nn.Linear(previous, width)
        layers.append(spectral_norm(linear) if spectral != "none" else linear)
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(activation_layer(activation))
        previous = width
    last = nn.Linear(previous, out_features)
    layers.append(spectral_norm(last) if spectral == "all" else last)
    return nn.Sequential(*layers)


def check_image_shape(data_shape: Sequence[int]) -> tuple[int, int]:
    """Returns (channels, side) for a supported (C, H, W) shape, or raises naming the shape."""
    if len(data_shape) != 3 or data_shape[1] != data_shape[2] or data_shape[1] not in IMAGE_SIZES:
        raise ValueError(
            f"unsupported image shape {list(data_shape)}: expected [C, S, S] with S in "
            f"{sorted(IMAGE_SIZES)} (or [2] for points)")
    return int(data_shape[0]), int(data_shape[1])


class ConvEncoder(nn.Module):
    """Image -> vector. Strided 4×4 convolutions double the channels while halving the side."""

    def __init__(self, data_shape: Sequence[int], out_features: int, base_channels: int = 64):
        super().__init__()
        channels, side = check_image_shape(data_shape)
        downsamplings = IMAGE_SIZES[side]
        layers: list[nn.Module] = [nn.Conv2d(channels, base_channels, 3, padding=1), nn.LeakyReLU(0.2)]
        width = base_channels
        for _ in range(downsamplings):
            layers += [nn.Conv2d(width, width * 2, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            width *= 2
        self.features = nn.Sequential(*layers)
        final_side = side // 2**downsamplings
        self.project = nn.Linear(width * final_side * final_side, out_features)

    def forward(self, images: Tensor) -> Tensor:
        return self.project(self.features(images).flatten(1))


class ConvDecoder(nn.Module):
    """Vector -> image in [-1, 1]; the mirror image of ConvEncoder."""

    def __init__(self, data_shape: Sequence[int], in_features: int, base_channels: int = 64):
        super().__init__()
        channels, side = check_image_shape(data_shape)
        downsamplings = IMAGE_SIZES[side]
        self.top_channels = base_channels * 2**downsamplings
        self.top_side = side // 2**downsamplings
        self.project = nn.Linear(in_features, self.top_channels * self.top_side**2)
        layers: list[nn.Module] = [nn.LeakyReLU(0.2)]
        width = self.top_channels
        for _ in range(downsamplings):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            width //= 2
        layers += [nn.Conv2d(width, channels, 3, padding=1), nn.Tanh()]
        self.synthesis = nn.Sequential(*layers)

    def forward(self, latent: Tensor) -> Tensor:
        hidden = self.project(latent).view(-1, self.top_channels, self.top_side, self.top_side)
        return self.synthesis(hidden)


class ScalarCritic(nn.Module):
    """ACAI's critic: the encoder architecture, its output vector averaged to one scalar."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, data: Tensor) -> Tensor:
        return self.body(data).mean(dim=1)


def build_encoder(data_shape: Sequence[int], latent_dim: int, width: int) -> nn.Module:
    if not is_image_shape(data_shape):
        return mlp(data_shape[0], [width, width], latent_dim)
    return ConvEncoder(data_shape, latent_dim, base_channels=width)


def build_decoder(data_shape: Sequence[int], latent_dim: int, width: int) -> nn.Module:
    if not is_image_shape(data_shape):
        return mlp(latent_dim, [width, width], data_shape[0])
    return ConvDecoder(data_shape, latent_dim, base_channels=width)


def build_critic(data_shape: Sequence[int], latent_dim: int, width: int) -> nn.Module:
    if not is_image_shape(data_shape):
        return mlp(data_shape[0], [width, width], 1).append(nn.Flatten(0))
    return ScalarCritic(ConvEncoder(data_shape, latent_dim, base_channels=width))


def build_latent_generator(prior_dim: int, latent_dim: int, widths: Sequence[int],
                           output_norm: bool = True) -> nn.Module:
    """g: prior noise -> latent space. BatchNorm and ReLU after every hidden layer; with
    `output_norm`, a BatchNorm1d (with its affine scale and shift) over the output, as in the
    authors' code: it starts g's outputs with the unit per-coordinate spread of the BN-ed
    embeddings it must match."""
    network = mlp(prior_dim, widths, latent_dim, batch_norm=True, activation="relu")
    if output_norm:
        network.append(nn.BatchNorm1d(latent_dim))
    return network


class LatentDiscriminator(nn.Module):
    """D: latent vector -> realness score (B,), an MLP with spectral normalisation on the
    layers `spectral` names (authors: the hidden ones)."""

    def __init__(self, latent_dim: int, widths: Sequence[int], spectral: SpectralNormLayers = "hidden",
                 activation: Activation = "relu"):
        super().__init__()
        self.net = mlp(latent_dim, widths, 1, spectral=spectral, activation=activation)

    def forward(self, latent: Tensor) -> Tensor:
        return self.net(latent).squeeze(1)


# --- networks the baselines share ---------------------------------------------------------

class GaussianEncoder(nn.Module):
    """x -> (mean, log-variance) of q(z|x): the shared encoder with 2·latent_dim outputs."""

    def __init__(self, data_shape: Sequence[int], latent_dim: int, width: int):
        super().__init__()
        self.body = build_encoder(data_shape, 2 * latent_dim, width)

    def forward(self, data: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_variance = self.body(data).chunk(2, dim=1)
        return mean, log_variance


class SphereEncoder(nn.Module):
    """AGE's encoder: the shared encoder, its output projected onto the unit sphere."""

    def __init__(self, data_shape: Sequence[int], latent_dim: int, width: int):
        super().__init__()
        self.body = build_encoder(data_shape, latent_dim, width)

    def forward(self, data: Tensor) -> Tensor:
        return F.normalize(self.body(data), dim=1)


class ScoreMLP(nn.Module):
    """Vector -> logit (B,): a plain MLP."""

    def __init__(self, in_features: int, widths: Sequence[int]):
        super().__init__()
        self.net = mlp(in_features, widths, 1)

    def forward(self, latent: Tensor) -> Tensor:
        return self.net(latent).squeeze(1)


def reparameterize(mean: Tensor, log_variance: Tensor, noise: Tensor) -> Tensor:
    """z = μ + σ·ε (Kingma & Welling 2014, Sec. 2.4)."""
    return mean + (0.5 * log_variance).exp() * noise


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "GaussianEncoder", "ScoreMLP", "SphereEncoder", "reparameterize",
    "ACTIVATIONS", "SPECTRAL_NORM_LAYERS", "Activation", "SpectralNormLayers", "activation_layer",
    "ConvDecoder", "ConvEncoder", "LatentDiscriminator", "ScalarCritic", "build_critic",
    "build_decoder", "build_encoder", "build_latent_generator", "check_image_shape",
    "count_parameters", "mlp",
]

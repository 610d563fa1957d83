"""The shape of a model: everything needed to rebuild its networks (saved in every checkpoint)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gapm import networks
from gapm.spaces import is_image_shape


@dataclass
class ModelShape:
    """Network sizes and the options that change which parameters exist. Every method builds
    its networks from one of these; the defaults are the authors' (gengcong940126/AGE)."""

    data_shape: list[int] = field(default_factory=lambda: [2])  # [D] points or [C, S, S] images
    latent_dim: int = 128  # embedding size
    prior_dim: int = 128  # dimension of the Gaussian prior that g (or a mapping network) takes
    width: int = 64  # MLP hidden width for points, base channel count for images
    latent_norm: bool = True  # the paper's affine-free latent BatchNorm (ablation: false)
    latent_generator_widths: list[int] = field(default_factory=lambda: [400, 800, 400, 400])  # g's hidden layers
    latent_generator_output_norm: bool = True  # BatchNorm1d over g's output, as the authors
    latent_discriminator_widths: list[int] = field(default_factory=lambda: [400, 400, 400, 64])  # D's hidden layers
    # which of D's layers get spectral norm: the authors' all but the last (hidden), all, or none
    latent_discriminator_spectral_norm: networks.SpectralNormLayers = "hidden"
    latent_discriminator_activation: networks.Activation = "relu"  # D's activation (the authors': relu)

    # What checkpoints written before these options existed were built with.
    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {
        "latent_generator_output_norm": False, "latent_discriminator_spectral_norm": "all",
        "latent_discriminator_activation": "leaky_relu"}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelShape":
        """Rebuilds a shape saved with `dataclasses.asdict`; keys an older version did not
        save take the values that version built."""
        return cls(**{**cls.LEGACY_DEFAULTS, **values})

    @property
    def is_image(self) -> bool:
        return is_image_shape(self.data_shape)

"""What the shape of the data decides, once for everything that trains, samples, scores or
serves a model: whether it is an image model, and the two spaces its data lives in.

Data space is what shards hold and users get back: images in [0, 1], points as they are. Model
space is what the networks see: images in [-1, 1], points unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def is_image_shape(data_shape: Sequence[int]) -> bool:
    """[C, H, W] is an image; [D] is a point of D coordinates (the only other kind)."""
    return len(data_shape) == 3


def to_model_space(batch: Tensor, data_shape: Sequence[int]) -> Tensor:
    """Images arrive in [0, 1]; the networks work in [-1, 1]. Points pass unchanged."""
    return batch * 2 - 1 if is_image_shape(data_shape) else batch


def to_data_space(batch: Tensor, data_shape: Sequence[int]) -> Tensor:
    """The inverse of `to_model_space`, clamped to [0, 1] for images."""
    return ((batch + 1) / 2).clamp(0, 1) if is_image_shape(data_shape) else batch

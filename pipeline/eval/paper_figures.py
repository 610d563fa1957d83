"""The paper's comparison figures, one row per model, from checkpoints.

Images (Fig. 6, the ablation): for each model, 32 samples from the prior, 16 test images above
their reconstructions, and interpolations between test images in the latent space (each row
one pair, from the first image's embedding to the second's).

Points (Fig. 3 and 5, the swiss roll): for each model, its latent space — the held-out data's
embedding (GAPM: after the latent BatchNorm) in one colour and the latents it generates from
the prior (GAPM: g's output; a baseline: the prior itself, which its encoder was trained to
match) in another — beside its data, reconstruction and samples (Fig. 4).

Everything is drawn with a fixed seed from the same test images, so two models' panels show the
same inputs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from gapm import Method, is_image_shape, to_data_space, to_model_space
from pipeline.eval.figures import image_grid

SAMPLES, RECONSTRUCTED, PAIRS, STEPS = 32, 16, 4, 8


@torch.no_grad()
def image_panels(model: Method, test_images: Tensor, seed: int = 0) -> dict[str, np.ndarray]:
    """Samples, test reconstructions and interpolations of one image model, as pictures."""
    shape = list(model.shape.data_shape)
    generator = torch.Generator().manual_seed(seed)
    samples = to_data_space(model.sample(SAMPLES, generator).float(), shape)
    inputs = test_images[:RECONSTRUCTED]
    reconstructions = to_data_space(model.reconstruct(to_model_space(inputs, shape)).float(), shape)
    pairs = to_model_space(test_images[RECONSTRUCTED:RECONSTRUCTED + 2 * PAIRS], shape)
    frames = model.interpolate(pairs[:PAIRS], pairs[PAIRS:], steps=STEPS)  # (steps, pairs, C, H, W)
    interpolations = to_data_space(frames.float(), shape).transpose(0, 1).reshape(-1, *shape)
    # rows of 8 test images, each above the row of their reconstructions
    rows = torch.stack([inputs.view(-1, 8, *shape), reconstructions.view(-1, 8, *shape)], dim=1).reshape(-1, *shape)
    return {"samples": np.asarray(image_grid(samples, 8)),
            "test images / reconstructions": np.asarray(image_grid(rows, 8)),
            "interpolations": np.asarray(image_grid(interpolations, STEPS))}


@torch.no_grad()
def latent_points(model: Method, held_out: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The held-out data's embedding and latents generated from the prior (first two dims)."""
    embedding = model.encode(held_out).float()
    generator = torch.Generator().manual_seed(seed)
    generated = model.sample_latents(len(held_out), generator).float()
    return embedding[:, :2], generated[:, :2]


def _show_image(axis, picture: np.ndarray, title: str) -> None:
    axis.imshow(picture, cmap="gray" if picture.ndim == 2 else None, interpolation="nearest")
    axis.set_title(title, fontsize=9)
    axis.axis("off")


def _scatter(axis, points: Tensor, title: str, **style) -> None:
    seen = [0, 2] if points.shape[1] == 3 else [0, 1]
    axis.scatter(points[:, seen[0]].numpy(), points[:, seen[1]].numpy(), s=2, alpha=0.5, **style)
    axis.set_title(title, fontsize=9)
    axis.set_aspect("equal")


def save_comparison(models: dict[str, Method], held_out: Tensor, path: Path, seed: int = 0) -> None:
    """One row per model (in the given order): image panels or latent + point panels."""
    first = next(iter(models.values()))
    images = is_image_shape(list(first.shape.data_shape))
    columns = 3 if images else 4
    figure, axes = plt.subplots(len(models), columns, figsize=(4 * columns, 3.6 * len(models)), squeeze=False)
    for row, (name, model) in enumerate(models.items()):
        model = model.eval()
        if images:
            for axis, (title, picture) in zip(axes[row], image_panels(model, held_out, seed).items()):
                _show_image(axis, picture, f"{name}: {title}")
            continue
        embedding, generated = latent_points(model, held_out, seed)
        axis = axes[row][0]
        _scatter(axis, embedding, "", label="data embedding", color="tab:blue")
        _scatter(axis, generated, f"{name}: latent space", label="generated latents", color="tab:orange")
        axis.legend(fontsize=7, markerscale=4, loc="upper right")
        generator = torch.Generator().manual_seed(seed)
        panels = (("data", held_out), ("reconstruction", model.reconstruct(held_out).float()),
                  ("generated", model.sample(len(held_out), generator).float()))
        for axis, (title, points) in zip(axes[row][1:], panels):
            _scatter(axis, points, f"{name}: {title}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

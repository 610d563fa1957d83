"""Pictures of a run: the paper's Figure 4 panels for 2-D data, image grids otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor  # noqa: E402


def save_point_panels(data: Tensor, reconstruction: Tensor, generated: Tensor, path: Path,
                      title: str = "") -> None:
    """Input manifold, reconstructed manifold, manifold generated from the prior (Fig. 4).
    3-D points (the authors' roll) are seen along the roll's axis: coordinates 0 and 2."""
    figure, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
    panels = (("input", data), ("reconstruction", reconstruction), ("generated", generated))
    for axis, (name, points) in zip(axes, panels):
        scatter(axis, points)
        axis.set_title(name)
    if title:
        figure.suptitle(title)
    save_figure(figure, path)


def scatter(axis: Any, points: Tensor) -> None:
    """2-D points as they are; 3-D points (the authors' roll) along the roll's axis: coordinates 0 and 2."""
    seen = [0, 2] if points.shape[1] == 3 else [0, 1]
    axis.scatter(points[:, seen[0]].numpy(), points[:, seen[1]].numpy(), s=2, alpha=0.6)
    axis.set_aspect("equal")


def save_figure(figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def image_grid(images: Tensor, columns: int = 8) -> Image.Image:
    """(N, C, H, W) in [0, 1] -> one PIL image, `columns` wide, 2-pixel gaps."""
    count, channels, height, width = images.shape
    rows = (count + columns - 1) // columns
    grid = torch.ones(channels, rows * (height + 2) + 2, columns * (width + 2) + 2)
    for index, image in enumerate(images):
        top, left = 2 + (index // columns) * (height + 2), 2 + (index % columns) * (width + 2)
        grid[:, top:top + height, left:left + width] = image
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if channels == 1 else array)


def save_image_grid(images: Tensor, path: Path, columns: int = 8) -> None:
    image_grid(images, columns).save(path)


def save_point_scatter(points: Tensor, path: Path, title: str = "") -> None:
    """One panel of 2-D points (e.g. `gapm sample` of a swiss-roll model)."""
    figure, axis = plt.subplots(figsize=(5, 5))
    scatter(axis, points)
    if title:
        axis.set_title(title)
    save_figure(figure, path)

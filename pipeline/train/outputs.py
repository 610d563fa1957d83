"""What a finished training leaves in its run directory besides checkpoints: reconstructions
and samples of the trained model (arrays and pictures) and the end-of-training metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gapm import Method
from pipeline.data import sources
from pipeline.data.settings import DataConfig
from pipeline.eval import figures, quality

PICTURES = ("samples.png", "reconstructions.png", "figure4.png")


def write_outputs(model: Method, data: DataConfig, *, seed: int, samples: int, run_dir: Path, title: str,
                  device: torch.device) -> dict[str, float]:
    """Evaluates the trained model on up to `samples` held-out samples of `data.test` and
    `samples` generated ones (seed `seed`); writes recon.npy, samples.npy and the pictures into
    `run_dir` (Figure 4's panels for points, titled `title`, image grids otherwise). Returns
    the metrics."""
    shape = list(model.shape.data_shape)
    held_out = sources.held_out_data(data, seed, limit=samples, data_shape=shape)
    model.to(device)
    metrics, reconstructions, generated = quality.evaluate(model, held_out, samples, seed=seed,
                                                           roll=sources.test_roll(data))
    np.save(run_dir / "recon.npy", reconstructions.numpy())
    np.save(run_dir / "samples.npy", generated.numpy())
    if model.shape.is_image:
        figures.save_image_grid(generated[:64], run_dir / "samples.png")
        paired = torch.stack([held_out[:32], reconstructions[:32]], dim=1).flatten(0, 1)
        figures.save_image_grid(paired, run_dir / "reconstructions.png")
    else:
        figures.save_point_panels(held_out, reconstructions, generated[: len(held_out)],
                                  run_dir / "figure4.png", title=title)
    return metrics


def write_metrics(run_dir: Path, metrics: dict[str, float]) -> None:
    (Path(run_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1))

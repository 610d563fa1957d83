"""What a finished training leaves in its run directory besides checkpoints: reconstructions
and samples of the trained model (arrays and pictures) and the end-of-training metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gapm import Method, is_image_shape
from pipeline.config import ExperimentConfig
from pipeline.data import sources
from pipeline.eval import figures, quality

PICTURES = ("samples.png", "reconstructions.png", "figure4.png")


def write_outputs(model: Method, config: ExperimentConfig, device: torch.device) -> dict[str, float]:
    """Evaluates the trained model on held-out data; writes recon.npy, samples.npy and the
    pictures (Figure 4's panels for points, image grids otherwise). Returns the metrics."""
    run_dir, shape = config.run_dir, config.model.data_shape
    held_out = sources.held_out_data(config.data, config.seed, limit=config.eval.samples, data_shape=shape)
    model.to(device)
    metrics, reconstructions, samples = quality.evaluate(model, held_out, shape, config.eval.samples,
                                                         seed=config.seed, roll=sources.test_roll(config.data))
    np.save(run_dir / "recon.npy", reconstructions.numpy())
    np.save(run_dir / "samples.npy", samples.numpy())
    if is_image_shape(shape):
        figures.save_image_grid(samples[:64], run_dir / "samples.png")
        paired = torch.stack([held_out[:32], reconstructions[:32]], dim=1).flatten(0, 1)
        figures.save_image_grid(paired, run_dir / "reconstructions.png")
    else:
        figures.save_point_panels(held_out, reconstructions, samples[: len(held_out)],
                                  run_dir / "figure4.png", title=config.name)
    return metrics


def write_metrics(run_dir: Path, metrics: dict[str, float]) -> None:
    (Path(run_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1))

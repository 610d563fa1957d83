"""Training on the swiss rolls: the 3-D roll end to end, and the reproduction targets of the
shipped swiss-roll recipe (slow; README "Results")."""

import json

import pytest
import torch
from helpers import tiny_config, train

from pipeline.config import load_config


def test_training_on_the_3d_roll_reports_its_coverage(tmp_path):
    config = tiny_config(tmp_path, config="configs/swissroll3d.yaml")
    result = train(config, resume="never")
    for key in ("eval/roll_parameter_tv", "eval/off_roll_fraction", "eval/relative_reconstruction_mse"):
        assert 0.0 <= result.metrics[key] <= 1.0 or key.endswith("mse"), key
    assert (result.run_dir / "figure4.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_the_shipped_recipe_covers_the_whole_roll(tmp_path, threads):
    """README "Results": the shipped configs/swissroll.yaml, seed 0, with one and two threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        config = load_config("configs/swissroll.yaml", [f"output_dir={tmp_path}", "tracking.enabled=false",
                                                        "train.progress_bar=false"])
        metrics = train(config, resume="never").metrics
    finally:
        torch.set_num_threads(previous)
    assert json.loads((config.run_dir / "metrics.json").read_text()) == metrics
    assert metrics["eval/roll_parameter_tv"] < 0.15, metrics
    assert metrics["eval/off_roll_fraction"] < 0.05, metrics
    assert metrics["eval/relative_reconstruction_mse"] < 0.01, metrics

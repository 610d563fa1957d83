"""Experiment matrices (`gapm matrix`): the elements a file expands to, each trained and evaluated
once by subprocesses, skipped when done, resumed when interrupted, and tabled over seeds."""

import csv
import json
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, tiny_overrides

from pipeline.config import ConfigError
from pipeline.matrix import expand, load_matrix, worst_status
from pipeline.matrix_report import count_cost, write_matrix_report

TINY = [o for o in tiny_overrides(stage1_steps=4, stage2_steps=2, batch_size=32, samples=256, test_samples=64,
                                  width=8, checkpoint_every=2, log_every=2, eval_samples=64)
        if "discriminator_steps" not in o]  # a GAPM setting: in the GAPM rows
GAPM_ROW = {"config": str(ROOT / "configs/swissroll.yaml"), "name": "gapm",
            "set": ["model.hyperparameters.discriminator_steps=1"]}


def write_matrix(tmp_path, **changes):
    values = {"name": "roll", "output_dir": str(tmp_path / "runs"), "seeds": [0, 1], "threads": 1, "set": TINY,
              "eval": ["-n", "64", "--no-log"],
              "runs": [{**GAPM_ROW, "sweep": {"model.hyperparameters.mix_gamma": [0.2]}}]}
    values.update(changes)
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def gapm(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd, check=False,
                          timeout=600)


def test_a_matrix_expands_to_the_same_named_elements_everywhere(tmp_path):
    matrix = load_matrix(write_matrix(tmp_path, runs=[
        {**GAPM_ROW, "sweep": {"model.hyperparameters.mix_gamma": [0.1, 0.3], "optimizers.critic.lr": [1e-3]}},
        {"config": str(ROOT / "configs/swissroll-vae.yaml")}]))
    elements = expand(matrix)
    assert [e.name for e in elements] == [
        "gapm-mix_gamma=0.1-lr=0.001-s0", "gapm-mix_gamma=0.1-lr=0.001-s1",
        "gapm-mix_gamma=0.3-lr=0.001-s0", "gapm-mix_gamma=0.3-lr=0.001-s1", "swissroll-vae-s0", "swissroll-vae-s1"]
    assert [e.index for e in elements] == list(range(6))
    assert "model.hyperparameters.mix_gamma=0.3" in elements[2].overrides and "seed=1" in elements[3].overrides
    assert elements[0].row == elements[1].row != elements[2].row


def test_bad_matrix_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_matrix(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"element 0 \(gapm-mix_gama=0.2-s0\): unknown config key "
                                          r"'model\.hyperparameters\.mix_gama'"):
        load_matrix(write_matrix(tmp_path, runs=[{**GAPM_ROW, "sweep": {"model.hyperparameters.mix_gama": [0.2]}}]))
    with pytest.raises(ConfigError, match=r"unknown config key 'seed'"):
        load_matrix(write_matrix(tmp_path, seed=3))
    with pytest.raises(ConfigError, match="distinct seeds"):
        load_matrix(write_matrix(tmp_path, seeds=[1, 1]))
    with pytest.raises(ConfigError, match=r"'runs\[0\]\.config'.*does not exist"):
        load_matrix(write_matrix(tmp_path, runs=[{"config": "configs/nope.yaml"}]))


def test_exit_status_prefers_bad_input_then_resumable():
    assert worst_status([0, 1, 75, 2]) == 2
    assert worst_status([0, 1, 75]) == 75
    assert worst_status([0, 1]) == 1
    assert worst_status([]) == 0


def test_the_cost_of_an_iteration_is_counted_per_network():
    from pipeline.config import load_config

    config = load_config(ROOT / "configs/swissroll.yaml", [*TINY, "model.hyperparameters.critic_steps=2",
                                                           "model.hyperparameters.discriminator_steps=3"])
    cost = count_cost(config)
    assert cost.updates == {"autoencoder": 4, "critic": 8, "latent_generator": 2, "latent_discriminator": 6}
    assert cost.flops_per_iteration[1] > 0 and cost.flops_per_iteration[2] > 0


def test_run_trains_evaluates_reports_and_skips_what_is_done(tmp_path):
    path = write_matrix(tmp_path, seeds=[0])
    first = gapm("matrix", "run", str(path))
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs/roll/gapm-mix_gamma=0.2-s0"
    record = json.loads((run / "eval.json").read_text())
    assert record["step"] == 6 and "eval/test_sample_mmd" in record["metrics"]
    report = (tmp_path / "runs/roll/report/roll.md").read_text()
    assert "| gapm-mix_gamma=0.2 | 0 |" in report
    # updates of the autoencoder, critic (2 per step), D (1 per step) and g
    assert "| 4 | 8 | 2 | 2 |" in report.replace(",", "")
    assert (tmp_path / "runs/roll/report/roll-figures.png").stat().st_size > 10_000  # latent + Fig. 4 panels

    again = gapm("matrix", "run", str(path), "--no-report")
    assert again.returncode == 0 and "element" not in again.stderr + again.stdout  # nothing left to do
    wrong = gapm("matrix", "element", str(path), "--index", "5")
    assert wrong.returncode == 2 and "out of range" in wrong.stderr and wrong.stderr.count("\n") == 1


def test_the_report_gives_mean_and_sample_std_over_seeds(tmp_path):
    matrix = load_matrix(write_matrix(tmp_path))
    for seed, fid in ((0, 10.0), (1, 14.0)):
        run = tmp_path / f"runs/roll/gapm-mix_gamma=0.2-s{seed}"
        run.mkdir(parents=True)
        (run / "eval.json").write_text(json.dumps({"step": 6, "metrics": {"eval/fid": fid}}))
        (run / "metrics.json").write_text(json.dumps({"eval/reconstruction_mse": 0.5}))
        (run / "matrix-element.json").write_text(json.dumps({"train_seconds": 100.0 + seed * 20}))
    written = write_matrix_report(matrix, None, tmp_path / "report")
    rows = list(csv.reader(written["csv"].read_text().splitlines()))
    header, row = rows[0], rows[1]
    assert row[header.index("eval/fid")] == "12.0 ± 2.8"  # sample std of (10, 14): 2.83
    assert row[header.index("eval/reconstruction_mse")] == "0.500 ± 0.000"
    assert row[header.index("train seconds")] == "110 ± 14"
    assert row[header.index("seeds")] == "0,1"


@pytest.mark.slow  # four training and evaluation subprocesses
def test_an_interrupted_element_resumes_and_is_evaluated_again(tmp_path):
    path = write_matrix(tmp_path)
    first = gapm("matrix", "run", str(path), "--no-report")
    assert first.returncode == 0, first.stderr[-3000:]
    runs = tmp_path / "runs/roll"
    # Seed 1 as if killed after its checkpoint at step 2: the rerun resumes it and evaluates it again.
    interrupted = runs / "gapm-mix_gamma=0.2-s1"
    (interrupted / "metrics.json").unlink()
    (interrupted / "eval.json").unlink()
    for checkpoint in (interrupted / "checkpoints").glob("step-*"):
        if checkpoint.name != "step-00000002":
            shutil.rmtree(checkpoint)
    resumed = gapm("matrix", "element", str(path), "--index", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and json.loads((interrupted / "eval.json").read_text())["step"] == 6
    record = json.loads((interrupted / "matrix-element.json").read_text())
    assert record["train_launches"] == 2 and record["train_seconds"] > 0
    # changed evaluation arguments: evaluated again, training untouched
    changed = write_matrix(tmp_path, eval=["-n", "32", "--no-log"])
    again = gapm("matrix", "run", str(changed), "--no-report")
    assert again.returncode == 0 and again.stdout.count("pipeline.cli eval") == 2
    assert "pipeline.cli train" not in again.stdout


def test_image_panels_show_samples_reconstructions_and_interpolations():
    import numpy as np
    import torch

    from gapm import ModelShape, build_model
    from gapm import to_data_space, to_model_space
    from pipeline.eval import paper_figures
    from pipeline.eval.figures import image_grid

    torch.manual_seed(0)
    model = build_model("gapm", ModelShape(data_shape=[1, 28, 28], latent_dim=8, prior_dim=8, width=8,
                                           latent_generator_widths=[16], latent_discriminator_widths=[16])).eval()
    test_images = torch.rand(24, 1, 28, 28)
    panels = paper_figures.image_panels(model, test_images)
    assert panels["samples"].shape == (4 * 30 + 2, 8 * 30 + 2)  # 32 samples, 8 per row, 2-pixel gaps
    assert panels["test images / reconstructions"].shape == (4 * 30 + 2, 8 * 30 + 2)  # 2 x (inputs, reconstructions)
    assert panels["interpolations"].shape == (4 * 30 + 2, 8 * 30 + 2)  # 4 pairs x 8 steps
    # the first row of the second block shows the reconstructions of test images 0-7
    reconstructed = to_data_space(model.reconstruct(to_model_space(test_images[:8], [1, 28, 28])), [1, 28, 28])
    assert np.array_equal(panels["test images / reconstructions"][32:62], np.asarray(image_grid(reconstructed, 8))[2:32])
    # each interpolation starts at the reconstruction of its first image (μ = 1)
    start = to_data_space(model.reconstruct(to_model_space(test_images[16:17], [1, 28, 28])), [1, 28, 28])
    assert np.array_equal(panels["interpolations"][2:30, 2:30], np.asarray(image_grid(start, 1))[2:30, 2:30])

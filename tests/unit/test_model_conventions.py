"""The model conventions gapm owns once (data spaces, seeded sampling, a model from its meta and
weights) and the reading of a run's logged settings that the evaluation jobs use."""

import dataclasses
import logging

import pytest
import torch
import yaml
from helpers import ROOT

import gapm
from gapm import METHODS, ModelShape, SampleStream, model_from_meta, to_data_space, to_model_space
from pipeline.config import dump_config, load_config
from pipeline.eval.mlflow_runs import run_settings

POINTS = ModelShape(data_shape=[2], latent_dim=2, prior_dim=2, width=16, latent_generator_widths=[16],
                    latent_discriminator_widths=[16])
IMAGES = dataclasses.replace(POINTS, data_shape=[1, 28, 28], latent_dim=4, prior_dim=4, width=4)


def test_images_move_between_zero_one_and_minus_one_one_and_points_stay():
    images = torch.rand(3, 1, 28, 28)
    assert torch.equal(to_model_space(images, [1, 28, 28]), images * 2 - 1)
    assert torch.allclose(to_data_space(to_model_space(images, [1, 28, 28]), [1, 28, 28]), images)
    assert to_data_space(torch.full((1, 1, 28, 28), 3.0), [1, 28, 28]).max() == 1.0  # clamped
    points = torch.randn(5, 2) * 4
    assert torch.equal(to_model_space(points, [2]), points) and torch.equal(to_data_space(points, [2]), points)
    assert gapm.is_image_shape([3, 32, 32]) and not gapm.is_image_shape([3])
    assert IMAGES.is_image and not POINTS.is_image


@pytest.mark.parametrize("shape", [POINTS, IMAGES], ids=["points", "images"])
def test_samples_are_a_function_of_weights_seed_and_draw_sizes(shape):
    torch.manual_seed(0)
    model = gapm.build_model("gapm", shape).eval()
    drawn = gapm.sample(model, 7, seed=3, batch_size=3)
    stream = SampleStream(model, seed=3)
    assert torch.equal(drawn, torch.cat([stream.draw(3), stream.draw(3), stream.draw(1)]))
    assert torch.equal(drawn, gapm.sample(model, 7, seed=3, batch_size=3))
    assert not torch.equal(drawn, gapm.sample(model, 7, seed=4, batch_size=3))
    assert drawn.shape == (7, *shape.data_shape)
    if shape.is_image:
        assert 0 <= drawn.min() and drawn.max() <= 1  # data space
    assert gapm.sample(model, 0, seed=3).shape == (0, *shape.data_shape)
    data = torch.rand(5, *shape.data_shape)
    assert torch.allclose(gapm.reconstruct(model, data, batch_size=2), gapm.reconstruct(model, data), atol=1e-6)


@pytest.mark.parametrize("kind", sorted(METHODS))
def test_a_model_rebuilt_from_its_meta_and_weights_samples_the_same(kind):
    torch.manual_seed(1)
    model = gapm.build_model(kind, POINTS).eval()
    meta = {"model_kind": kind, "model_shape": dataclasses.asdict(POINTS), "hyperparameters": model.hyperparameters}
    rebuilt = model_from_meta(meta, model.state_dict())
    assert not rebuilt.training
    assert torch.equal(gapm.sample(rebuilt, 16, seed=5), gapm.sample(model, 16, seed=5))


def test_a_meta_or_weights_of_another_model_are_refused():
    model = gapm.build_model("gapm", POINTS)
    with pytest.raises(ValueError, match="not a gapm checkpoint meta.json"):
        model_from_meta({"model_kind": "gapm"}, model.state_dict())
    wider = {"model_kind": "gapm", "model_shape": {**dataclasses.asdict(POINTS), "width": 32}}
    with pytest.raises(RuntimeError):
        model_from_meta(wider, model.state_dict())


def test_a_runs_logged_config_gives_its_data_seed_and_statistics_directory(caplog):
    config = load_config(ROOT / "configs/swissroll.yaml", ["seed=7", "data.test=swissroll3d", "data.batch_size=16",
                                                           "eval.fid_stats_dir=s3://bucket/stats"])
    logged = yaml.safe_load(dump_config(config))  # what config.yaml holds
    settings = run_settings(logged, "config.yaml")
    assert settings.seed == 7 and settings.data == config.data and settings.eval.fid_stats_dir == "s3://bucket/stats"
    older = {"seed": 2, "data": {"train": "swissroll", "test": "swissroll"}}  # keys added since take their defaults
    assert run_settings(older, "config.yaml").data.swissroll_test_samples == config.data.swissroll_test_samples
    with caplog.at_level(logging.WARNING):
        assert run_settings({**logged, "data": {**logged["data"], "batch_size": "many"}}, "run x's config.yaml") is None
    assert "config key 'data.batch_size': expected an integer" in caplog.text and "run x's config.yaml" in caplog.text

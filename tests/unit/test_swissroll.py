"""The swiss-roll data, its coverage metrics, the networks' authors' options, the learning-rate
schedules and their config errors."""

import math

import pytest
import torch

from gapm import ModelShape, networks
from pipeline.config import ConfigError, OptimizerConfig, load_config
from pipeline.data import swissroll
from pipeline.train.settings import scheduled_lr


@pytest.mark.parametrize("kind", ["swissroll", "swissroll3d"])
def test_roll_points_lie_on_the_roll_and_are_located_by_their_roll_parameter(kind):
    geometry = swissroll.roll_geometry(kind)
    points, t = geometry.sample(2000, seed=3)
    assert points.shape == (2000, geometry.dimension) and points.dtype == torch.float32
    located_t, distance = geometry.locate(points)
    noise = 0.0 if kind == "swissroll" else 0.02  # the 3-D roll carries the authors' noise 0.05 (x ~0.08)
    assert distance.max() < 1e-3 + noise
    assert (located_t - t).abs().max() < 0.05


def test_the_authors_3d_roll_is_scaled_into_minus_one_one():
    points, _ = swissroll.roll_geometry("swissroll3d").sample(5000, seed=0)
    assert points.min() > -1.02 and points.max() < 1.02
    assert points[:, 2].max() - points[:, 2].min() > 1.9  # the widest axis spans [-1, 1]


def test_coverage_of_an_ideal_sampler_a_truncated_one_and_an_off_roll_one():
    geometry = swissroll.roll_geometry("swissroll")
    ideal, t = geometry.sample(5000, seed=1)
    coverage = swissroll.roll_coverage(ideal, geometry)
    assert coverage["roll_parameter_tv"] < 0.05 and coverage["off_roll_fraction"] == 0.0
    many, t_many = geometry.sample(20000, seed=2)
    outer_two_thirds = many[t_many > swissroll.T_MIN + math.pi][:5000]  # never reaches the inner third
    assert swissroll.roll_coverage(outer_two_thirds, geometry)["roll_parameter_tv"] == pytest.approx(1 / 3, abs=0.03)
    blurred = ideal + 0.1 * torch.randn(ideal.shape, generator=torch.Generator().manual_seed(0))
    assert swissroll.roll_coverage(blurred, geometry)["off_roll_fraction"] > 0.5


def test_locating_a_point_by_hand():
    geometry = swissroll.roll_geometry("swissroll")
    t = 3 * math.pi  # the roll point (t cos t, t sin t) / 10 = (-0.3π, 0), pushed 0.03 outwards
    point = torch.tensor([[-0.3 * math.pi - 0.03, 0.0]])
    located_t, distance = geometry.locate(point)
    assert located_t.item() == pytest.approx(t, abs=0.01)
    assert distance.item() == pytest.approx(0.03, abs=2e-3)


def test_latent_networks_default_to_the_authors_normalisation():
    generator = networks.build_latent_generator(2, 8, [16, 16])
    assert isinstance(generator[-1], torch.nn.BatchNorm1d) and generator[-1].num_features == 8
    assert sum(isinstance(layer, torch.nn.ReLU) for layer in generator) == 2
    discriminator = networks.LatentDiscriminator(8, [16, 16])
    linears = [m for m in discriminator.modules() if isinstance(m, torch.nn.Linear)]
    spectral = [hasattr(m, "parametrizations") for m in linears]
    assert spectral == [True, True, False]  # hidden layers only; the last Linear is plain
    assert any(isinstance(m, torch.nn.ReLU) for m in discriminator.modules())
    every = networks.LatentDiscriminator(8, [16], spectral="all", activation="leaky_relu")
    assert all(hasattr(m, "parametrizations") for m in every.modules() if isinstance(m, torch.nn.Linear))
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in every.modules())
    with pytest.raises(ValueError, match="spectral-norm"):
        networks.mlp(2, [4], 1, spectral="some")


def test_a_model_shape_saved_before_the_options_existed_rebuilds_the_old_networks():
    old = {"data_shape": [2], "latent_dim": 2, "prior_dim": 2, "width": 8, "latent_norm": True,
           "latent_generator_widths": [8], "latent_discriminator_widths": [8]}
    shape = ModelShape.from_dict(old)
    assert shape.latent_generator_output_norm is False
    assert shape.latent_discriminator_spectral_norm == "all"
    assert shape.latent_discriminator_activation == "leaky_relu"


def test_learning_rate_schedules():
    constant = OptimizerConfig(lr=1.0)
    assert scheduled_lr(constant, 900, 1000) == 1.0
    cosine = OptimizerConfig(lr=1.0, schedule="cosine", decay_start=0.5)
    assert scheduled_lr(cosine, 0, 1000) == 1.0 and scheduled_lr(cosine, 500, 1000) == 1.0
    assert scheduled_lr(cosine, 750, 1000) == pytest.approx(0.5)
    assert scheduled_lr(cosine, 1000, 1000) == pytest.approx(0.0)
    linear = OptimizerConfig(lr=2.0, schedule="linear", final_lr_fraction=0.5)
    assert scheduled_lr(linear, 500, 1000) == pytest.approx(1.5)


@pytest.mark.parametrize("override, key", [
    ("optimizers.autoencoder.lr=-0.001", "optimizers.autoencoder.lr"),
    ("optimizers.latent_discriminator.betas=[0.5]", "optimizers.latent_discriminator.betas"),
    ("optimizers.critic.decay_start=1.5", "optimizers.critic.decay_start"),
    ("optimizers.critic.schedule=step", "optimizers.critic.schedule"),
])
def test_bad_optimizer_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/swissroll.yaml", [override])

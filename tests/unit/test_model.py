"""Network shapes for every supported data shape, the latent BatchNorm and the model API."""

import pytest
import torch

from gapm import (
    GAPM,
    ModelShape,
    Stage1Hyperparameters,
    Stage2Hyperparameters,
    stage1_step,
    stage2_step,
)
from gapm.method import plain_update

SHAPES = [[2], [1, 28, 28], [3, 32, 32], [3, 64, 64]]


def tiny(data_shape, latent_norm=True):
    return GAPM(ModelShape(data_shape=data_shape, latent_dim=8, prior_dim=4, width=8, latent_norm=latent_norm,
                           latent_generator_widths=[16], latent_discriminator_widths=[16]))


@pytest.mark.parametrize("data_shape", SHAPES)
def test_every_network_has_the_expected_shapes(data_shape):
    torch.manual_seed(0)
    model = tiny(data_shape)
    data = torch.rand(4, *data_shape) * 2 - 1
    latent, recon, interp = model.autoencoder(data, torch.full((4,), 0.3))
    assert latent.shape == (4, 8)
    assert recon.shape == interp.shape == data.shape
    assert model.critic(data).shape == (4,)
    mapped = model.latent_generator(torch.randn(4, 4))
    assert mapped.shape == (4, 8)
    assert model.latent_discriminator(mapped).shape == (4,)
    model.eval()
    assert model.sample(3).shape == (3, *data_shape)
    assert model.reconstruct(data).shape == data.shape
    assert model.interpolate(data[:2], data[2:], steps=5).shape == (5, 2, *data_shape)


def test_image_decoder_output_is_in_model_range():
    model = tiny([3, 32, 32]).eval()
    images = model.sample(5)
    assert images.min() >= -1 and images.max() <= 1


def test_latent_norm_has_no_affine_parameters_and_standardises():
    model = tiny([2])
    norm = model.autoencoder.latent_norm
    assert isinstance(norm, torch.nn.BatchNorm1d) and not norm.affine
    assert list(norm.parameters()) == []
    latent = model.autoencoder.encode(torch.randn(256, 2) * 5 + 3)
    assert torch.allclose(latent.mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(latent.std(0, unbiased=False), torch.ones(8), atol=1e-3)


def test_ablation_without_latent_norm_uses_identity():
    model = tiny([2], latent_norm=False)
    assert isinstance(model.autoencoder.latent_norm, torch.nn.Identity)


def test_interpolation_endpoints_are_the_two_reconstructions():
    torch.manual_seed(1)
    model = tiny([2]).eval()
    first, second = torch.randn(3, 2), torch.randn(3, 2)
    frames = model.interpolate(first, second, steps=4)
    assert torch.allclose(frames[0], model.reconstruct(first), atol=1e-6)
    assert torch.allclose(frames[-1], model.reconstruct(second), atol=1e-6)


def test_sampling_is_reproducible_with_a_generator():
    model = tiny([1, 28, 28]).eval()
    a = model.sample(2, torch.Generator().manual_seed(3))
    b = model.sample(2, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_stage_steps_update_only_their_networks():
    torch.manual_seed(0)
    model = tiny([2])
    optimizers = {name: torch.optim.Adam(getattr(model, name).parameters(), lr=1e-2)
                  for name in ("autoencoder", "critic", "latent_generator", "latent_discriminator")}
    update = plain_update(optimizers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.randn(16, 2)
    logs = stage1_step(model.autoencoder, model.critic, model.critic, data, Stage1Hyperparameters(), update)
    assert set(logs) == {"critic_loss", "autoencoder_loss", "reconstruction_mse"}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("autoencoder.encoder") for k in changed)
    assert any(k.startswith("critic.") for k in changed)
    assert not any(k.startswith(("latent_generator.", "latent_discriminator.")) for k in changed)

    model.autoencoder.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs = stage2_step(model.autoencoder, model.latent_generator, model.latent_discriminator,
                       model.latent_discriminator, data, 4, Stage2Hyperparameters(discriminator_steps=2), update)
    assert set(logs) == {"latent_discriminator_loss", "latent_generator_loss"}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert not any(k.startswith(("autoencoder.", "critic.")) for k in changed)
    assert any(k.startswith("latent_generator.") for k in changed)
    assert any(k.startswith("latent_discriminator.") for k in changed)
    # the frozen() context restored trainability of the critic / discriminator
    assert all(p.requires_grad for p in model.parameters())

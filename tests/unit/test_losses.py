"""Each loss against a hand computation on fixed small tensors."""

import pytest
import torch

from gapm import losses


def test_interpolation_critic_loss_eq9():
    on_data = torch.tensor([1.0, -1.0])  # ||d(x)||² = (1 + 1)/2 = 1
    on_recon_mix = torch.tensor([0.2, 0.6])  # minus λ=0.2 -> (0, 0.4): (0 + 0.16)/2 = 0.08
    on_interp = torch.tensor([0.5, 0.3])  # minus μ=(0.1, 0.3) minus λ -> (0.2, -0.2): 0.04
    mu = torch.tensor([0.1, 0.3])
    loss = losses.interpolation_critic_loss(on_data, on_recon_mix, on_interp, mu, target_offset=0.2)
    assert loss.item() == pytest.approx(1.0 + 0.08 + 0.04)


def test_regularized_autoencoder_loss_eq10():
    data = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    recon = torch.tensor([[1.0, 1.0], [2.0, 1.0]])  # squared errors 1, 0, 0, 4 -> mean 1.25
    on_interp = torch.tensor([1.0, 3.0])  # mean square 5
    on_recon = torch.tensor([2.0, 0.0])  # mean square 2
    total, recon_term = losses.regularized_autoencoder_loss(data, recon, on_interp, on_recon, 0.5, 0.25)
    assert recon_term.item() == pytest.approx(1.25)
    assert total.item() == pytest.approx(1.25 + 0.5 * 5 + 0.25 * 2)


def test_latent_discriminator_hinge_loss_eq12():
    on_embeddings = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - D): 0, 0.5, 2 -> mean 2.5/3
    on_mapped = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + D): 0, 1, 2 -> mean 1
    loss = losses.latent_discriminator_hinge_loss(on_embeddings, on_mapped)
    assert loss.item() == pytest.approx(2.5 / 3 + 1.0)


def test_latent_generator_loss_eq13():
    assert losses.latent_generator_loss(torch.tensor([1.0, -3.0, 0.5])).item() == pytest.approx(0.5)


def test_losses_are_differentiable_in_the_right_arguments():
    on_interp = torch.tensor([0.5, 0.3], requires_grad=True)
    loss = losses.interpolation_critic_loss(torch.zeros(2), torch.zeros(2), on_interp, torch.zeros(2), 0.0)
    loss.backward()
    # d/dv mean(v²) = 2v/n
    assert torch.allclose(on_interp.grad, torch.tensor([0.5, 0.3]))

"""The baselines: every loss against a hand computation, every method through the training
protocol (only the named network learns in each update, every one of its parameters gets a
gradient, nothing leaks into the others), the user API, determinism, and a VAE that trains."""

import math

import pytest
import torch

from gapm import GAPM, METHODS, ModelShape, build_model
from gapm.baselines import losses as L
from gapm.method import MethodBase, plain_update
from gapm.networks import reparameterize

KINDS = ["vae", "aae", "wae", "introvae", "age", "alae"]
LN2 = math.log(2.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


def t(values):
    return torch.tensor(values, dtype=torch.float32)


# --- losses against hand computations -------------------------------------------------------

def test_squared_error_sums_over_entries_and_averages_over_batch():
    # per-sample sums 1+4 = 5 and 1+1 = 2 -> mean 3.5
    assert L.squared_error(t([[1, 2], [0, 0]]), t([[0, 0], [1, 1]])).item() == pytest.approx(3.5)
    images = torch.ones(2, 1, 2, 2)
    assert L.squared_error(images, torch.zeros_like(images)).item() == pytest.approx(4.0)


def test_gaussian_kl_per_sample():
    # sample 1: N(0, 1) -> 0; sample 2: ½[(1 + 1 − 0 − 1) + (0 + 2 − ln 2 − 1)] = 1 − ln2/2
    kl = L.gaussian_kl_to_standard_normal(t([[0, 0], [1, 0]]), t([[0, 0], [0, LN2]]))
    assert kl.tolist() == pytest.approx([0.0, 1 - LN2 / 2])


def test_vae_loss_is_reconstruction_plus_weighted_kl():
    data, recon = t([[1, 2], [0, 0]]), t([[0, 0], [1, 1]])
    total, rec, kl = L.vae_loss(data, recon, t([[0, 0], [1, 0]]), t([[0, 0], [0, LN2]]), kl_weight=2.0)
    mean_kl = (1 - LN2 / 2) / 2
    assert rec.item() == pytest.approx(3.5) and kl.item() == pytest.approx(mean_kl)
    assert total.item() == pytest.approx(3.5 + 2 * mean_kl)


def test_reparameterize():
    # σ = exp(½ ln 4) = 2: 1 + 2·0.5 = 2
    assert reparameterize(t([1.0]), t([math.log(4.0)]), t([0.5])).item() == pytest.approx(2.0)


def test_gan_losses_on_logits():
    assert L.gan_discriminator_loss(t([0.0]), t([0.0])).item() == pytest.approx(2 * LN2)
    # softplus(−ln 3) = ln(4/3), softplus(ln 3) = ln 4
    ln3 = math.log(3.0)
    assert L.gan_discriminator_loss(t([ln3]), t([ln3])).item() == pytest.approx(math.log(4 / 3) + math.log(4))
    assert L.nonsaturating_generator_loss(t([0.0, ln3])).item() == pytest.approx((LN2 + math.log(4 / 3)) / 2)
    assert L.aae_discriminator_loss(t([ln3]), t([ln3])).item() == pytest.approx(math.log(4 / 3) + math.log(4))


def test_aae_autoencoder_loss():
    total, rec, adv = L.aae_autoencoder_loss(t([[1, 2], [0, 0]]), t([[0, 0], [1, 1]]), t([0.0, 0.0]),
                                             adversarial_weight=0.5)
    assert rec.item() == pytest.approx(3.5) and adv.item() == pytest.approx(LN2)
    assert total.item() == pytest.approx(3.5 + 0.5 * LN2)


def test_imq_kernel_scales():
    assert L.WAE_IMQ_SCALES == (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
    # d_z = 1, σ² = 1 -> C = 2·s: squared distances 1 and 4
    k = L.imq_kernel(t([[0.0]]), t([[1.0], [2.0]]), scales=(1.0,))
    assert k.shape == (1, 2) and k.flatten().tolist() == pytest.approx([2 / 3, 1 / 3])
    k = L.imq_kernel(t([[0.0]]), t([[1.0], [2.0]]), scales=(1.0, 2.0))
    assert k.flatten().tolist() == pytest.approx([2 / 3 + 4 / 5, 1 / 3 + 4 / 8])
    # d_z = 2, σ² = 0.5 -> C = 2; squared distance 2 -> 1/2
    assert L.imq_kernel(t([[0.0, 0.0]]), t([[1.0, 1.0]]), (1.0,), prior_variance=0.5).item() == pytest.approx(0.5)


def test_mmd_is_the_unbiased_estimator():
    # prior {0, 1}, embeddings {0, 2}, C = 2: k(0,1)=2/3, k(0,2)=1/3, k(1,2)=2/3, k(x,x)=1
    # prior term 2·(2/3)/2 = 2/3; embedding term 2·(1/3)/2 = 1/3; cross 2/4·(1 + 1/3 + 2/3 + 2/3) = 4/3
    mmd = L.mmd_imq(t([[0.0], [1.0]]), t([[0.0], [2.0]]), scales=(1.0,))
    assert mmd.item() == pytest.approx(2 / 3 + 1 / 3 - 4 / 3)
    total, rec, mmd_term = L.wae_mmd_loss(t([[1.0], [0.0]]), t([[0.0], [0.0]]), t([[0.0], [1.0]]),
                                          t([[0.0], [2.0]]), mmd_weight=10.0, scales=(1.0,))
    assert rec.item() == pytest.approx(0.5) and mmd_term.item() == pytest.approx(-1 / 3)
    assert total.item() == pytest.approx(0.5 - 10 / 3)


def test_introvae_losses():
    # L_E = 1 + 0.5·([5 − 3]⁺ + [5 − 7]⁺) + 0.1·2 = 2.2;  L_G = 0.5·(3 + 7) + 0.1·2 = 5.2
    args = (t(3.0), t(7.0))
    assert L.introvae_encoder_loss(t(1.0), *args, t(2.0), alpha=0.5, beta=0.1, margin=5.0).item() == pytest.approx(2.2)
    assert L.introvae_decoder_loss(*args, t(2.0), alpha=0.5, beta=0.1).item() == pytest.approx(5.2)


def test_age_batch_kl():
    # dim 0: m = 1, s² = 1 -> (1 + 1)/2 − 0 − ½ = ½;  dim 1: m = 2, s² = 4 -> 4 − ln 2 − ½
    kl = L.age_batch_kl(t([[0.0, 0.0], [2.0, 4.0]]), eps=0.0)
    assert kl.item() == pytest.approx((0.5 + 3.5 - LN2) / 2)
    # the standard normal's own moments give 0
    assert L.age_batch_kl(t([[1.0, -1.0], [-1.0, 1.0]]), eps=0.0).item() == pytest.approx(0.0)


def test_age_game_losses():
    # encoder: 1 − 3 + 10·mean(|1|, |−1|) = 8;  generator: 0.5 + 2·mean(1, 1) = 2.5
    total, rec = L.age_encoder_loss(t(1.0), t(3.0), t([[1.0, -1.0]]), t([[0.0, 0.0]]), reconstruction_weight=10.0)
    assert rec.item() == pytest.approx(1.0) and total.item() == pytest.approx(8.0)
    total, lat = L.age_decoder_loss(t(0.5), t([[1.0, 0.0]]), t([[0.0, 1.0]]), latent_weight=2.0)
    assert lat.item() == pytest.approx(1.0) and total.item() == pytest.approx(2.5)


def test_alae_losses():
    # R1: per-sample squared norms 25 and 0 -> 12.5
    assert L.r1_penalty(t([[3.0, 4.0], [0.0, 0.0]])).item() == pytest.approx(12.5)
    # 2 ln 2 + (γ/2 = 1)·25
    assert L.alae_discriminator_loss(t([0.0]), t([0.0]), t([[3.0, 4.0]]), r1_gamma=2.0).item() == pytest.approx(
        2 * LN2 + 25)
    assert L.alae_latent_reconstruction(t([[1.0, 2.0]]), t([[0.0, 0.0]])).item() == pytest.approx(2.5)


# --- every method through the protocol -----------------------------------------------------

def tiny_shape(data_shape):
    return ModelShape(data_shape=list(data_shape), latent_dim=4, prior_dim=3, width=8,
                      latent_generator_widths=[16], latent_discriminator_widths=[16])


def tiny(kind, data_shape, **hyper):
    return build_model(kind, tiny_shape(data_shape), **hyper)


def checked_update(model, optimizers, calls):
    """plain_update plus the protocol's promises: the loss gives a gradient to every parameter
    of the named network and to no other network's, and the step changes only that network."""
    names = list(optimizers)

    def update(name, loss):
        assert loss.dim() == 0 and torch.isfinite(loss)
        before = {other: [p.detach().clone() for p in getattr(model, other).parameters()]
                  for other in names if other != name}
        loss.backward()
        missing = [n for n, p in getattr(model, name).named_parameters() if p.grad is None]
        assert not missing, f"update({name!r}): no gradient for {missing}"
        for other in before:
            assert all(p.grad is None for p in getattr(model, other).parameters()), \
                f"update({name!r}) leaked gradients into {other}"
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        for other, params in before.items():
            assert all(torch.equal(a, b) for a, b in zip(params, getattr(model, other).parameters()))
        calls.append(name)

    return update


def optimizers_for(model, stage=0):
    return {name: torch.optim.Adam(getattr(model, name).parameters(), lr=1e-3) for name in model.stages[stage]}


def run_steps(model, data, steps, update=None):
    names = model.stages[0]
    optimizers = optimizers_for(model)
    update = update or plain_update(optimizers)
    trained = {name: getattr(model, name) for name in names}
    return [model.stage_step(1, trained, data, update) for _ in range(steps)], optimizers


def model_space_batch(data_shape, count=8):
    data = torch.randn(count, *data_shape)
    return data if len(data_shape) == 1 else data.clamp(-1, 1)


@pytest.mark.parametrize("data_shape", [[2], [1, 28, 28]], ids=["points", "mnist"])
@pytest.mark.parametrize("kind", KINDS)
def test_stage_step_trains_exactly_the_stage_networks(kind, data_shape):
    torch.manual_seed(0)
    model = tiny(kind, data_shape)
    assert model.kind == kind and isinstance(model, MethodBase)
    assert len(model.stages) == 1
    names = model.stages[0]
    children = dict(model.named_children())
    assert all(name in children for name in names)
    # every parameter belongs to a trained network: nothing is silently left untrained
    assert sum(p.numel() for n in names for p in children[n].parameters()) == sum(
        p.numel() for p in model.parameters())

    data = model_space_batch(data_shape)
    optimizers = optimizers_for(model)
    calls = []
    update = checked_update(model, optimizers, calls)
    trained = {name: getattr(model, name) for name in names}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        logs = model.stage_step(1, trained, data, update)
        assert logs and all(isinstance(v, float) and math.isfinite(v) for v in logs.values()), logs
    assert set(calls) == set(names)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    for name in names:
        assert any(k.startswith(name + ".") for k in changed), f"{name} did not change"
    assert all(p.requires_grad for p in model.parameters())  # frozen() restored them

    model.eval()
    assert model.prior_sample(5).shape == (5, model.prior_dim)
    assert model.prior_dim == (3 if kind == "alae" else 4)
    assert model.encode(data).shape == (8, 4)
    assert model.sample_latents(3).shape == (3, 4)
    samples = model.sample(3)
    assert samples.shape == (3, *data_shape)
    assert model.reconstruct(data).shape == data.shape
    assert model.interpolate(data[:2], data[2:4], steps=5).shape == (5, 2, *data_shape)
    if len(data_shape) == 3:
        assert samples.min() >= -1 and samples.max() <= 1
    if kind == "age":  # AGE lives on the unit sphere
        assert torch.allclose(model.encode(data).norm(dim=1), torch.ones(8), atol=1e-5)
        assert torch.allclose(model.sample_latents(3).norm(dim=1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_same_losses(kind):
    def losses():
        torch.manual_seed(3)
        model = tiny(kind, [2])
        logs, _ = run_steps(model, torch.randn(8, 2), steps=2)
        return logs
    assert losses() == losses()


def test_interpolation_endpoints_are_the_reconstructions():
    torch.manual_seed(1)
    model = tiny("wae", [2]).eval()
    first, second = torch.randn(3, 2), torch.randn(3, 2)
    frames = model.interpolate(first, second, steps=4)
    assert torch.allclose(frames[0], model.reconstruct(first), atol=1e-6)
    assert torch.allclose(frames[-1], model.reconstruct(second), atol=1e-6)


def test_sampling_is_reproducible_with_a_generator():
    model = tiny("alae", [2]).eval()
    a = model.sample(4, torch.Generator().manual_seed(5))
    b = model.sample(4, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_build_model_registry_and_errors():
    assert set(METHODS) == {"gapm", *KINDS}
    assert isinstance(build_model("gapm", tiny_shape([2])), GAPM)
    model = tiny("wae", [2], mmd_weight=3.0)
    assert model.hyperparameters["mmd_weight"] == 3.0
    assert model.hyperparameters["kernel_scales"] == L.WAE_IMQ_SCALES
    with pytest.raises(ValueError, match="unknown method 'vqvae'"):
        build_model("vqvae", tiny_shape([2]))
    with pytest.raises(TypeError, match="no_such_weight"):
        tiny("vae", [2], no_such_weight=1.0)
    with pytest.raises(ValueError, match="decoder_steps must be a positive integer"):
        tiny("age", [2], decoder_steps=0)
    with pytest.raises(ValueError, match=r"trains \['autoencoder'\]"):
        model.stage_step(1, {"encoder": model.autoencoder}, torch.randn(4, 2), lambda n, l: None)
    with pytest.raises(ValueError, match="not 2"):
        model.stage_step(2, {"autoencoder": model.autoencoder}, torch.randn(4, 2), lambda n, l: None)


def noisy_circle(count, generator, radius=3.0):
    angle = torch.rand(count, generator=generator) * 2 * math.pi
    points = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return points + 0.05 * torch.randn(count, 2, generator=generator)


def test_vae_training_reduces_reconstruction_error_on_a_circle():
    # Radius 3: with β = 1 (a decoder variance of ½) a unit circle is not worth encoding and the
    # posterior collapses; see VAEHyperparameters.
    torch.manual_seed(0)
    shape = ModelShape(data_shape=[2], latent_dim=2, prior_dim=2, width=32)
    model = build_model("vae", shape)
    optimizers = {"autoencoder": torch.optim.Adam(model.autoencoder.parameters(), lr=3e-3)}
    update = plain_update(optimizers)
    generator = torch.Generator().manual_seed(0)
    errors = []
    for _ in range(200):
        logs = model.stage_step(1, {"autoencoder": model.autoencoder}, noisy_circle(64, generator), update)
        errors.append(logs["reconstruction_mse"])
    first, last = sum(errors[:20]) / 20, sum(errors[-20:]) / 20
    assert last < 0.5 * first, (first, last)

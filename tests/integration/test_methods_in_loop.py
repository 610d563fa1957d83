"""Every method of gapm.baselines (and GAPM) trains through the same pipeline loop."""

import pytest
from helpers import tiny_overrides, train

from gapm import GAPM, METHODS
from pipeline import checkpoints
from pipeline.config import ConfigError, load_config


def tiny(kind):
    return tiny_overrides(stage1_steps=6, stage2_steps=4, batch_size=32, samples=256, test_samples=64, width=16,
                          checkpoint_every=100, log_every=3, eval_samples=64, discriminator_steps=1, kind=kind)


def config_for(tmp_path, kind, *extra):
    return load_config("configs/swissroll.yaml", [f"output_dir={tmp_path}", f"name={kind}", *tiny(kind), *extra])


@pytest.mark.parametrize("kind", sorted(METHODS))
def test_method_trains_checkpoints_and_reloads(tmp_path, kind):
    result = train(config_for(tmp_path, kind), resume="never")
    model, meta = checkpoints.load_model(result.final_checkpoint)
    assert type(model) is METHODS[kind] and meta.model_kind == kind
    expected_steps = 10 if kind == "gapm" else 6  # baselines have one stage of stage1.steps
    assert meta.step == expected_steps
    assert model.sample(5).shape == (5, 2)
    assert set(result.metrics) >= {"eval/reconstruction_mse", "eval/sample_mmd"}
    logged = (result.run_dir / "metrics.jsonl").read_text()
    assert "stage1/" in logged and ("stage2/" in logged) == (kind == "gapm")


def test_resuming_with_another_method_is_refused(tmp_path):
    train(config_for(tmp_path, "vae"), resume="never")
    other = load_config("configs/swissroll.yaml", [f"output_dir={tmp_path}", "name=vae", *tiny("wae")])
    with pytest.raises(checkpoints.CheckpointError, match="holds a 'vae' model, not 'wae'"):
        train(other, resume="auto")


def test_unknown_method_hyperparameter_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.hyperparameters\.kl_wieght.*known keys.*kl_weight"):
        train(config_for(tmp_path, "vae", "model.hyperparameters={kl_wieght: 1}"), resume="never")
    with pytest.raises(ConfigError, match=r"'model\.kind'"):
        config_for(tmp_path, "vqvae")


def test_gapm_follows_the_shared_protocol():
    assert GAPM.kind == "gapm" and GAPM.stages == [["autoencoder", "critic"], ["latent_generator", "latent_discriminator"]]


def test_another_methods_settings_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.hyperparameters\.discriminator_steps'"):
        load_config("configs/swissroll.yaml", ["model.kind=vae"])  # GAPM's settings on a VAE
    with pytest.raises(ConfigError, match=r"'optimizers\.critic': vae has no network 'critic'"):
        load_config("configs/swissroll.yaml", ["model.kind=vae", "model.hyperparameters={}"])

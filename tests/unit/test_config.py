"""Typed configs: every shipped YAML loads; bad keys and types are named in the error; keys
of earlier releases still load (the reference of every key is tests/unit/test_config_reference.py)."""


import pytest
from helpers import ROOT

from pipeline.config import ConfigError, ExperimentConfig, load_config
from pipeline.matrix import expand, load_matrix
from pipeline.matrix_report import element_config

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
MATRICES = sorted((ROOT / "configs" / "matrices").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), ExperimentConfig)


@pytest.mark.parametrize("path", MATRICES, ids=lambda p: p.name)
def test_every_element_of_every_shipped_matrix_loads(path, monkeypatch):
    """A mistyped sweep key would otherwise surface hours into a table, at its element."""
    monkeypatch.chdir(ROOT)  # matrices name their configs relative to the repository
    elements = expand(load_matrix(path))
    assert elements
    for element in elements:
        assert isinstance(element_config(element), ExperimentConfig), element.name


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'stage1\.lrr'"):
        load_config(write(tmp_path, "stage1:\n  lrr: 0.1\n"))


def test_ill_typed_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'stage1\.steps': expected an integer, got 'many'"):
        load_config(write(tmp_path, "stage1:\n  steps: many\n"))
    with pytest.raises(ConfigError, match=r"'train\.mixed_precision': expected one of 'no', 'bf16', 'fp16'"):
        load_config(write(tmp_path, "train:\n  mixed_precision: fp8\n"))
    with pytest.raises(ConfigError, match=r"'model\.data_shape\[1\]': expected an integer"):
        load_config(write(tmp_path, "model:\n  data_shape: [1, a, 28]\n"))


def test_section_given_as_scalar_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'data': expected a mapping"):
        load_config(write(tmp_path, "data: 3\n"))


def test_scientific_notation_floats_are_accepted(tmp_path):
    config = load_config(write(tmp_path, "optimizers:\n  autoencoder: {lr: 2e-4}\n"))
    assert config.optimizers["autoencoder"].lr == pytest.approx(2e-4)


def test_overrides_apply_and_are_type_checked(tmp_path):
    config = load_config(None, ["stage1.steps=7", "data.train=s3://bucket/cifar/train", "train.grad_clip_norm=1.5"])
    assert config.stage1.steps == 7
    assert config.data.train == "s3://bucket/cifar/train"
    assert config.train.grad_clip_norm == 1.5
    with pytest.raises(ConfigError, match=r"'stage1\.steps'"):
        load_config(None, ["stage1.steps=1.5"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["stage1.steps"])
    with pytest.raises(ConfigError, match=r"unknown config key 'nope'"):
        load_config(None, ["nope=1"])


def test_impossible_values_are_rejected():
    with pytest.raises(ConfigError, match=r"'data\.batch_size' must be at least 1"):
        load_config(None, ["data.batch_size=0"])
    with pytest.raises(ConfigError, match=r"'model\.data_shape'"):
        load_config(None, ["model.data_shape=[3, 48, 48]"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping of settings at the top level"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_bare_no_means_the_string_no_for_mixed_precision(tmp_path):
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(write(tmp_path, "train:\n  mixed_precision: no\n")).train.mixed_precision == "no"
    assert load_config(None).train.mixed_precision is None  # the launcher decides


# ---- the README's "Config reference" table names every key


def test_every_method_keeps_its_settings_in_model_hyperparameters(tmp_path):
    config = load_config(None, ["model.hyperparameters.mix_gamma=0.3"])
    assert config.model.hyperparameters["mix_gamma"] == 0.3
    assert config.model.hyperparameters["discriminator_steps"] == 5  # defaults filled in: logged complete
    vae = load_config(None, ["model.kind=vae", "model.hyperparameters.kl_weight=0.5"])
    assert vae.model.hyperparameters["kl_weight"] == 0.5
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.hyperparameters\.mix_gama'"):
        load_config(None, ["model.hyperparameters.mix_gama=0.3"])


def test_optimizers_are_per_network_with_a_default():
    from pipeline.config import optimizer_settings

    config = load_config(None, ["model.kind=alae", "optimizers.default.lr=0.0015", "optimizers.default.betas=[0, 0.99]",
                                "optimizers.discriminator.betas=[0.5, 0.99]"])
    assert optimizer_settings(config.optimizers, "generator").lr == 0.0015
    assert optimizer_settings(config.optimizers, "discriminator").betas == [0.5, 0.99]
    assert optimizer_settings(config.optimizers, "discriminator").lr == 2e-4  # an entry is whole, not merged
    with pytest.raises(ConfigError, match=r"'optimizers\.critic': alae has no network 'critic'; its networks are "
                                          r"generator, discriminator"):
        load_config(None, ["model.kind=alae", "optimizers.critic.lr=0.1"])
    with pytest.raises(ConfigError, match=r"'optimizers\.autoencoder\.lr' must be positive"):
        load_config(None, ["optimizers.autoencoder.lr=-1"])


def test_old_spellings_still_load_with_a_warning(tmp_path, caplog):
    old = write(tmp_path, "stage1:\n  steps: 5\n  mix_gamma: 0.3\n  critic: {lr: 1.0e-3}\n"
                          "stage2:\n  discriminator_steps: 2\n  latent_generator: {lr: 3.0e-4}\n")
    with caplog.at_level("WARNING"):
        config = load_config(old, ["stage1.autoencoder.lr=5e-4"])
    assert config.stage1.steps == 5
    assert config.model.hyperparameters["mix_gamma"] == 0.3 and config.model.hyperparameters["discriminator_steps"] == 2
    assert config.optimizers["critic"].lr == 1e-3 and config.optimizers["latent_generator"].lr == 3e-4
    assert config.optimizers["autoencoder"].lr == 5e-4
    assert "config key 'stage1.mix_gamma' is deprecated: write it as 'model.hyperparameters.mix_gamma'" in caplog.text
    assert "config key 'stage1.critic' is deprecated: write it as 'optimizers.critic'" in caplog.text
    # a baseline's networks all took stage1.autoencoder's settings: now optimizers.default
    baseline = load_config(None, ["model.kind=aae", "stage1.autoencoder.lr=1e-3"])
    assert baseline.optimizers["default"].lr == 1e-3

"""The metrics that show a generator's failure modes, on small hand-made cases with a known
answer: precision/recall/density/coverage (prdc), memorisation, the FID floor, FID's spread over
sample seeds, the training-feature sample, and the settings that choose them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.eval import feature_spaces, fid, neighbours, reference_stats
from pipeline.eval.scoring import Ranks, Reference, score_image_model
from pipeline.eval.settings import EvalConfig, EvalSettings, split_space_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


# --------------------------------------------------------------------------- precision, recall, density, coverage


def test_identical_sets_have_precision_recall_coverage_one_and_density_one():
    points = np.random.default_rng(0).normal(size=(300, 6))
    values = neighbours.precision_recall_density_coverage(points, points.copy(), nearest_k=5)
    assert values["precision"] == values["recall"] == values["coverage"] == 1.0
    assert values["density"] == pytest.approx(1.0, abs=0.01)  # k of the k+1 nearest (self included) are inside


def test_far_apart_sets_score_zero_everywhere():
    points = np.random.default_rng(1).normal(size=(100, 4))
    values = neighbours.precision_recall_density_coverage(points, points + 1000.0, nearest_k=5)
    assert values == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_precision_recall_density_coverage_of_a_hand_computed_case():
    """1-D, k = 1. Real 0, 1, 2, 3 (1-NN radius 1 each); generated 0.1, 10, 10.5 (radii 9.9, 0.5,
    0.5). Precision: only 0.1 lies in a real ball -> 1/3. Recall: 0.1's ball (radius 9.9)
    holds every real point -> 1. Density: 0.1 lies in the balls of 0 and 1 -> (2 + 0 + 0) / 3.
    Coverage: the nearest generated point is within radius 1 for 0 and 1 only -> 1/2."""
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    generated = np.array([[0.1], [10.0], [10.5]])
    values = neighbours.precision_recall_density_coverage(real, generated, nearest_k=1)
    assert values == pytest.approx({"precision": 1 / 3, "recall": 1.0, "density": 2 / 3, "coverage": 0.5})
    # a model that collapses onto one real point: precise, but no recall and little coverage
    collapsed = np.zeros((50, 1)) + np.linspace(0, 1e-3, 50)[:, None]
    values = neighbours.precision_recall_density_coverage(np.arange(50.0)[:, None], collapsed, nearest_k=3)
    assert values["precision"] == 1.0 and values["recall"] < 0.1 and values["coverage"] < 0.1


def test_too_few_samples_for_k_is_a_clear_error():
    with pytest.raises(ValueError, match="k=5 need at least 7 samples"):
        neighbours.precision_recall_density_coverage(np.zeros((6, 2)), np.ones((20, 2)), nearest_k=5)


# --------------------------------------------------------------------------- memorisation


def test_nearest_distances_and_the_memorisation_ratio_by_hand():
    train = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    np.testing.assert_allclose(neighbours.nearest_distances(np.array([[1.0, 0.0], [12.0, 0.0], [20.0, 3.0]]), train,
                                                            chunk=2), [1.0, 2.0, 3.0])
    # test images 1 and 2 away (median 1.5), generated 0.5 away: ratio 1/3
    test_median = float(np.median(neighbours.nearest_distances(np.array([[1.0, 0.0], [12.0, 0.0]]), train)))
    result = neighbours.memorisation(np.array([[0.5, 0.0], [20.5, 0.0]]), train, test_median)
    assert (result.generated_median, result.test_median, result.ratio) == pytest.approx((0.5, 1.5, 1 / 3))
    assert set(result.metrics("eval/")) == {"eval/memorisation_ratio", "eval/generated_train_distance",
                                            "eval/test_train_distance"}


def test_copies_of_training_points_have_memorisation_ratio_zero_and_fresh_samples_about_one():
    rng = np.random.default_rng(2)
    train, test, fresh = (rng.normal(size=(2000, 8)) for _ in range(3))
    test_median = float(np.median(neighbours.nearest_distances(test, train)))
    assert neighbours.memorisation(train[:500], train, test_median).ratio == pytest.approx(0.0, abs=1e-6)
    assert neighbours.memorisation(fresh, train, test_median).ratio == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="copies of training images"):
        neighbours.memorisation(fresh, train, 0.0)


# --------------------------------------------------------------------------- the training-feature sample


def test_feature_sample_is_uniform_seeded_and_in_random_order():
    def sample(seed: int, size: int = 10) -> np.ndarray:
        kept = neighbours.FeatureSample(size, seed)
        for start in range(0, 100, 7):  # batches of 7 (a stream)
            kept.add(np.arange(start, min(start + 7, 100), dtype=np.float32)[:, None])
        return kept.result()[:, 0]

    assert np.array_equal(sample(3), sample(3)) and not np.array_equal(sample(3), sample(4))
    assert sorted(sample(0, size=200)) == list(range(100))  # fewer rows than the size: all of them
    counts = np.zeros(100)
    first_three = np.zeros(100)
    for seed in range(2000):
        rows = sample(seed).astype(int)
        counts[rows] += 1
        first_three[rows[:3]] += 1
    # every row is kept with probability 10/100, and the first 3 are a uniform sample of 3
    assert np.allclose(counts / 2000, 0.1, atol=0.035) and np.allclose(first_three / 2000, 0.03, atol=0.02)
    assert neighbours.FeatureSample(0).result() is None


# --------------------------------------------------------------------------- statistics, floor, scoring


def flat_extractor(seed: int = 0, dim: int = 16) -> fid.FeatureExtractor:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, dim)).eval()

    def network(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(images / 255.0)

    return fid.FeatureExtractor(id=f"flat-{seed}", network=network, input_size=(28, 28), location="test")


def quantised_images(count: int, seed: int) -> torch.Tensor:
    """Images holding exact 8-bit values, as decoded files do."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 1, 28, 28), generator=generator).float() / 255.0


def test_floor_of_a_set_against_itself_is_zero_and_is_stored_with_the_statistics(tmp_path):
    extractor = flat_extractor()
    images = quantised_images(60, seed=0)
    stats = reference_stats.compute_reference_stats("train", extractor, "train", images=iter([images[:30], images[30:]]),
                                                    real_features=60, kid_features=10)
    assert stats.real_features.shape == (60, 16) and stats.kid_features.shape == (10, 16)
    floor = reference_stats.compute_floor(stats, "itself", extractor, images=iter([images]))
    assert floor["fid"] == pytest.approx(0.0, abs=1e-6) and floor["samples"] == 60
    assert (floor["precision"], floor["recall"], floor["coverage"]) == (1.0, 1.0, 1.0)
    assert floor["test_train_distance"] == pytest.approx(0.0, abs=1e-6) and floor["prdc_samples"] == 60
    other = reference_stats.compute_floor(stats, "held-out", extractor, images=iter([quantised_images(60, seed=1)]))
    assert other["fid"] > 0.01 and other["test_train_distance"] > 0.1  # other images: above the floor of itself
    # saved in the .npz, and for people in NAME.json beside it
    location = reference_stats.save_reference_stats(stats, out=str(tmp_path / "train.npz"))
    loaded = reference_stats.load_reference_stats(location)
    assert loaded.floor == pytest.approx(other) and np.array_equal(loaded.real_features, stats.real_features)
    described = json.loads((tmp_path / "train.json").read_text())
    assert described["floor"]["fid"] == pytest.approx(other["fid"]) and described["real_features"] == 60
    assert described["id"] == loaded.id
    with pytest.raises(fid.FidError, match="use the test split of the same dataset"):
        reference_stats.compute_floor(stats, "big", extractor, images=iter([torch.zeros(8, 1, 32, 32)]))


class FixedImages:
    """A 'model' that samples given images (model space [-1, 1]) in turn, or fresh noise: the
    part of gapm.Method that scoring uses."""

    def __init__(self, images: torch.Tensor | None, count: int = 0):
        self.images, self.count = images, count
        self.shape = SimpleNamespace(data_shape=[1, 28, 28])
        self.position = 0

    def to(self, device) -> "FixedImages":
        return self

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.images is None:  # random: depends on the seeded generator
            return torch.rand(count, 1, 28, 28, generator=generator) * 2 - 1
        picked = self.images[torch.arange(self.position, self.position + count) % len(self.images)]
        self.position += count
        return picked * 2 - 1


def scored(model: FixedImages, stats: reference_stats.ReferenceStats, extractor: fid.FeatureExtractor,
           samples: int, **settings) -> dict[str, float]:
    reference = Reference(key="k", description="test", stats=stats, extractor=extractor, samples=samples)
    options = EvalSettings.from_config(stats="test", samples=samples, batch_size=samples, **settings)
    return score_image_model(model, reference, options, None, Ranks())


def test_a_generator_that_copies_the_training_images_scores_memorisation_zero_and_no_fid_spread():
    extractor = flat_extractor()
    train = quantised_images(40, seed=0)
    stats = reference_stats.compute_reference_stats("train", extractor, "train", images=iter([train]))
    reference_stats.compute_floor(stats, "test", extractor, images=iter([quantised_images(40, seed=1)]))
    metrics = scored(FixedImages(train), stats, extractor, samples=40, fid_seeds=3, prdc_samples=40)
    assert metrics["eval/fid_std"] == 0.0 and metrics["eval/fid_seeds"] == 3  # deterministic: no spread
    assert metrics["eval/fid"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["eval/fid_floor"] == pytest.approx(stats.floor["fid"])
    assert metrics["eval/memorisation_ratio"] == pytest.approx(0.0, abs=1e-4)
    assert (metrics["eval/precision"], metrics["eval/recall"], metrics["eval/coverage"]) == (1.0, 1.0, 1.0)
    # noise: FID varies with the seed, samples are off the data
    noisy = scored(FixedImages(None), stats, extractor, samples=40, fid_seeds=3, prdc_samples=40)
    assert noisy["eval/fid_std"] > 0 and noisy["eval/fid"] > 0.01
    assert noisy["eval/memorisation_ratio"] > 0.5
    single = scored(FixedImages(None), stats, extractor, samples=40, fid_seeds=1, prdc_samples=40)
    assert "eval/fid_std" not in single


def test_older_statistics_still_give_fid_and_say_how_to_get_the_rest(caplog):
    extractor = flat_extractor()
    stats = reference_stats.compute_reference_stats("train", extractor, "old", images=iter([quantised_images(30, 0)]),
                                                    real_features=0)
    metrics = scored(FixedImages(None), stats, extractor, samples=30, fid_seeds=1, prdc_samples=30)
    assert "eval/fid" in metrics and "eval/precision" not in metrics and "eval/fid_floor" not in metrics
    assert "gapm fid-stats TRAIN --name NAME --test-data TEST" in caplog.text


def test_fid_spread_is_the_mean_and_sample_standard_deviation():
    assert feature_spaces.fid_spread("eval/", [10.0, 12.0, 14.0]) == {"eval/fid": 12.0, "eval/fid_std": 2.0}
    assert feature_spaces.fid_spread("eval/x/", [5.0]) == {"eval/x/fid": 5.0}


# --------------------------------------------------------------------------- settings


def test_feature_space_specs_and_settings_are_checked():
    assert split_space_spec("resnet=fm-train-resnet") == ("resnet", "fm-train-resnet")
    assert split_space_spec("fm-train") == (None, "fm-train")
    assert split_space_spec("s3://b/stats/x=1.npz") == (None, "s3://b/stats/x=1.npz")  # a URL, not a label
    assert split_space_spec("r=s3://b/x.npz") == ("r", "s3://b/x.npz")
    with pytest.raises(ValueError, match="LABEL=NAME_OR_URL"):
        split_space_spec("bad label=x")
    for key, value, message in [("fid_seeds", 0, "'eval.fid_seeds' must be at least 1"),
                                ("prdc_samples", 6, "'eval.prdc_samples' must be at least"),
                                ("extra_fid_stats", ["a b=x"], "'eval.extra_fid_stats'")]:
        with pytest.raises(ConfigError, match=message):
            EvalConfig(**{key: value}).validate()
    settings = EvalSettings.from_config(EvalConfig(extra_fid_stats=["r=x"], fid_seeds=2), prdc_samples=100)
    assert (settings.extra_stats, settings.fid_seeds, settings.prdc_samples, settings.prdc_nearest_k) == (
        ["r=x"], 2, 100, 5)


def test_extra_feature_spaces_join_the_reference_key_and_the_plain_key_stays_as_before(tmp_path):
    """Without extra spaces the reference key is what it always was (scores already published stay
    valid); an extra space is part of the result, so it makes a new key; labels are unique."""
    import hashlib

    from pipeline.eval.features import (
        DomainClassifier,
        DomainNetShape,
        save_domain_extractor,
    )
    from pipeline.eval.scoring import image_reference

    for name, architecture in (("fm-cnn", "cnn"), ("fm-resnet", "resnet")):
        torch.manual_seed(0)
        file = tmp_path / f"{name}.safetensors"
        save_domain_extractor(DomainClassifier(DomainNetShape(widths=[4, 8], feature_dim=8,
                                                              architecture=architecture)), str(file))
        extractor = fid.load_extractor(str(file), device=torch.device("cpu"))
        stats = reference_stats.compute_reference_stats("train", extractor, name,
                                                        images=iter([quantised_images(20, seed=0)]))
        stats.feature_extractor = str(file)
        reference_stats.save_reference_stats(stats, out=str(tmp_path / f"{name}.npz"))
    primary = reference_stats.load_reference_stats(str(tmp_path / "fm-cnn.npz"))

    def reference(*extra: str) -> Reference:
        settings = EvalSettings.from_config(stats=str(tmp_path / "fm-cnn.npz"), samples=100, extra_stats=list(extra))
        return image_reference(settings, torch.device("cpu"))

    plain = reference()
    assert plain.key == hashlib.sha256(f"fid:{primary.id}:100".encode()).hexdigest()[:10] and not plain.extra_spaces
    labelled = reference(f"resnet={tmp_path / 'fm-resnet.npz'}")
    (space,) = labelled.extra_spaces
    assert labelled.key != plain.key and space.label == "resnet" and space.prefix == "eval/resnet/"
    assert "resnet: fm-resnet" in labelled.description and space.extractor.id != plain.extractor.id
    assert reference(str(tmp_path / "fm-resnet.npz")).extra_spaces[0].label == "fm-resnet"  # the statistics' name
    with pytest.raises(fid.FidError, match="two feature spaces labelled 'r'"):
        reference(f"r={tmp_path / 'fm-resnet.npz'}", f"r={tmp_path / 'fm-cnn.npz'}")

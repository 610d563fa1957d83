"""Metrics from nearest neighbours in a feature space (the FID features): what FID averages away.

FID is one number for two failure modes: "sharp but collapsed" and "diverse but blurry" can
score alike. These tell them apart, from a sample of generated features and a sample of real
(training) features that `gapm fid-stats` stores with the statistics:

  precision, recall    Kynkäänniemi et al. 2019: the fraction of generated samples inside the
                       real manifold (a k-NN ball around some real sample), and of real samples
                       inside the generated manifold. Collapse lowers recall; junk lowers precision.
  density, coverage    Naeem et al. 2020: density counts how many real k-NN balls hold each
                       generated sample (/ k; ~1 for a sampler of the data, can exceed 1),
                       coverage the fraction of real samples whose ball holds a generated one.
                       Both are robust to outliers among the real samples.
  memorisation ratio   median distance from a generated sample to its nearest training sample,
                       over the same median for held-out test images: ~1 healthy, well below 1
                       suggests the model copies training images (0: exact copies).

The four of Naeem et al. come from their reference code, PyPI `prdc` (`compute_prdc`), called as
it is with equal real and generated counts and k = 5 (their recommendation). It builds the full
pairwise distance matrices: 10,000 of each side (eval.prdc_samples) take about 2 GB at peak
(a minute on two busy CPU cores for 128 features). With samples of one distribution, precision
and recall stay below 1 in high dimensions (about 0.6 for two 10,000-point Gaussian samples in
128-D): read them against the real-vs-real values of the statistics' floor.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_NEAREST_K = 5
DEFAULT_PRDC_SAMPLES = 10_000
DEFAULT_REAL_FEATURES = 10_000  # the training-feature sample kept with the statistics
PRDC_KEYS = ("precision", "recall", "density", "coverage")


def precision_recall_density_coverage(real: np.ndarray, generated: np.ndarray,
                                      nearest_k: int = DEFAULT_NEAREST_K) -> dict[str, float]:
    """prdc.compute_prdc on the two feature sets (rows are samples), as plain floats.
    Both sets need at least `nearest_k` + 2 samples (prdc partitions at k + 1)."""
    import prdc

    if min(len(real), len(generated)) < minimum_samples(nearest_k):
        raise ValueError(f"precision/recall with k={nearest_k} need at least {minimum_samples(nearest_k)} samples "
                         f"on each side, got {len(real)} real and {len(generated)} generated")
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the two counts
        values = prdc.compute_prdc(real_features=np.asarray(real, dtype=np.float32),
                                   fake_features=np.asarray(generated, dtype=np.float32), nearest_k=nearest_k)
    return {key: float(values[key]) for key in PRDC_KEYS}


def minimum_samples(nearest_k: int) -> int:
    return nearest_k + 2


def nearest_distances(queries: np.ndarray, references: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """The Euclidean distance from each query to its nearest reference, in float64 (chunked:
    memory chunk x len(references))."""
    if len(references) == 0:
        raise ValueError("no reference samples to measure distances to")
    refs = torch.from_numpy(np.ascontiguousarray(references, dtype=np.float64))
    ref_norms = (refs * refs).sum(dim=1)
    found = []
    for start in range(0, len(queries), chunk):
        block = torch.from_numpy(np.ascontiguousarray(queries[start:start + chunk], dtype=np.float64))
        # |q - r|^2 = |q|^2 + |r|^2 - 2 q.r: one matrix product per chunk
        squared = (block * block).sum(dim=1, keepdim=True) + ref_norms[None, :] - 2.0 * block @ refs.T
        found.append(squared.min(dim=1).values.clamp_min(0.0).sqrt())
    return torch.cat(found).numpy() if found else np.zeros(0)


@dataclass
class Memorisation:
    generated_median: float  # median distance generated -> nearest training sample
    test_median: float  # the same for held-out test images
    ratio: float  # generated_median / test_median

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}memorisation_ratio": self.ratio,
                f"{prefix}generated_train_distance": self.generated_median,
                f"{prefix}test_train_distance": self.test_median}


def memorisation(generated: np.ndarray, train: np.ndarray, test_median: float) -> Memorisation:
    """Generated samples against the training sample, relative to held-out test images
    (`test_median`: median of nearest_distances(test, train), stored with the statistics)."""
    if not test_median > 0:
        raise ValueError(f"the test images' median distance to the training sample is {test_median}: "
                         "the test images are copies of training images")
    median = float(np.median(nearest_distances(generated, train)))
    return Memorisation(generated_median=median, test_median=float(test_median), ratio=median / test_median)


class FeatureSample:
    """A uniform random sample of at most `size` feature rows from a stream of batches, in
    random order (bottom-k of one uniform key per row, seeded): its first n rows are a uniform
    sample of n, whatever the stream's length."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.random = np.random.default_rng(seed)
        self.keys = np.zeros(0)
        self.rows: np.ndarray | None = None

    def add(self, features: np.ndarray) -> None:
        if self.size <= 0 or len(features) == 0:
            return
        keys = self.random.random(len(features))
        rows = np.asarray(features, dtype=np.float32)
        if self.rows is not None:
            keys, rows = np.concatenate([self.keys, keys]), np.concatenate([self.rows, rows])
        if len(keys) > self.size:
            keep = np.argpartition(keys, self.size - 1)[: self.size]
            keys, rows = keys[keep], rows[keep]
        self.keys, self.rows = keys, rows

    def result(self) -> np.ndarray | None:
        if self.rows is None:
            return None
        return self.rows[np.argsort(self.keys, kind="stable")]

"""The feature spaces an image model is scored in, and the metrics of one space.

A feature space is a set of reference statistics together with the extractor they were made
with (clean-fid's Inception, or a domain classifier of pipeline.eval.features). The first
(`--stats`, eval.fid_stats) is the primary one: its metrics keep the plain keys (`eval/fid`, ...)
and `eval/fid` ranks checkpoints. Each further one (`--stats` again, eval.extra_fid_stats:
`LABEL=NAME_OR_URL`, or `NAME_OR_URL` labelled by the statistics' name) gets the same metrics
under `eval/LABEL/` (`eval/LABEL/fid`, `eval/LABEL/precision`, ...). Two spaces built
independently (another architecture, another seed) tell a real difference between models from
an artefact of one network.

The metrics of a space, from the features of the same generated images:
  fid, fid_std          mean and sample standard deviation of FID over eval.fid_seeds sets of
                        fid_samples images (std only with 2 or more sets)
  fid_floor             the statistics' real-against-real FID (`gapm fid-stats --test-data`)
  precision, recall, density, coverage
                        pipeline.eval.neighbours on the first eval.prdc_samples generated
                        features of the first set against as many of the stored training
                        features (equal counts), k = eval.prdc_nearest_k
  memorisation_ratio    (with generated_train_distance, test_train_distance) the same generated
                        features against every stored training feature, over the held-out
                        images' median distance stored with the floor
Statistics from an older `gapm fid-stats` (no training-feature sample, no floor) still give FID;
the others are left out with a warning that says how to get them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.eval import fid, neighbours, reference_stats
from pipeline.eval.settings import SPACE_LABEL, EvalSettings, split_space_spec

log = logging.getLogger(__name__)

RECOMPUTE_HINT = "recompute the statistics with `gapm fid-stats TRAIN --name NAME --test-data TEST`"


@dataclass
class FeatureSpace:
    label: str  # "": the primary space; else metrics go under eval/LABEL/
    stats: reference_stats.ReferenceStats
    extractor: fid.FeatureExtractor

    @property
    def prefix(self) -> str:
        return f"eval/{self.label}/" if self.label else "eval/"


def load_extra_spaces(settings: EvalSettings, primary: FeatureSpace, device: torch.device) -> list[FeatureSpace]:
    """The further feature spaces of settings.extra_stats, each with the extractor its
    statistics name (loaded once per extractor)."""
    extractors = {primary.stats.feature_extractor_id: primary.extractor}
    spaces: list[FeatureSpace] = []
    for spec in settings.extra_stats:
        try:
            label, name = split_space_spec(spec)
        except ValueError as error:
            raise fid.FidError(f"--stats {error}") from None
        stats = reference_stats.load_reference_stats(name, directory=settings.stats_dir)
        label = label or stats.name
        if not SPACE_LABEL.match(label):
            raise fid.FidError(f"--stats {spec}: the statistics' name {stats.name!r} cannot label metrics; "
                               "write LABEL=NAME_OR_URL with a label of letters, digits, '_', '.', '-'")
        if any(label == space.label for space in spaces):
            raise fid.FidError(f"--stats {spec}: two feature spaces labelled {label!r}; give each its own LABEL=")
        extractor = extractors.get(stats.feature_extractor_id)
        if extractor is None:
            extractor = fid.load_extractor(stats.feature_extractor, inception_weights=settings.inception_weights,
                                           device=device)
            extractors[extractor.id] = extractor
        reference_stats.check_comparable(stats, extractor, name)
        spaces.append(FeatureSpace(label=label, stats=stats, extractor=extractor))
    return spaces


def fid_spread(prefix: str, fids: list[float]) -> dict[str, float]:
    """FID over sample seeds: the mean, and the sample standard deviation from two sets on."""
    metrics = {f"{prefix}fid": float(np.mean(fids))}
    if len(fids) > 1:
        metrics[f"{prefix}fid_std"] = float(np.std(fids, ddof=1))
    return metrics


def neighbour_metrics(space: FeatureSpace, generated: np.ndarray, settings: EvalSettings) -> dict[str, float]:
    """Floor, precision/recall/density/coverage and memorisation of one space (see the module
    doc); `generated`: generated features of the first seed, at most eval.prdc_samples."""
    stats, prefix, metrics = space.stats, space.prefix, {}
    where = stats.location or stats.name
    if stats.floor is not None:
        metrics[f"{prefix}fid_floor"] = float(stats.floor["fid"])
    real = stats.real_features
    if real is None:
        log.warning("statistics %s hold no sample of training features: no precision/recall/density/coverage "
                    "or memorisation ratio; %s", where, RECOMPUTE_HINT)
        return metrics
    count = min(len(real), len(generated), settings.prdc_samples)
    if count < neighbours.minimum_samples(settings.prdc_nearest_k):
        log.warning("precision/recall/density/coverage need at least %d samples on each side (here %d generated, "
                    "%d real); not computed", neighbours.minimum_samples(settings.prdc_nearest_k), len(generated),
                    len(real))
        return metrics
    values = neighbours.precision_recall_density_coverage(real[:count], generated[:count], settings.prdc_nearest_k)
    metrics.update({f"{prefix}{key}": value for key, value in values.items()})
    test_median = (stats.floor or {}).get("test_train_distance")
    if test_median is None:
        log.warning("statistics %s have no held-out images' distances (no floor): no memorisation ratio; %s",
                    where, RECOMPUTE_HINT)
        return metrics
    try:
        memorised = neighbours.memorisation(generated[:count], real, test_median)
    except ValueError as error:
        log.warning("statistics %s: no memorisation ratio (%s)", where, error)
        return metrics
    metrics.update(memorised.metrics(prefix))
    return metrics

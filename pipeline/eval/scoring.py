"""Scoring one model: what a score is relative to (`Reference`), FID of generated samples and the
test reconstruction MSE for image models (split across ranks when launched with several
processes), the coverage metrics for point models, and the record a score is published as.

What a score is.
  Image models: clean-fid FID of N generated samples (default eval.fid_samples, 50,000, as in
  the paper) against reference statistics (`gapm fid-stats`), optionally KID, and the
  reconstruction MSE over the whole test split (pixels in [0, 1]). The ranking metric is
  `eval/fid`: the mean over eval.fid_seeds sets of N samples (seeds seed, seed+1, ...; their
  spread is `eval/fid_std`). Each set's images are generated once and go through every feature
  space (pipeline.eval.feature_spaces: the FID floor, precision/recall/density/coverage and the
  memorisation ratio from the first set, further spaces under eval/LABEL/). Samples come from
  the model's own `sample` (its own prior, so baselines are scored the same way) with a
  generator seeded from (seed, rank), fed to clean-fid as its `gen`.
  Point models (swiss-roll): reconstruction MSE, sample MMD, nearest-data distance and the
  roll's coverage metrics against the held-out points (as at the end of training, at most
  10,000 samples); ranked by `eval/test_sample_mmd`. Lower is better for both.

Several processes. `gapm eval` launched with several processes (torchrun / accelerate
launch; torch.distributed is initialised from the environment when it is not already)
splits the N samples across ranks, each with its own seed, and all-reduces the feature sums
(mean and covariance need nothing else); KID and the nearest-neighbour metrics gather at most
10,000 (eval.prdc_samples) feature vectors per space. The
test split is split by shards when there are enough, else rank 0 reads it. Rank 0 logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gapm import Method, SampleStream, reconstruct
from pipeline import console
from pipeline.data import sources, streaming
from pipeline.data.settings import DataConfig
from pipeline.errors import GapmError
from pipeline.eval import feature_spaces, fid, quality, reference_stats
from pipeline.eval.feature_spaces import FeatureSpace
from pipeline.eval.settings import EvalSettings

log = logging.getLogger(__name__)

FID_METRIC, POINT_METRIC = "eval/fid", "eval/test_sample_mmd"
MAX_POINT_SAMPLES = 10_000
MAX_KID_FEATURES = 10_000
# data.train/test values that are generated in memory, not a shard set
GENERATED_SOURCES = (*sources.ROLLS, sources.SYNTHETIC)


class EvalError(GapmError):
    """An evaluation that cannot run as asked; the message says what to change."""


class RunMismatch(EvalError):
    """This run cannot be scored with the job's reference (e.g. another image size)."""


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_ranks(device: str | None = None) -> Ranks:
    """This process's rank; initialises torch.distributed from torchrun/accelerate's
    environment (WORLD_SIZE > 1) when nobody has yet."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available() and device in (None, "cuda"):
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device:
        chosen = torch.device(device)
    elif torch.cuda.is_available():
        chosen = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    else:
        chosen = torch.device("cpu")
    return Ranks(rank, world, chosen)


def _all_reduce_sum(values: np.ndarray, ranks: Ranks) -> np.ndarray:
    if ranks.world == 1:
        return values
    import torch.distributed as dist

    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    on_device = tensor.to(ranks.device) if dist.get_backend() == "nccl" else tensor
    dist.all_reduce(on_device)
    return on_device.cpu().numpy()


def reduce_moments(moments: fid.FeatureMoments, dim: int, ranks: Ranks) -> fid.FeatureMoments:
    if ranks.world == 1:
        return moments
    total = moments.total if moments.total is not None else np.zeros(dim)
    outer = moments.outer if moments.outer is not None else np.zeros((dim, dim))
    flat = _all_reduce_sum(np.concatenate([[moments.count], total, outer.ravel()]), ranks)
    return fid.FeatureMoments(count=int(round(flat[0])), total=flat[1:dim + 1], outer=flat[dim + 1:].reshape(dim, dim))


def rank_seed(seed: int, rank: int) -> int:
    return seed * 1_000_003 + rank


def rank_share(count: int, ranks: Ranks) -> int:
    return count // ranks.world + (1 if ranks.rank < count % ranks.world else 0)


# --------------------------------------------------------------------------- what we compare against


@dataclass
class Reference:
    """Everything a score is relative to; `key` names comparable scores."""

    key: str
    description: str
    stats: reference_stats.ReferenceStats | None = None  # of the primary feature space
    extractor: fid.FeatureExtractor | None = None
    samples: int = 0
    extra_spaces: list[FeatureSpace] = field(default_factory=list)

    def feature_spaces(self) -> list[FeatureSpace]:
        """The primary space first, then the extra ones."""
        return [FeatureSpace("", self.stats, self.extractor), *self.extra_spaces]


def image_reference(settings: EvalSettings, device: torch.device) -> Reference:
    if not settings.stats:
        raise fid.FidError("no reference statistics for FID: pass --stats NAME_OR_URL (or set eval.fid_stats); "
                        "compute them from the training shards with `gapm fid-stats SHARDS --name NAME`")
    stats = reference_stats.load_reference_stats(settings.stats, directory=settings.stats_dir, with_kid=settings.kid)
    extractor = fid.load_extractor(settings.feature_extractor or stats.feature_extractor,
                                   inception_weights=settings.inception_weights, device=device)
    reference_stats.check_comparable(stats, extractor, settings.stats)
    extra = feature_spaces.load_extra_spaces(settings, FeatureSpace("", stats, extractor), device)
    # extra spaces are part of what a result holds: adding one scores every checkpoint again
    identity = f"fid:{stats.id}:{settings.samples}" + "".join(f":{s.label}={s.stats.id}" for s in extra)
    description = f"FID-{settings.samples} vs {stats.name} ({stats.feature_extractor_id})" + "".join(
        f"; {s.label}: {s.stats.name} ({s.stats.feature_extractor_id})" for s in extra)
    return Reference(key=hashlib.sha256(identity.encode()).hexdigest()[:10], description=description,
                     stats=stats, extractor=extractor, samples=settings.samples, extra_spaces=extra)


def point_reference(data: DataConfig, seed: int, samples: int) -> Reference:
    samples = min(samples, MAX_POINT_SAMPLES)
    source = (f"{data.test}:{data.swissroll_test_samples}:{seed}" if data.test in sources.ROLLS else data.test)
    key = hashlib.sha256(f"points:{source}:{samples}".encode()).hexdigest()[:10]
    return Reference(key=key, description=f"sample MMD-{samples} vs {source}", samples=samples)


# --------------------------------------------------------------------------- scoring one model


def image_generator(model: Method, device: torch.device, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """clean-fid's `gen`: a batch of B -> float images (B, 3, H, W) in [0, 255]. The samples
    come from the model's own `sample` (its own prior: Method's G(g(z)), or a baseline's) with
    a generator seeded here, as `gapm sample` draws them; clean-fid's z only sets B."""
    stream = SampleStream(model, seed, device)

    def generate(z: torch.Tensor) -> torch.Tensor:
        return fid.to_rgb_255(stream.draw(len(z)))

    return generate


def split_reconstruction_mse(model: Method, spec: str, ranks: Ranks, batch_size: int) -> tuple[float, int]:
    """Mean squared error over every pixel of every test image, pixels in [0, 1]."""
    shards = len(streaming.resolve_shard_urls(spec))
    split = shards >= ranks.world
    squared, values, images = 0.0, 0, 0
    if split or ranks.is_main:
        stream = streaming.make_batch_stream(spec, batch_size, rank=ranks.rank if split else 0,
                                             world_size=ranks.world if split else 1, drop_last=False,
                                             shuffle_buffer=0)
        what = f"reconstructions of {spec}" + (" (rank 0's shards)" if split and ranks.world > 1 else "")
        with console.progress_bar(stream.samples_per_pass(), what, unit="img") as progress:
            for batch in stream:
                recon = reconstruct(model, batch, batch_size)
                squared += torch.sum((recon.double() - batch.double()) ** 2).item()
                values += batch.numel()
                images += len(batch)
                progress.update(len(batch))
    squared, values, images = _all_reduce_sum(np.array([squared, values, images], dtype=np.float64), ranks)
    if values == 0:
        raise EvalError(f"test data {spec} holds no readable images")
    return squared / values, int(images)


def gather_rows(features: np.ndarray, limit: int, ranks: Ranks) -> np.ndarray:
    """At most `limit` feature rows from all ranks together (each gives ceil(limit / world))."""
    keep = features[: math.ceil(limit / ranks.world)]
    if ranks.world == 1:
        return keep
    import torch.distributed as dist

    gathered: list[Any] = [None] * ranks.world
    dist.all_gather_object(gathered, keep)
    return np.concatenate([g for g in gathered if len(g)])


def generated_space_features(model: Method, spaces: list[FeatureSpace], settings: EvalSettings, ranks: Ranks,
                             seed_index: int, share: int) -> list[np.ndarray]:
    """This rank's `share` generated images of set `seed_index`, in every feature space."""
    seed = rank_seed(settings.seed + seed_index, ranks.rank)
    what = "FID samples" + (f" (rank 0's {share} of {settings.samples})" if ranks.world > 1 else "")
    with console.progress_bar(share, what, unit="img") as progress:
        if settings.fid_seeds > 1:
            progress.set_postfix(seed=f"{seed_index + 1}/{settings.fid_seeds}", refresh=False)
        generate = image_generator(model, ranks.device, seed)

        def counted(z: torch.Tensor) -> torch.Tensor:
            images = generate(z)
            progress.update(len(images))
            return images

        return fid.generated_features_in_spaces(counted, 1, share, [space.extractor for space in spaces],
                                                batch_size=settings.batch_size, seed=seed)


def score_image_model(model: Method, reference: Reference, settings: EvalSettings, test_data: str | None,
                      ranks: Ranks) -> dict[str, float]:
    stats = reference.stats
    shape = list(model.shape.data_shape)
    for space in reference.feature_spaces():
        if space.stats.image_shape and [shape[1], shape[2]] != list(space.stats.image_shape[1:]):
            raise EvalError(f"the model generates {shape} images but the reference statistics "
                            f"{space.stats.location or space.stats.name} are of {space.stats.image_shape} images; "
                            "use statistics of this dataset")
    model.to(ranks.device)
    started = time.perf_counter()
    spaces = reference.feature_spaces()
    share = rank_share(reference.samples, ranks)
    fids: list[list[float]] = [[] for _ in spaces]
    first_set: list[np.ndarray] = []
    count = 0
    for seed_index in range(settings.fid_seeds):
        features = generated_space_features(model, spaces, settings, ranks, seed_index, share)
        for space, space_features, values in zip(spaces, features, fids):
            moments = fid.FeatureMoments()
            moments.add(space_features)
            moments = reduce_moments(moments, len(space.stats.mu), ranks)
            values.append(reference_stats.fid_against(space.stats, moments))
            count = moments.count
        if seed_index == 0:
            first_set = features
    metrics = {"eval/fid_samples": float(count), "eval/fid_seeds": float(settings.fid_seeds),
               "eval/fid_seconds": time.perf_counter() - started}
    started = time.perf_counter()
    for space, values, features in zip(spaces, fids, first_set):
        metrics.update(feature_spaces.fid_spread(space.prefix, values))
        generated = gather_rows(features, settings.prdc_samples, ranks)
        if ranks.is_main:
            metrics.update(feature_spaces.neighbour_metrics(space, generated, settings))
    metrics["eval/neighbour_seconds"] = time.perf_counter() - started
    if settings.kid:
        keep = gather_rows(first_set[0], MAX_KID_FEATURES, ranks)
        metrics["eval/kid"] = fid.kernel_inception_distance(keep, stats.kid_features, seed=settings.seed)
    if test_data and test_data not in GENERATED_SOURCES:
        mse, count = split_reconstruction_mse(model, test_data, ranks, settings.batch_size)
        metrics["eval/test_reconstruction_mse"] = mse
        metrics["eval/test_images"] = float(count)
    elif ranks.is_main:
        log.warning("no test split for the reconstruction MSE (pass --test-data); FID only")
    return metrics


def score_point_model(model: Method, reference: Reference, data: DataConfig, data_seed: int,
                      settings: EvalSettings) -> dict[str, float]:
    held_out = sources.held_out_data(data, data_seed, limit=1_000_000, data_shape=list(model.shape.data_shape))
    model.to("cpu")
    metrics, _, _ = quality.evaluate(model, held_out, reference.samples, seed=settings.seed,
                                     roll=sources.test_roll(data))
    return {"eval/test_" + key.removeprefix("eval/"): value for key, value in metrics.items()}


def score_metric(model: Method) -> str:
    return FID_METRIC if model.shape.is_image else POINT_METRIC


def evaluate_model(model: Method, settings: EvalSettings, *, data: DataConfig | None, data_seed: int,
                   ranks: Ranks, reference: Reference | None = None) -> tuple[dict[str, float], Reference]:
    """Scores one model; returns (metrics, the reference they are relative to)."""
    if model.shape.is_image:
        reference = reference or image_reference(settings, ranks.device)
        test_data = settings.test_data or (data.test if data else None)
        return score_image_model(model, reference, settings, test_data, ranks), reference
    data = data or DataConfig()
    if settings.test_data:
        data = dataclasses.replace(data, test=settings.test_data)
    reference = reference or point_reference(data, data_seed, settings.samples)
    metrics = score_point_model(model, reference, data, data_seed, settings) if ranks.is_main else {}
    return metrics, reference


def result_record(model: Method, metrics: dict[str, float], reference: Reference, settings: EvalSettings,
                  step: int, checkpoint: str, seconds: float) -> dict[str, Any]:
    metric = score_metric(model)
    return {"step": step, "checkpoint": checkpoint, "score_metric": metric, "score": metrics[metric],
            "metrics": metrics, "reference": reference.key, "reference_description": reference.description,
            "stats": reference.stats.location if reference.stats is not None else None,
            "stats_name": reference.stats.name if reference.stats is not None else None,
            "stats_id": reference.stats.id if reference.stats is not None else None, "samples": reference.samples,
            "fid_floor": reference.stats.floor if reference.stats is not None else None,
            "feature_spaces": {space.label: {"stats": space.stats.location, "stats_name": space.stats.name,
                                             "stats_id": space.stats.id, "fid_floor": space.stats.floor}
                               for space in reference.extra_spaces},
            "seed": settings.seed, "seconds": round(seconds, 3), "evaluator": socket.gethostname(),
            "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}



"""Checkpoint evaluation jobs: `gapm eval` scores one checkpoint, `gapm eval-watch` scores
every checkpoint MLflow knows that has no score yet and moves the registry alias
`champion` to the best.

What a score is.
  Image models: clean-fid FID of N generated samples (default 50,000, as in the paper)
  against reference statistics (`gapm fid-stats`), optionally KID, and the reconstruction MSE
  over the whole test split (pixels in [0, 1]). The ranking metric is `eval/fid`. Samples
  come from the model's own `sample` (its own prior, so baselines are scored the same way)
  with a generator seeded from (seed, rank), fed to clean-fid as its `gen`.
  Point models (swiss-roll): reconstruction MSE, sample MMD and nearest-data distance against
  the held-out points (as at the end of training, at most 10,000 samples); ranked by
  `eval/test_sample_mmd`. Lower is better for both.

Where results go. To the MLflow run the checkpoint belongs to, with the training step as
the metric step (`eval/fid`, `eval/kid`, `eval/test_reconstruction_mse`, ...), together with
one tag per checkpoint and reference, `gapm.eval.<reference>.step-XXXXXXXX`, holding the whole
result as JSON; that tag is the "already evaluated" mark. <reference> is a short hash of what
makes scores comparable (the statistics, their feature extractor, N) — new statistics or a
new N mean everything is scored again, and the champion is chosen among comparable scores
only. Metrics and tag are written in one `log_batch`.

Several processes. `gapm eval` launched with several processes (torchrun / accelerate
launch; torch.distributed is initialised from the environment when it is not already)
splits the N samples across ranks, each with its own seed, and all-reduces the feature sums
(mean and covariance need nothing else); KID gathers at most 10,000 feature vectors. The
test split is split by shards when there are enough, else rank 0 reads it. Rank 0 logs.
`eval-watch` is one process (one GPU is plenty for 50k samples); run several copies to
spread work — claims (pipeline.eval.claims) keep them from doing the same checkpoint twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gapm import GAPM
from pipeline.data import sources, storage
from pipeline.data.sources import DataConfig
from pipeline.errors import GapmError
from pipeline.eval import fid, quality, reference_stats
from pipeline.eval.claims import DEFAULT_TTL_S, ClaimStore
from pipeline.eval.settings import EvalConfig, EvalSettings
from pipeline.train import checkpoints

log = logging.getLogger(__name__)

RESULT_TAG_PREFIX = "gapm.eval."
CLAIMS_ENV = "GAPM_EVAL_CLAIMS"
FID_METRIC, POINT_METRIC = "eval/fid", "eval/test_sample_mmd"
MAX_POINT_SAMPLES = 10_000
MAX_KID_FEATURES = 10_000
CHAMPION_WAIT_S = 120.0
CHECKPOINT_ARTIFACTS = "checkpoints"
# data.train/test values that are generated in memory, not a shard set
GENERATED_SOURCES = (*sources.ROLLS, sources.SYNTHETIC)
RUN_IN_ARTIFACT_PATH = re.compile(r"/([0-9a-f]{32})/artifacts/(.+?)/?$")
VERSION_SCORE_TAG, VERSION_REFERENCE_TAG = "gapm.eval.score", "gapm.eval.reference"


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
    stats: reference_stats.ReferenceStats | None = None
    extractor: fid.FeatureExtractor | None = None
    samples: int = 0


def image_reference(settings: EvalSettings, device: torch.device) -> Reference:
    if not settings.stats:
        raise fid.FidError("no reference statistics for FID: pass --stats NAME_OR_URL (or set eval.fid_stats); "
                        "compute them from the training shards with `gapm fid-stats SHARDS --name NAME`")
    stats = reference_stats.load_reference_stats(settings.stats, with_kid=settings.kid)
    extractor = fid.load_extractor(settings.feature_extractor or stats.feature_extractor,
                                   inception_weights=settings.inception_weights, device=device)
    reference_stats.check_comparable(stats, extractor, settings.stats)
    key = hashlib.sha256(f"fid:{stats.id}:{settings.samples}".encode()).hexdigest()[:10]
    return Reference(key=key, description=f"FID-{settings.samples} vs {stats.name} ({stats.feature_extractor_id})",
                     stats=stats, extractor=extractor, samples=settings.samples)


def point_reference(data: DataConfig, seed: int, samples: int) -> Reference:
    samples = min(samples, MAX_POINT_SAMPLES)
    source = (f"{data.test}:{data.swissroll_test_samples}:{seed}" if data.test in sources.ROLLS else data.test)
    key = hashlib.sha256(f"points:{source}:{samples}".encode()).hexdigest()[:10]
    return Reference(key=key, description=f"sample MMD-{samples} vs {source}", samples=samples)


# --------------------------------------------------------------------------- scoring one model


def image_generator(model: GAPM, device: torch.device, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """clean-fid's `gen`: a batch of B -> float images (B, 3, H, W) in [0, 255]. The samples
    come from the model's own `sample` (its own prior: GAPM's G(g(z)), or a baseline's) with
    a generator seeded here, as `gapm sample` draws them; clean-fid's z only sets B."""
    shape = model.shape.data_shape
    generator = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def generate(z: torch.Tensor) -> torch.Tensor:
        samples = model.sample(len(z), generator)
        return fid.to_rgb_255(sources.to_data_space(samples.float(), shape))

    return generate


def split_reconstruction_mse(model: GAPM, spec: str, ranks: Ranks, batch_size: int) -> tuple[float, int]:
    """Mean squared error over every pixel of every test image, pixels in [0, 1]."""
    from pipeline.data import streaming

    shards = len(streaming.resolve_shard_urls(spec))
    split = shards >= ranks.world
    squared, values, images = 0.0, 0, 0
    if split or ranks.is_main:
        stream = streaming.make_batch_stream(spec, batch_size, rank=ranks.rank if split else 0,
                                             world_size=ranks.world if split else 1, drop_last=False,
                                             shuffle_buffer=0)
        for batch in stream:
            recon = quality.reconstruct_in_batches(model, batch, model.shape.data_shape, batch_size)
            squared += torch.sum((recon.double() - batch.double()) ** 2).item()
            values += batch.numel()
            images += len(batch)
    squared, values, images = _all_reduce_sum(np.array([squared, values, images], dtype=np.float64), ranks)
    if values == 0:
        raise EvalError(f"test data {spec} holds no readable images")
    return squared / values, int(images)


def score_image_model(model: GAPM, reference: Reference, settings: EvalSettings, test_data: str | None,
                      ranks: Ranks) -> dict[str, float]:
    stats, extractor = reference.stats, reference.extractor
    shape = list(model.shape.data_shape)
    if stats.image_shape and [shape[1], shape[2]] != list(stats.image_shape[1:]):
        raise EvalError(f"the model generates {shape} images but the reference statistics {settings.stats} "
                        f"are of {stats.image_shape} images; use statistics of this dataset")
    model.to(ranks.device)
    started = time.perf_counter()
    seed = rank_seed(settings.seed, ranks.rank)
    features = fid.generated_features(image_generator(model, ranks.device, seed), 1, rank_share(reference.samples, ranks),
                                      extractor, batch_size=settings.batch_size, seed=seed)
    moments = fid.FeatureMoments()
    moments.add(features)
    moments = reduce_moments(moments, len(stats.mu), ranks)
    metrics = {FID_METRIC: reference_stats.fid_against(stats, moments), "eval/fid_samples": float(moments.count),
               "eval/fid_seconds": time.perf_counter() - started}
    if settings.kid:
        keep = features[: math.ceil(MAX_KID_FEATURES / ranks.world)]
        if ranks.world > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * ranks.world
            dist.all_gather_object(gathered, keep)
            keep = np.concatenate([g for g in gathered if len(g)])
        metrics["eval/kid"] = fid.kernel_inception_distance(keep, stats.kid_features, seed=settings.seed)
    if test_data and test_data not in GENERATED_SOURCES:
        mse, count = split_reconstruction_mse(model, test_data, ranks, settings.batch_size)
        metrics["eval/test_reconstruction_mse"] = mse
        metrics["eval/test_images"] = float(count)
    elif ranks.is_main:
        log.warning("no test split for the reconstruction MSE (pass --test-data); FID only")
    return metrics


def score_point_model(model: GAPM, reference: Reference, data: DataConfig, data_seed: int,
                      settings: EvalSettings) -> dict[str, float]:
    held_out = sources.held_out_data(data, data_seed, limit=1_000_000, data_shape=list(model.shape.data_shape))
    model.to("cpu")
    metrics, _, _ = quality.evaluate(model, held_out, list(model.shape.data_shape), reference.samples,
                                        seed=settings.seed, roll=sources.test_roll(data))
    return {"eval/test_" + key.removeprefix("eval/"): value for key, value in metrics.items()}


def score_metric(model: GAPM) -> str:
    return FID_METRIC if sources.is_image_shape(model.shape.data_shape) else POINT_METRIC


# --------------------------------------------------------------------------- MLflow plumbing


def mlflow_client(tracking_uri: str | None = None):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return MlflowClient(uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def result_tag(reference_key: str, step: int) -> str:
    return f"{RESULT_TAG_PREFIX}{reference_key}.{checkpoints.checkpoint_name(step)}"


def parse_result_tag(key: str, reference_key: str) -> int | None:
    prefix = f"{RESULT_TAG_PREFIX}{reference_key}.step-"
    return int(key[len(prefix):]) if key.startswith(prefix) and key[len(prefix):].isdigit() else None


def publish(client: Any, run_id: str, step: int, metrics: dict[str, float], record: dict[str, Any]) -> None:
    """Metrics (at the training step) and the result tag in one call."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()],
                     tags=[RunTag(result_tag(record["reference"], step), json.dumps(record, sort_keys=True))])


def run_data_config(params: dict[str, str], test_data: str | None = None) -> tuple[DataConfig, int]:
    """The run's data settings (and seed) from its MLflow params (the flattened config)."""
    data = DataConfig()
    for key in ("train", "test"):
        setattr(data, key, params.get(f"data.{key}", getattr(data, key)))
    for key in ("batch_size", "swissroll_samples", "swissroll_test_samples"):
        if f"data.{key}" in params:
            setattr(data, key, int(params[f"data.{key}"]))
    if test_data:
        data.test = test_data
    return data, int(params.get("seed", 0))


# --------------------------------------------------------------------------- gapm eval


@dataclass
class Target:
    """A model to score, and where its results go."""

    uri: str
    run_id: str | None = None
    tracking_uri: str | None = None
    step: int | None = None
    run_dir: Path | None = None


def _is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(("runs:/", "models:/", "mlflow-artifacts:"))


def resolve_target(uri: str, run_id: str | None = None) -> Target:
    target = Target(uri=uri, run_id=run_id)
    found = RUN_IN_ARTIFACT_PATH.search(uri)
    if uri.startswith("runs:/"):
        target.run_id = target.run_id or uri[len("runs:/"):].split("/", 1)[0]
    elif found and not target.run_id:
        target.run_id = found.group(1)
    if not _is_mlflow_uri(uri) and not checkpoints.is_remote(uri):
        path = Path(storage.local_path(uri))
        if path.parent.name == "checkpoints":
            run_dir = path.parent.parent
            target.run_dir = run_dir
            from pipeline.tracking.mlflow_sink import RUN_ID_FILE, resolve_tracking_uri

            id_file = run_dir / RUN_ID_FILE
            if not target.run_id and id_file.is_file():
                target.run_id = id_file.read_text().strip() or None
            if target.run_id:
                target.tracking_uri = resolve_tracking_uri(run_dir)[0]
    if target.tracking_uri is None and target.run_id:
        target.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    return target


def load_target(target: Target, scratch: str) -> tuple[GAPM, int | None]:
    """The model and the training step it was saved at."""
    uri = target.uri
    if uri.startswith("runs:/") and checkpoints.checkpoint_basename(uri).startswith("step-"):
        artifact_path = uri[len("runs:/"):].split("/", 1)[1] if "/" in uri[len("runs:/"):] else ""
        local = download_checkpoint(mlflow_client(target.tracking_uri), target.run_id, artifact_path, scratch)
        model, meta = checkpoints.load_model(local)
        return model, meta.step
    if uri.startswith("mlflow-artifacts:"):
        import mlflow

        local = Path(scratch) / "checkpoint"
        for name in (checkpoints.META_FILE, checkpoints.MODEL_FILE):
            mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/{name}", dst_path=str(local))
        model, meta = checkpoints.load_model(local)
        return model, meta.step
    if _is_mlflow_uri(uri):
        from pipeline.tracking import registry

        model = registry.load_generator(uri)
        run_id, step = model_source(uri, target.tracking_uri)
        target.run_id = target.run_id or run_id
        target.tracking_uri = target.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        return model, step
    location = uri if checkpoints.is_remote(uri) else Path(storage.local_path(uri))
    model, meta = checkpoints.load_model(location)
    if target.run_id is None and checkpoints.is_remote(uri):
        target.run_id = find_run_by_checkpoint_location(uri, target.tracking_uri)
        target.tracking_uri = target.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return model, meta.step


def model_source(uri: str, tracking_uri: str | None) -> tuple[str | None, int | None]:
    """(run id, checkpoint step) of a logged or registered gapm model."""
    from pipeline.tracking import registry

    client = mlflow_client(tracking_uri)
    rest = uri.split(":/", 1)[1].strip("/")
    tags: dict[str, str] = {}
    run_id = None
    if uri.startswith("runs:/"):
        run_id = rest.split("/", 1)[0]
        logged = registry.find_logged_model(client, run_id)
        tags = dict(logged.tags) if logged else {}
    elif "@" in rest:
        name, alias = rest.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
        run_id, tags = version.run_id, dict(version.tags)
    elif "/" in rest:
        name, number = rest.split("/", 1)
        version = client.get_model_version(name, number)
        run_id, tags = version.run_id, dict(version.tags)
    else:
        logged = client.get_logged_model(rest)
        run_id, tags = logged.source_run_id, dict(logged.tags)
    step = tags.get(registry.CHECKPOINT_STEP_TAG)
    return run_id, int(step) if step and step.isdigit() else None


def find_run_by_checkpoint_location(location: str, tracking_uri: str | None) -> str | None:
    """The run whose latest-checkpoint tag points into the same checkpoint directory."""
    from pipeline.tracking.mlflow_sink import LATEST_CHECKPOINT_TAG

    if not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        return None
    client = mlflow_client(tracking_uri)
    parent = location.rstrip("/").rsplit("/", 1)[0]
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{LATEST_CHECKPOINT_TAG}` LIKE '{parent}/%'",
                              max_results=2)
    return runs[0].info.run_id if len(runs) == 1 else None


def download_checkpoint(client: Any, run_id: str, artifact_path: str, scratch: str) -> Path:
    """model.safetensors + meta.json of a checkpoint logged as run artifacts."""
    local = Path(scratch) / checkpoints.checkpoint_basename(artifact_path or "checkpoint")
    local.mkdir(parents=True, exist_ok=True)
    for name in (checkpoints.META_FILE, checkpoints.MODEL_FILE):
        downloaded = client.download_artifacts(run_id, f"{artifact_path.rstrip('/')}/{name}", str(local / ".dl"))
        os.replace(downloaded, local / name)
    return local


def evaluate_model(model: GAPM, settings: EvalSettings, *, data: DataConfig | None, data_seed: int,
                   ranks: Ranks, reference: Reference | None = None) -> tuple[dict[str, float], Reference]:
    """Scores one model; returns (metrics, the reference they are relative to)."""
    if sources.is_image_shape(model.shape.data_shape):
        reference = reference or image_reference(settings, ranks.device)
        test_data = settings.test_data or (data.test if data else None)
        return score_image_model(model, reference, settings, test_data, ranks), reference
    data = data or DataConfig()
    if settings.test_data:
        data = dataclasses.replace(data, test=settings.test_data)
    reference = reference or point_reference(data, data_seed, settings.samples)
    metrics = score_point_model(model, reference, data, data_seed, settings) if ranks.is_main else {}
    return metrics, reference


def result_record(model: GAPM, metrics: dict[str, float], reference: Reference, settings: EvalSettings,
                  step: int, checkpoint: str, seconds: float) -> dict[str, Any]:
    metric = score_metric(model)
    return {"step": step, "checkpoint": checkpoint, "score_metric": metric, "score": metrics[metric],
            "metrics": metrics, "reference": reference.key, "reference_description": reference.description,
            "stats": settings.stats if reference.stats is not None else None, "samples": reference.samples,
            "seed": settings.seed, "seconds": round(seconds, 3), "evaluator": socket.gethostname(),
            "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_eval(uri: str, settings: EvalSettings, *, run_id: str | None = None, log_to_mlflow: bool = True
             ) -> dict[str, Any] | None:
    """`gapm eval`: scores one checkpoint or model; rank 0 returns (and logs) the record."""
    ranks = distributed_ranks(settings.device)
    target = resolve_target(uri, run_id)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        model, step = load_target(target, scratch)
    data, data_seed = None, 0
    params = {}
    if target.run_id and target.tracking_uri:
        try:
            params = mlflow_client(target.tracking_uri).get_run(target.run_id).data.params
        except Exception as error:  # noqa: BLE001 - data settings are optional here
            log.warning("could not read run %s from MLflow (%s); pass --test-data", target.run_id, error)
    if params:
        data, data_seed = run_data_config(params)
    elif target.run_dir is not None and (target.run_dir / "config.yaml").is_file():
        from pipeline.config import ConfigError, load_config

        try:
            config = load_config(target.run_dir / "config.yaml")
            data, data_seed = config.data, config.seed
        except ConfigError as error:
            log.warning("cannot read %s (%s); pass --test-data", target.run_dir / "config.yaml", error)
    metrics, reference = evaluate_model(model, settings, data=data, data_seed=data_seed, ranks=ranks)
    if not ranks.is_main:
        return None
    record = result_record(model, metrics, reference, settings, step or 0, uri, time.perf_counter() - started)
    if log_to_mlflow:
        if target.run_id and target.tracking_uri:
            publish(mlflow_client(target.tracking_uri), target.run_id, step or 0, metrics, record)
            record["run_id"] = target.run_id
            log.info("logged to MLflow run %s at step %s (%s)", target.run_id, step, target.tracking_uri)
        else:
            log.warning("%s: no MLflow run found for it (pass --run-id); results printed only", uri)
    return record


# --------------------------------------------------------------------------- gapm eval-watch


@dataclass
class Candidate:
    run: Any  # mlflow Run
    step: int
    sources: list[str]  # where the checkpoint can be read, best first

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


@dataclass
class PassSummary:
    evaluated: list[dict[str, Any]] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # claimed by another job
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    champions: dict[str, str] = field(default_factory=dict)  # model name -> "version N (moved)" / "unchanged"

    @property
    def did_nothing(self) -> bool:
        return not self.evaluated and not any("moved" in c for c in self.champions.values())


@dataclass
class WatchOptions:
    experiments: list[str] | None  # MLflow experiment names; None: all
    claims: str
    run_names: list[str] | None = None  # only runs of these config names (None: every gapm run)
    tracking_uri: str | None = None
    alias: str = EvalConfig.champion_alias
    claim_ttl_s: float = DEFAULT_TTL_S
    max_evaluations: int | None = None
    data: DataConfig | None = None  # from --config: overrides the runs' params
    data_seed: int | None = None


def registered_name(run: Any, client: Any) -> str:
    from pipeline.tracking import registry

    name = run.data.tags.get(registry.REGISTERED_NAME_TAG)
    return name or registry.default_model_name(run.info.run_name)


def gapm_runs(client: Any, experiments: list[str] | None, run_names: list[str] | None = None) -> list[Any]:
    """Active runs written by `gapm train` in the named experiments (all when None), only
    those named `run_names` (the config names) when given."""
    from mlflow.entities import ViewType

    from pipeline.tracking import registry

    if experiments:
        found = []
        for name in experiments:
            experiment = client.get_experiment_by_name(name)
            if experiment is None or experiment.lifecycle_stage != "active":
                log.info("MLflow has no experiment %r yet: nothing to evaluate there", name)
                continue
            found.append(experiment.experiment_id)
        experiment_ids = found
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    runs, token = [], None
    while experiment_ids:
        page = client.search_runs(experiment_ids, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(run for run in page if registry.REGISTERED_NAME_TAG in run.data.tags
                    and (run_names is None or run.info.run_name in run_names))
        token = page.token
        if not token:
            break
    return runs


def checkpoints_of_run(client: Any, run: Any) -> dict[int, list[str]]:
    """step -> places to read the checkpoint from: a local or s3:// copy where the run's
    checkpoints live (tag gapm.latest_checkpoint), then the run's artifacts."""
    from pipeline.tracking.mlflow_sink import LATEST_CHECKPOINT_TAG

    found: dict[int, list[str]] = {}
    latest = run.data.tags.get(LATEST_CHECKPOINT_TAG)
    if latest:
        directory = latest.rstrip("/").rsplit("/", 1)[0]
        try:
            if checkpoints.is_remote(directory) or Path(directory).is_dir():
                for location in checkpoints.list_checkpoints(directory):
                    step = _step_of(checkpoints.checkpoint_basename(location))
                    if step is not None:
                        found.setdefault(step, []).append(str(location))
        except storage.StorageError as error:
            log.warning("run %s: cannot list checkpoints in %s (%s)", run.info.run_id, directory, error)
    run_id = run.info.run_id
    for entry in client.list_artifacts(run_id, CHECKPOINT_ARTIFACTS):
        step = _step_of(entry.path.rsplit("/", 1)[-1])
        if not entry.is_dir or step is None:
            continue
        names = {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(run_id, entry.path) if not f.is_dir}
        if {checkpoints.META_FILE, checkpoints.MODEL_FILE} <= names:  # else: still uploading
            found.setdefault(step, []).append(f"runs:/{run_id}/{entry.path}")
    return found


def _step_of(name: str) -> int | None:
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def read_candidate_meta(client: Any, candidate: Candidate) -> checkpoints.CheckpointMeta:
    source = candidate.sources[0]
    if source.startswith("runs:/"):
        with tempfile.TemporaryDirectory() as scratch:
            path = client.download_artifacts(candidate.run_id, f"{source.split('/', 2)[2]}/{checkpoints.META_FILE}",
                                             scratch)
            return checkpoints.read_meta(Path(path).parent)
    return checkpoints.read_meta(source if checkpoints.is_remote(source) else Path(source))


def load_candidate(client: Any, candidate: Candidate, scratch: str) -> tuple[GAPM, str, Path | None]:
    """(model, the source used, a local directory with its files — for registering)."""
    errors = []
    for source in candidate.sources:
        try:
            if source.startswith("runs:/"):
                local = download_checkpoint(client, candidate.run_id, source.split("/", 2)[2], scratch)
                return checkpoints.load_model(local)[0], source, local
            location = source if checkpoints.is_remote(source) else Path(source)
            model = checkpoints.load_model(location)[0]
            return model, source, None if checkpoints.is_remote(source) else Path(source)
        except Exception as error:  # noqa: BLE001 - try the next copy
            errors.append(f"{source}: {error}")
    raise EvalError(f"run {candidate.run_id} step {candidate.step}: no readable copy ({'; '.join(errors)})")


class Watcher:
    """One eval-watch process: evaluation passes over MLflow, claims, champion moves."""

    def __init__(self, settings: EvalSettings, options: WatchOptions):
        self.settings, self.options = settings, options
        self.client = mlflow_client(options.tracking_uri)
        self.claims = ClaimStore(options.claims, ttl_s=options.claim_ttl_s)
        self.ranks = distributed_ranks(settings.device)
        if self.ranks.world > 1:
            raise EvalError("eval-watch runs as one process (launch several copies to share the work; "
                            "`gapm eval` splits one evaluation across processes)")
        self._image_reference: Reference | None = None

    def image_reference(self) -> Reference:
        if self._image_reference is None:
            self._image_reference = image_reference(self.settings, self.ranks.device)
        return self._image_reference

    def run_data(self, run: Any) -> tuple[DataConfig, int]:
        """The data settings the run was trained with (its params); the --config's only for a
        run without params; --test-data wins."""
        if run.data.params or self.options.data is None:
            return run_data_config(run.data.params, self.settings.test_data)
        data = dataclasses.replace(self.options.data)
        if self.settings.test_data:
            data.test = self.settings.test_data
        return data, self.options.data_seed or 0

    def reference_for(self, run: Any, meta: checkpoints.CheckpointMeta) -> Reference:
        shape = meta.model_shape["data_shape"]
        if sources.is_image_shape(shape):
            reference = self.image_reference()
            expected = reference.stats.image_shape
            if expected and list(shape[1:]) != list(expected[1:]):
                raise RunMismatch(f"run {run.info.run_id} generates {shape} images, the statistics "
                                f"{self.settings.stats} are of {expected} images")
            return reference
        data, seed = self.run_data(run)
        return point_reference(data, seed, self.settings.samples)

    def run_once(self) -> PassSummary:
        summary = PassSummary()
        try:
            runs = gapm_runs(self.client, self.options.experiments, self.options.run_names)
        except Exception as error:  # noqa: BLE001 - one clear line, not a stack trace
            if isinstance(error, (EvalError, fid.FidError)):
                raise
            raise EvalError(f"cannot list runs in MLflow at {self.client.tracking_uri} ({str(error).splitlines()[0][:300]}); "
                            "check MLFLOW_TRACKING_URI and that the server is running") from None
        log.info("%d gapm run(s) in %s at %s", len(runs), ", ".join(self.options.experiments or ["all experiments"]),
                 self.client.tracking_uri)
        work: list[tuple[Candidate, Reference]] = []
        names: dict[str, set[str]] = {}  # registered model -> reference keys seen
        for run in runs:
            try:
                found = checkpoints_of_run(self.client, run)
                if not found:
                    continue
                meta = read_candidate_meta(self.client, Candidate(run, max(found), found[max(found)]))
            except Exception as error:  # noqa: BLE001 - one broken run must not stop the others
                log.warning("skipping run %s: %s", run.info.run_id, error)
                summary.failed.append(f"{run.info.run_id}: {error}")
                continue
            try:  # errors of the job's own settings (statistics, extractor) stop the pass
                reference = self.reference_for(run, meta)
            except RunMismatch as error:
                log.warning("skipping run %s: %s", run.info.run_id, error)
                summary.skipped.append(f"{run.info.run_id}: {error}")
                continue
            log.info("run %s: checkpoints at steps %s", run.info.run_id, sorted(found))
            names.setdefault(registered_name(run, self.client), set()).add(reference.key)
            for step, locations in found.items():
                if result_tag(reference.key, step) not in run.data.tags:
                    work.append((Candidate(run, step, locations), reference))
        work.sort(key=lambda item: item[0].step, reverse=True)  # newest first
        for candidate, reference in work:
            if self.options.max_evaluations is not None and len(summary.evaluated) >= self.options.max_evaluations:
                break
            self.evaluate_candidate(candidate, reference, summary)
        for name, keys in names.items():
            for key in keys:
                try:
                    summary.champions[name] = self.promote_champion(name, key, runs)
                except Exception as error:  # noqa: BLE001
                    log.warning("could not update %s@%s: %s", name, self.options.alias, error)
                    summary.failed.append(f"champion {name}: {error}")
        return summary

    def evaluate_candidate(self, candidate: Candidate, reference: Reference, summary: PassSummary) -> None:
        label = f"run {candidate.run_id} {checkpoints.checkpoint_name(candidate.step)}"
        claim = self.claims.try_acquire(f"{candidate.run_id}/{reference.key}/{checkpoints.checkpoint_name(candidate.step)}")
        if claim is None:
            log.info("%s: another job is evaluating it", label)
            summary.busy.append(label)
            return
        with claim:
            try:
                if result_tag(reference.key, candidate.step) in self.client.get_run(candidate.run_id).data.tags:
                    log.info("%s: evaluated meanwhile by another job", label)
                    summary.busy.append(label)
                    return
                started = time.perf_counter()
                with tempfile.TemporaryDirectory() as scratch:
                    model, source, _ = load_candidate(self.client, candidate, scratch)
                data, seed = self.run_data(candidate.run)
                log.info("%s: evaluating (%s)", label, reference.description)
                metrics, _ = evaluate_model(model, self.settings, data=data, data_seed=seed, ranks=self.ranks,
                                            reference=reference)
                record = result_record(model, metrics, reference, self.settings, candidate.step, source,
                                       time.perf_counter() - started)
                publish(self.client, candidate.run_id, candidate.step, metrics, record)
                record["run_id"] = candidate.run_id
                summary.evaluated.append(record)
                log.info("%s: %s = %.6g", label, record["score_metric"], record["score"])
            except Exception as error:  # noqa: BLE001 - the next pass tries again
                log.error("%s: evaluation failed: %s", label, error)
                summary.failed.append(f"{label}: {error}")

    def promote_champion(self, name: str, reference_key: str, runs: list[Any]) -> str:
        """Points the alias at the model version of the best comparable score; registers the
        checkpoint's model first if needed. Serialised by a claim so that two jobs finishing
        at once cannot leave the alias on the worse of their results."""
        from mlflow.exceptions import MlflowException

        from pipeline.tracking import registry

        claim = self.claims.acquire(f"champion/{name}", wait_s=CHAMPION_WAIT_S)
        if claim is None:
            raise EvalError(f"another job holds the champion claim of {name} for over {CHAMPION_WAIT_S:.0f}s")
        with claim:
            best = None
            for run in runs:  # fresh tags: results other jobs published meanwhile count too
                if registered_name(run, self.client) != name:
                    continue
                for key, value in self.client.get_run(run.info.run_id).data.tags.items():
                    if parse_result_tag(key, reference_key) is None:
                        continue
                    record = {**json.loads(value), "run_id": run.info.run_id}
                    if best is None or (record["score"], -record["step"]) < (best["score"], -best["step"]):
                        best = record
            if best is None:
                return "no scores yet"
            try:
                current = self.client.get_model_version_by_alias(name, self.options.alias)
            except MlflowException:
                current = None
            if current is not None and current.tags.get(VERSION_REFERENCE_TAG) == reference_key:
                same = (current.run_id == best["run_id"]
                        and current.tags.get(registry.CHECKPOINT_STEP_TAG) == str(best["step"]))
                if same or float(current.tags.get(VERSION_SCORE_TAG, "inf")) <= best["score"]:
                    return f"version {current.version} (unchanged)"
            version = self.model_version_of(name, best)
            for key, value in {VERSION_SCORE_TAG: repr(float(best["score"])), VERSION_REFERENCE_TAG: reference_key,
                               "gapm.eval.metric": best["score_metric"],
                               "gapm.eval.reference_description": best.get("reference_description", "")}.items():
                self.client.set_model_version_tag(name, version.version, key, value)
            self.client.set_registered_model_alias(name, self.options.alias, version.version)
            log.info("models:/%s@%s -> version %s (run %s step %d, %s %.6g)", name, self.options.alias,
                     version.version, best["run_id"], best["step"], best["score_metric"], best["score"])
            return f"version {version.version} (moved)"

    def model_version_of(self, name: str, record: dict[str, Any]) -> Any:
        from pipeline.tracking import registry

        run_id, step = record["run_id"], int(record["step"])
        logged = registry.find_logged_model(self.client, run_id, step)
        if logged is None:
            run = self.client.get_run(run_id)
            found = checkpoints_of_run(self.client, run)
            sources = ([record["checkpoint"]] if record.get("checkpoint") else []) + found.get(step, [])
            with tempfile.TemporaryDirectory() as scratch:
                _, _, local = load_candidate(self.client, Candidate(run, step, sources), scratch)
                if local is None:  # an s3:// checkpoint: fetch the two files
                    local = Path(scratch) / "checkpoint"
                    remote = next(s for s in sources if checkpoints.is_remote(s))
                    for file_name in (checkpoints.META_FILE, checkpoints.MODEL_FILE):
                        storage.download_file(checkpoints.child(remote, file_name), str(local / file_name))
                logged = registry.log_model(self.client, run_id, local)
        return registry.register_logged_model(self.client, name, logged)


def watch(settings: EvalSettings, options: WatchOptions, *, once: bool, interval_s: float,
          report: Callable[[PassSummary], None] | None = None) -> PassSummary:
    """Evaluation passes until SIGTERM/SIGINT (or one pass with `once`)."""
    watcher = Watcher(settings, options)
    stopping = {"signal": None}

    def stop(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum

    previous = {}
    if not once:
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, stop)
    try:
        while True:
            try:
                summary = watcher.run_once()
            except Exception as error:  # noqa: BLE001 - a watcher outlives a server restart
                if once:
                    raise
                log.error("evaluation pass failed: %s; next pass in %.0fs", error, interval_s)
                summary = PassSummary(failed=[str(error)])
            if report is not None:
                report(summary)
            if once:
                return summary
            deadline = time.monotonic() + interval_s
            while stopping["signal"] is None and time.monotonic() < deadline:
                time.sleep(min(1.0, interval_s))
            if stopping["signal"] is not None:
                return summary
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

"""Where evaluation results go in MLflow, and where the models to score come from: result tags
(`gapm.eval.<reference>.step-XXXXXXXX`, the "already evaluated" mark) and metrics published in
one `log_batch`, the settings a run was trained with (its logged config.yaml, read with the
config loader's typed reader), and the targets `gapm eval` accepts
(checkpoint directories and s3:// URLs, runs:/, models:/, mlflow-artifacts: URIs) resolved to a
model, its training step and its run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gapm import Method
from pipeline import checkpoints
from pipeline.data import storage
from pipeline.data.settings import DataConfig
from pipeline.errors import ConfigError
from pipeline.eval.settings import EvalConfig
from pipeline.tracking import registry
from pipeline.tracking.mlflow_sink import LATEST_CHECKPOINT_TAG, RUN_ID_FILE, resolve_tracking_uri
from pipeline.typed_settings import from_dict

log = logging.getLogger(__name__)

RESULT_TAG_PREFIX = "gapm.eval."
CHECKPOINT_ARTIFACTS = "checkpoints"
CONFIG_ARTIFACT = "config.yaml"  # the resolved config, logged with a run's params (mlflow_sink)
RUN_IN_ARTIFACT_PATH = re.compile(r"/([0-9a-f]{32})/artifacts/(.+?)/?$")


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


@dataclass
class RunSettings:
    """The sections of an experiment config that scoring its models reads."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def run_settings(logged: dict[str, Any], where: str) -> RunSettings | None:
    """The settings in a run's logged config (the resolved experiment config, config.yaml),
    read with the config loader's typed reader; None (and a warning naming `where`) if they
    are not valid settings of this version."""
    try:
        settings = from_dict(RunSettings, {key: logged[key] for key in ("seed", "data", "eval") if key in logged})
        settings.data.validate()
        settings.eval.validate()
    except ConfigError as error:
        log.warning("cannot read the settings of %s (%s); pass --test-data", where, error)
        return None
    return settings


def read_config_file(path: Path | str) -> dict[str, Any] | None:
    """A logged config.yaml as a mapping (None if it is not one)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        log.warning("cannot read %s (%s)", path, error)
        return None
    return loaded if isinstance(loaded, dict) else None


def logged_run_settings(client: Any, run_id: str) -> RunSettings | None:
    """The settings of an MLflow run, from its config.yaml artifact (None if it has none)."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            path = client.download_artifacts(run_id, CONFIG_ARTIFACT, scratch)
        except Exception as error:  # noqa: BLE001 - MLflow and its stores raise several kinds
            log.warning("run %s: no readable %s (%s); pass --test-data", run_id, CONFIG_ARTIFACT, error)
            return None
        logged = read_config_file(path)
    return run_settings(logged, f"run {run_id}'s {CONFIG_ARTIFACT}") if logged is not None else None


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
    """A run directory stands for its newest complete checkpoint (`gapm eval runs/NAME`)."""
    run_dir = None
    if not _is_mlflow_uri(uri) and not checkpoints.is_remote(uri):
        path = Path(storage.local_path(uri))
        newest = checkpoints.newest_run_checkpoint(path)
        if newest is not None:  # a run directory
            run_dir, uri = path, str(newest)
        elif path.parent.name == "checkpoints":
            run_dir = path.parent.parent
    target = Target(uri=uri, run_id=run_id, run_dir=run_dir)
    found = RUN_IN_ARTIFACT_PATH.search(uri)
    if uri.startswith("runs:/"):
        target.run_id = target.run_id or uri[len("runs:/"):].split("/", 1)[0]
    elif found and not target.run_id:
        target.run_id = found.group(1)
    if run_dir is not None:
        id_file = run_dir / RUN_ID_FILE
        if not target.run_id and id_file.is_file():
            target.run_id = id_file.read_text().strip() or None
        if target.run_id:
            target.tracking_uri = resolve_tracking_uri(run_dir)[0]
    if target.tracking_uri is None and target.run_id:
        target.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    return target


def load_target(target: Target, scratch: str) -> tuple[Method, int | None]:
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



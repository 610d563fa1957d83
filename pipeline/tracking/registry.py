"""The trained model in MLflow: logged as a pyfunc model, registered, and loaded back.

A logged gapm model is an MLflow pyfunc model that serves anywhere: its code is
`pipeline/tracking/served_model.py` (MLflow's "models from code"; nothing is pickled) plus a copy
of the `gapm` package (`code_paths`), its artifacts the final checkpoint's `model.safetensors`
and `meta.json`, its requirements the few packages that code imports (mlflow, torch,
safetensors, numpy, pandas), and a signature (input columns n, seed, data; output the samples)
with an input example. So `mlflow.pyfunc.load_model("models:/NAME@ALIAS")` and `mlflow models
serve -m models:/NAME@ALIAS` work without gapm installed or the repository at hand.

`load_generator` never runs code from a model: it downloads the artifacts and rebuilds the
networks from the safetensors weights and the JSON shape alone, like `checkpoints.load_model`
does for a checkpoint directory.

Registry: MLflow 3 aliases (`models:/NAME@ALIAS`), no stages.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

import gapm
from gapm import Method

# `count` samples in data space of a model, a pure function of its weights and the seed: one
# function for a checkpoint, its registered model, `mlflow models serve` and `gapm sample`.
from gapm import reconstruct, sample  # noqa: F401 - re-exported for registry users
from pipeline import checkpoints
from pipeline.errors import GapmError
from pipeline.tracking import served_model
from pipeline.redaction import redact
from pipeline.tracking.served_model import META, WEIGHTS

MODEL_NAME = "model"  # the logged model's name within its run (runs:/RUN_ID/model)
CHECKPOINT_STEP_TAG = "gapm.checkpoint_step"
REGISTERED_NAME_TAG = "gapm.registered_model_name"
REGISTERED_MODEL_DESCRIPTION = (
    "GAPM generator (pipeline.tracking.registry). Serve with `mlflow models serve -m models:/NAME@ALIAS "
    "--env-manager local`; POST /invocations {\"inputs\": {\"n\": 16, \"seed\": 0}} returns 16 samples, "
    "{\"inputs\": {\"data\": BATCH}} the reconstructions of BATCH.")

# Models logged before models-from-code pickled this class by reference; it stays importable
# so that they still load where gapm is installed (MLflow now also asks for
# MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true for them; gapm's own load_generator needs neither).
GapmPyfunc = served_model.GapmModel


class RegistryError(GapmError):
    """A model that cannot be found, loaded or registered; the message says what to do."""


def default_model_name(experiment: str) -> str:
    return f"gapm-{experiment}"


def model_from_files(weights: Path, meta: Path) -> Method:
    """Rebuilds the model (GAPM or a baseline, eval mode) from a safetensors file and a
    checkpoint meta.json."""
    try:
        return served_model.model_from_files(weights, meta)
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        raise RegistryError(f"cannot rebuild the model from {weights} and {meta}: {error}") from None


def pip_requirements() -> list[str]:
    """What the model's code imports (served_model.py and gapm), at the versions it was logged
    with. Listed, not inferred: inference loads the model in a subprocess (slow). gapm itself
    travels with the model as code."""
    import safetensors

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"safetensors=={safetensors.__version__}", f"numpy=={np.__version__}", f"pandas=={pd.__version__}"]


def _copy_package(package_dir: Path, into: Path) -> Path:
    """The package's Python files (no caches), as MLflow will copy them into the model."""
    target = into / package_dir.name
    shutil.copytree(package_dir, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def save_pyfunc_model(path: Path, weights: str, meta: str, model_meta: checkpoints.CheckpointMeta,
                      mlflow_model: Model | None = None) -> None:
    """Writes the MLflow model directory of a checkpoint's two files (see the module doc)."""
    data_shape = list(model_meta.model_shape["data_shape"])
    example = pd.DataFrame([{"n": 2, "seed": 0}])
    with tempfile.TemporaryDirectory() as scratch:
        mlflow.pyfunc.save_model(
            path=str(path), python_model=served_model.__file__,
            code_paths=[str(_copy_package(Path(gapm.__file__).parent, Path(scratch)))],
            artifacts={WEIGHTS: weights, META: meta}, pip_requirements=pip_requirements(),
            signature=served_model.signature(data_shape), input_example=example,
            metadata={"gapm_model_kind": model_meta.model_kind, "gapm_data_shape": data_shape,
                      "gapm_inputs": served_model.INPUTS,
                      "gapm_checkpoint_step": model_meta.step, "gapm_experiment": model_meta.experiment},
            mlflow_model=mlflow_model)


def find_logged_model(client: MlflowClient, run_id: str, checkpoint_step: int | None = None):
    """The run's gapm model (the newest, or the one logged from `checkpoint_step`), or None."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'")
    found = [m for m in found if m.status == LoggedModelStatus.READY]
    if checkpoint_step is not None:
        found = [m for m in found if m.tags.get(CHECKPOINT_STEP_TAG) == str(checkpoint_step)]
    return max(found, key=lambda m: m.creation_timestamp, default=None)


def log_model(client: MlflowClient, run_id: str, checkpoint: checkpoints.Checkpoint):
    """Logs `checkpoint` (a directory or s3:// URL) as the run's pyfunc model and returns the
    LoggedModel. Logging the same checkpoint of the same run twice (a resumed, already
    finished run) returns the first."""
    meta = checkpoints.read_meta(checkpoint)
    existing = find_logged_model(client, run_id, meta.step)
    if existing is not None:
        return existing
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
        model_type="gapm", tags={CHECKPOINT_STEP_TAG: str(meta.step), "gapm.experiment": meta.experiment,
                                 "gapm.data_shape": json.dumps(meta.model_shape["data_shape"])})
    # The steps of mlflow.pyfunc.log_model, each with this client: log_model itself resolves
    # part of its work through the process-wide tracking URI.
    try:
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / "model"
            files = checkpoints.local_copy(checkpoint, scratch)  # verified against meta.json
            save_pyfunc_model(
                local, str(files / checkpoints.MODEL_FILE), str(files / checkpoints.META_FILE), meta,
                mlflow_model=Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                                   run_id=run_id, model_id=logged.model_id))
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=meta.step)])
    except BaseException:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def register_logged_model(client: MlflowClient, name: str, logged_model) -> ModelVersion:
    """The registry version of `logged_model` under `name`, created if it does not exist."""
    return ensure_registered(client, name, logged_model)[0]


def ensure_registered(client: MlflowClient, name: str, logged_model) -> tuple[ModelVersion, bool]:
    """(the registry version of `logged_model` under `name`, whether this call created it)."""
    try:
        client.create_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run_id = logged_model.source_run_id
    for version in client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'"):
        # search results may leave model_id empty; the source names the model too
        if logged_model.model_id in (version.model_id, version.source.removeprefix("models:/")) or (
                version.source == logged_model.artifact_location):
            return version, False
    # The source is the model's artifact location rather than models:/MODEL_ID: a sqlite
    # registry would resolve the latter through the process-wide tracking URI.
    return client.create_model_version(
        name=name, source=logged_model.artifact_location, run_id=run_id, model_id=logged_model.model_id,
        tags={CHECKPOINT_STEP_TAG: logged_model.tags.get(CHECKPOINT_STEP_TAG, "")}), True


def register_run_model(run_id: str, alias: str, name: str | None = None,
                       client: MlflowClient | None = None) -> ModelVersion:
    """`gapm register`: registers the run's logged model (if not yet) and points `alias` at it."""
    client = client or MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise RegistryError(_explain(error, client.tracking_uri, f"run {run_id}")) from None
    logged = find_logged_model(client, run_id)
    if logged is None:
        raise RegistryError(f"run {run_id} has no logged gapm model: the model is logged at the end "
                            "of stage 2; finish the training (gapm train ... resumes) first")
    if name is None:
        name = run.data.tags.get(REGISTERED_NAME_TAG) or default_model_name(run.info.run_name)
    version = register_logged_model(client, name, logged)
    client.set_registered_model_alias(name, alias, version.version)
    return version


def is_local(model_uri: str) -> bool:
    scheme = urlparse(model_uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # one letter: a Windows drive


def load_generator(model_uri: str) -> Method:
    """The model behind models:/NAME@ALIAS, models:/NAME/VERSION, models:/MODEL_ID,
    runs:/RUN_ID/model, a downloaded MLflow model directory, a checkpoint (directory or s3://
    URL) or a run directory (its newest complete checkpoint) — rebuilt from safetensors +
    meta.json, in eval mode, on the CPU."""
    if checkpoints.is_remote(model_uri):
        return checkpoints.load_model(model_uri)[0]
    if is_local(model_uri):
        path = Path(urlparse(model_uri).path if model_uri.startswith("file:") else model_uri)
        if (path / checkpoints.META_FILE).is_file():
            return checkpoints.load_model(path)[0]
        if (path / "MLmodel").is_file():
            return _from_model_directory(path, model_uri)
        newest = checkpoints.newest_run_checkpoint(path)
        if newest is not None:
            return checkpoints.load_model(newest)[0]
        raise RegistryError(f"{model_uri} is neither a checkpoint directory (with {checkpoints.META_FILE}), "
                            "a run directory (with config.yaml or checkpoints/) nor an MLflow model directory "
                            "(with MLmodel); pass one, or a models:/ URI")
    with tempfile.TemporaryDirectory() as download:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=download)
        except (MlflowException, OSError) as error:
            raise RegistryError(_explain(error, mlflow.get_tracking_uri(), model_uri)) from None
        return _from_model_directory(Path(local), model_uri)


def _from_model_directory(directory: Path, model_uri: str) -> Method:
    """Reads MLmodel as plain YAML to find the artifacts; python_model.pkl is never opened."""
    description = yaml.safe_load((directory / "MLmodel").read_text()) or {}
    artifacts = description.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if WEIGHTS not in artifacts or META not in artifacts:
        raise RegistryError(f"{model_uri} is not a gapm model (its MLmodel lists no "
                            f"'{WEIGHTS}'/'{META}' artifacts)")
    return model_from_files(directory / artifacts[WEIGHTS]["path"], directory / artifacts[META]["path"])


def _explain(error: BaseException, tracking_uri: str, thing: str) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    tracking_uri = redact(tracking_uri)
    status = error.get_http_status_code() if isinstance(error, MlflowException) else 500
    if status >= 500:
        return (f"cannot reach MLflow at {tracking_uri} for {thing} ({first_line}); check "
                "MLFLOW_TRACKING_URI and that the server is running")
    return (f"MLflow at {tracking_uri} has no {thing} ({first_line}); check the name "
            "(models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model) and MLFLOW_TRACKING_URI")

"""The trained model in MLflow: logged as a pyfunc model, registered, and loaded back.

A logged gapm model is an MLflow pyfunc model whose artifacts are the final checkpoint's
`model.safetensors` and `meta.json`; its python_model is `GapmPyfunc`, a class of this package
(pickled by reference, so `mlflow.pyfunc.load_model` works wherever gapm is installed).
`load_generator` never unpickles anything from a model: it downloads the artifacts and
rebuilds the networks from the safetensors weights and the JSON shape alone, like
`checkpoints.load_model` does for a checkpoint directory.

Registry: MLflow 3 aliases (`models:/NAME@ALIAS`), no stages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
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
from safetensors.torch import load_file

from gapm import Method, ModelShape, build_model
from pipeline.data import sources
from pipeline.errors import GapmError
from pipeline.eval import quality
from pipeline.train import checkpoints

MODEL_NAME = "model"  # the logged model's name within its run (runs:/RUN_ID/model)
WEIGHTS, META = "weights", "meta"  # pyfunc artifact keys
CHECKPOINT_STEP_TAG = "gapm.checkpoint_step"
REGISTERED_NAME_TAG = "gapm.registered_model_name"


class RegistryError(GapmError):
    """A model that cannot be found, loaded or registered; the message says what to do."""


def default_model_name(experiment: str) -> str:
    return f"gapm-{experiment}"


def sample(model: Method, count: int, seed: int) -> torch.Tensor:
    """`count` generated samples in data space ([0, 1] images or points), a pure function of
    the weights and `seed`: the same for a checkpoint and the model registered from it."""
    return quality.sample_in_batches(model, count, model.shape.data_shape, seed)


def reconstruct(model: Method, data: torch.Tensor) -> torch.Tensor:
    return quality.reconstruct_in_batches(model, data, model.shape.data_shape)


def model_from_files(weights: Path, meta: Path) -> Method:
    """Rebuilds the model (GAPM or a baseline, eval mode) from a safetensors file and a
    checkpoint meta.json."""
    try:
        meta_values = checkpoints.CheckpointMeta(**json.loads(Path(meta).read_text()))
        model = build_model(meta_values.model_kind, ModelShape.from_dict(meta_values.model_shape),
                            **meta_values.hyperparameters)
        model.load_state_dict(load_file(str(weights)))
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        raise RegistryError(f"cannot rebuild the model from {weights} and {meta}: {error}") from None
    return model.eval()


class GapmPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc flavour of a trained model.

    predict input: {"n": N, "seed": S} (dict or one-row DataFrame) -> N samples; anything else
    (DataFrame, array, {"data": array}) is data to reconstruct, one sample per row. Output: a
    numpy array in data space, shape (N, *data_shape).
    """

    def load_context(self, context: Any) -> None:
        self.model = model_from_files(Path(context.artifacts[WEIGHTS]), Path(context.artifacts[META]))

    # Annotated DataFrame, MLflow's "no schema" hint: it then passes dicts and arrays through
    # unchanged, which a schema inferred from a narrower hint would reject.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        request = model_input
        if isinstance(request, pd.DataFrame) and "n" in request.columns:
            request = request.iloc[0].to_dict()
        if isinstance(request, dict) and "n" in request:
            return sample(self.model, int(request["n"]), int(request.get("seed", 0))).numpy()
        if isinstance(request, dict):
            request = request["data"]
        array = np.asarray(request.to_numpy() if isinstance(request, pd.DataFrame) else request,
                           dtype=np.float32)
        data = torch.from_numpy(array.reshape(-1, *self.model.shape.data_shape))
        return reconstruct(self.model, data).numpy()


def _pip_requirements() -> list[str]:
    # Listed, not inferred: inference loads the model in a subprocess (slow, and it would
    # need the training environment anyway). The gapm package itself must be installed
    # where the pyfunc flavour is loaded.
    import safetensors

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"safetensors=={safetensors.__version__}", f"numpy=={np.__version__}",
            f"pandas=={pd.__version__}", "pyyaml"]


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
        with tempfile.TemporaryDirectory() as scratch, quiet_model_logging():
            local = Path(scratch) / "model"
            mlflow.pyfunc.save_model(
                path=str(local), python_model=GapmPyfunc(), pip_requirements=_pip_requirements(),
                artifacts={WEIGHTS: checkpoints.local_file(checkpoint, checkpoints.MODEL_FILE, scratch),
                           META: checkpoints.local_file(checkpoint, checkpoints.META_FILE, scratch)},
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
    try:
        client.create_registered_model(name, description="GAPM generator (pipeline.tracking.registry)")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run_id = logged_model.source_run_id
    for version in client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'"):
        # search results may leave model_id empty; the source names the model too
        if logged_model.model_id in (version.model_id, version.source.removeprefix("models:/")) or (
                version.source == logged_model.artifact_location):
            return version
    # The source is the model's artifact location rather than models:/MODEL_ID: a sqlite
    # registry would resolve the latter through the process-wide tracking URI.
    return client.create_model_version(
        name=name, source=logged_model.artifact_location, run_id=run_id, model_id=logged_model.model_id,
        tags={CHECKPOINT_STEP_TAG: logged_model.tags.get(CHECKPOINT_STEP_TAG, "")})


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


@contextlib.contextmanager
def quiet_model_logging() -> Iterator[None]:
    """MLflow warns that a python_model object is cloudpickled (GapmPyfunc is pickled by
    reference to this package and gapm's own loader never unpickles it) and that it has no
    signature (on purpose: predict takes two kinds of input)."""
    drop = _DropMessages("serialized using CloudPickle", "Failed to infer model signature")
    logger = logging.getLogger("mlflow.pyfunc")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


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
    runs:/RUN_ID/model, a downloaded MLflow model directory or a checkpoint (directory or
    s3:// URL) — rebuilt from safetensors + meta.json, in eval mode, on the CPU."""
    if checkpoints.is_remote(model_uri):
        return checkpoints.load_model(model_uri)[0]
    if is_local(model_uri):
        path = Path(urlparse(model_uri).path if model_uri.startswith("file:") else model_uri)
        if (path / checkpoints.META_FILE).is_file():
            return checkpoints.load_model(path)[0]
        if (path / "MLmodel").is_file():
            return _from_model_directory(path, model_uri)
        raise RegistryError(f"{model_uri} is neither a checkpoint directory (with {checkpoints.META_FILE}) "
                            "nor an MLflow model directory (with MLmodel); pass one, or a models:/ URI")
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
    status = error.get_http_status_code() if isinstance(error, MlflowException) else 500
    if status >= 500:
        return (f"cannot reach MLflow at {tracking_uri} for {thing} ({first_line}); check "
                "MLFLOW_TRACKING_URI and that the server is running")
    return (f"MLflow at {tracking_uri} has no {thing} ({first_line}); check the name "
            "(models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model) and MLFLOW_TRACKING_URI")


def is_image_model(model: Method) -> bool:
    return sources.is_image_shape(model.shape.data_shape)

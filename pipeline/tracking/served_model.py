"""A trained gapm model as MLflow loads and serves it: the code of the logged pyfunc model.

MLflow runs this file as the model's code ("models from code", `python_model=<this file>`):
it is copied into every logged model, next to a copy of the `gapm` package (`code_paths`), so
`mlflow.pyfunc.load_model("models:/NAME@ALIAS")` and `mlflow models serve` work in any Python
environment with the packages of the model's requirements.txt (mlflow, torch, safetensors,
numpy, pandas): no gapm installation, no repository, nothing unpickled. It therefore imports
nothing from `pipeline`. It rebuilds, samples and reconstructs with gapm's own functions
(`gapm.model_from_meta`, `gapm.sample`, `gapm.reconstruct`), the ones a checkpoint, the
registry, `gapm sample` and the evaluation jobs use: the same seed gives the same samples.

The model's artifacts are the checkpoint's `model.safetensors` and `meta.json`.

Input: rows with the optional named inputs (listed in the model's metadata, `gapm_inputs`)
  n     int    number of samples to draw from the prior,
  seed  int    their seed (default 0): the same seed gives the same samples, as `gapm sample`;
  data  array  a batch (N, *data_shape) in data space to reconstruct (instead of n).
Each row yields its samples or its reconstructions; the output is their concatenation,
float32 of shape (total, *data_shape) in data space: images in [0, 1], points as given.
Over HTTP (`mlflow models serve`): POST /invocations, each of MLflow's request forms:
  {"inputs": {"n": 16, "seed": 0}}                     one row (also {"n": [16], "seed": [0]})
  {"inputs": {"n": [4, 4], "seed": [0, 1]}}            columns: one row per value
  {"instances": [{"n": 4, "seed": 0}, {"n": 4, "seed": 1}]}
  {"dataframe_records": [{"n": 4, "seed": 0}]}   {"dataframe_split": {"columns": [...], "data": [...]}}
  text/csv "n,seed\n4,0"
  {"inputs": {"data": BATCH}}   (also dataframe_records / instances rows with "data")
answers {"predictions": [...]}. An unnamed tensor ({"inputs": [[...]]}, {"instances": [[...]]})
is refused: it cannot say whether it is n or data. Every refusal is HTTP 400 with one line.
The signature declares the output only (see `signature`): the model's code checks its inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Schema, TensorSpec
from safetensors.torch import load_file

from gapm import Method, model_from_meta, reconstruct, sample

WEIGHTS, META = "weights", "meta"  # artifact keys: model.safetensors, meta.json
MAX_SAMPLES_PER_ROW = 100_000  # a request beyond this is refused rather than exhausting the server


def model_from_files(weights: Path | str, meta: Path | str) -> Method:
    """The model (GAPM or a baseline, eval mode, CPU) from a safetensors file and a checkpoint's
    meta.json. Raises ValueError (or OSError) naming what is wrong."""
    values = json.loads(Path(meta).read_text())
    try:
        return model_from_meta(values, load_file(str(weights)))
    except ValueError as error:
        raise ValueError(f"{meta}: {error}") from None


INPUTS = {  # the request's named inputs (columns), as the model's metadata lists them
    "n": "int, optional: number of samples to draw from the prior",
    "seed": "int, optional (default 0): their seed; the same seed gives the same samples",
    "data": "array (N, *data_shape) in data space, optional: a batch to reconstruct (instead of n)"}


def signature(data_shape: list[int]) -> ModelSignature:
    """The output only: float32 samples (-1, *data_shape). The inputs (`INPUTS`) are described
    in the model's metadata and checked by `predict`, not declared: MLflow enforces a declared
    input schema before the model's code runs, and then refuses the tensor forms
    ({"inputs": {"n": [4]}}, {"instances": [...]}), CSV, and a batch of the wrong shape with
    messages about its own types (or a dump of the whole request) instead of one line."""
    return ModelSignature(inputs=None, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *data_shape),
                                                                  "samples")]))


class BadRequest(MlflowException):
    """HTTP 400 from the scoring server with exactly this one-line message.

    The scoring server rewrites the message of any MlflowException out of `predict` to
    "Failed to predict data '<the whole request>'. Error: <message>": for a batch of images,
    thousands of numbers around one line. This message is set once and keeps."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self.__dict__["_message"]

    @message.setter
    def message(self, value: str) -> None:
        self.__dict__.setdefault("_message", value)


FORMS = ('{"inputs": {"n": 16, "seed": 0}} to sample, {"inputs": {"data": BATCH}} to reconstruct '
         '(or dataframe_records rows with the columns n, seed, data)')


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(np.ndim(value) == 0 and pd.isna(value))
    except (TypeError, ValueError):
        return False


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """The request's rows. The input is as MLflow parsed the request (no input schema): a
    DataFrame (dataframe_records, dataframe_split, CSV), a dict of columns or values (inputs,
    instances, a Python dict), a list of rows, or an unnamed array."""
    if isinstance(model_input, pd.DataFrame):
        if not set(INPUTS) & set(model_input.columns):
            raise BadRequest(f"no input named n, seed or data (columns {list(model_input.columns)[:5]}); "
                             f"send {FORMS}")
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, list) and model_input and all(isinstance(row, dict) for row in model_input):
        return model_input
    what = f"an array of shape {np.shape(model_input)}" if isinstance(model_input, np.ndarray) else (
        type(model_input).__name__)
    raise BadRequest(f"unnamed inputs ({what}): say which they are, as in {FORMS}")


def _sample_requests(row: dict[str, Any]) -> list[tuple[int, int]]:
    """(n, seed) of a sampling row; a column of n (the tensor form {"n": [4, 8]}) gives one
    request per value, with one seed for all or one seed each."""
    counts = np.atleast_1d(np.asarray(row["n"], dtype=object)).tolist()
    seeds = np.atleast_1d(np.asarray(0 if _missing(row.get("seed")) else row["seed"], dtype=object)).tolist()
    if len(seeds) == 1:
        seeds = seeds * len(counts)
    if len(seeds) != len(counts):
        raise BadRequest(f"{len(counts)} values of n but {len(seeds)} seeds: give one seed, or one per n")
    requests = []
    for count, seed in zip(counts, seeds):
        if not _is_integer(count) or not 1 <= count <= MAX_SAMPLES_PER_ROW:
            raise BadRequest(f"n must be an integer from 1 to {MAX_SAMPLES_PER_ROW}, got {count!r}")
        if not _is_integer(seed):
            raise BadRequest(f"seed must be an integer, got {seed!r}")
        requests.append((int(count), int(seed)))
    return requests


def _is_integer(value: Any) -> bool:
    try:
        return not isinstance(value, (bool, str)) and float(value).is_integer()
    except (TypeError, ValueError):
        return False


def _reconstruction_batch(value: Any, shape: list[int]) -> np.ndarray:
    """A `data` value as a batch (N, *shape): one batch, one item (no batch dimension), or a
    column of batches (the instances form: {"instances": [{"data": BATCH}]})."""
    expected = f"(N, {', '.join(map(str, shape))})"
    try:
        batch = np.asarray(_nested_list(value), dtype=np.float32)
    except (ValueError, TypeError):
        raise BadRequest(f"data must be a batch of shape {expected} of numbers, got ragged or non-numeric "
                         "values") from None
    if list(batch.shape[-len(shape):]) == shape and batch.ndim in (len(shape), len(shape) + 2):
        batch = batch.reshape(-1, *shape)
    if batch.ndim != len(shape) + 1 or list(batch.shape[1:]) != shape or batch.shape[0] == 0:
        raise BadRequest(f"data must be a batch of shape {expected}, got shape {tuple(batch.shape)}")
    return batch


class GapmModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model: samples (`n`, `seed`) or reconstructions (`data`); see the module doc."""

    def load_context(self, context: Any) -> None:
        self.model = model_from_files(context.artifacts[WEIGHTS], context.artifacts[META])

    # Annotated DataFrame, MLflow's hint for "the signature decides": with it, MLflow infers no
    # signature from the hints (one from `Any` would make the server accept only {"inputs": ...}).
    # The input is as MLflow parsed the request: a DataFrame, a dict of columns or an array.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> np.ndarray:
        shape = list(self.model.shape.data_shape)
        outputs: list[np.ndarray] = []
        pending: list[np.ndarray] = []  # consecutive rows' data: reconstructed as one batch

        def reconstruct_pending() -> None:
            if pending:
                outputs.append(reconstruct(self.model, torch.from_numpy(np.concatenate(pending))).numpy())
                pending.clear()

        for row in _rows(model_input):
            has_n, has_data = not _missing(row.get("n")), not _missing(row.get("data"))
            if has_n == has_data:
                raise BadRequest("each row needs either n (samples to draw, with an optional seed) or "
                                 f"data (a batch of shape (N, {', '.join(map(str, shape))}) to reconstruct)")
            if has_data:
                pending.append(_reconstruction_batch(row["data"], shape))
                continue
            reconstruct_pending()
            outputs += [sample(self.model, count, seed).numpy() for count, seed in _sample_requests(row)]
        reconstruct_pending()
        if not outputs:
            raise BadRequest(f"no rows in the request; send {FORMS}")
        return np.concatenate(outputs).astype(np.float32, copy=False)


def _nested_list(value: Any) -> Any:
    """A cell may hold arrays of arrays (object arrays); make them nested lists for np.asarray."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_nested_list(item) for item in value]
    return value


# MLflow executes this file under a generated module name to get the model it serves; imported
# as pipeline.tracking.served_model (by the registry, to sample exactly as served) it only
# provides the functions above.
if not __name__.startswith("pipeline."):
    mlflow.models.set_model(GapmModel())

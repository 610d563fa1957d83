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

Input (the model's signature): rows with the optional columns
  n     int    number of samples to draw from the prior,
  seed  int    their seed (default 0): the same seed gives the same samples, as `gapm sample`;
  data  array  a batch (N, *data_shape) in data space to reconstruct (instead of n).
Each row yields its samples or its reconstructions; the output is their concatenation,
float32 of shape (total, *data_shape) in data space: images in [0, 1], points as given.
Over HTTP (`mlflow models serve`): POST /invocations
  {"dataframe_records": [{"n": 16, "seed": 0}]}   or   {"inputs": {"n": 16, "seed": 0}}
  {"inputs": {"data": [[0.1, 0.2], [0.3, 0.4]]}}
answers {"predictions": [...]}.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec
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


def signature(data_shape: list[int]) -> ModelSignature:
    """Optional columns n, seed and data (a batch of shape (N, *data_shape)); output: samples."""
    batch: Any = "double"
    for _ in range(len(data_shape) + 1):
        batch = Array(batch)
    inputs = Schema([ColSpec("long", "n", required=False), ColSpec("long", "seed", required=False),
                     ColSpec(batch, "data", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *data_shape), "samples")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _bad_request(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)  # HTTP 400 from the scoring server


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(np.ndim(value) == 0 and pd.isna(value))
    except (TypeError, ValueError):
        return False


def _rows(model_input: Any) -> list[dict[str, Any]]:
    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, np.ndarray):  # a model logged without a signature gets arrays as they are
        return [{"data": model_input}]
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, list) and all(isinstance(row, dict) for row in model_input):
        return model_input
    raise _bad_request(f"expected rows with columns n, seed or data, got {type(model_input).__name__}")


class GapmModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model: samples (`n`, `seed`) or reconstructions (`data`); see the module doc."""

    def load_context(self, context: Any) -> None:
        self.model = model_from_files(context.artifacts[WEIGHTS], context.artifacts[META])

    # Annotated DataFrame, MLflow's hint for "the signature decides": with it, MLflow infers no
    # second signature from the hints. After schema enforcement the input is a DataFrame.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> np.ndarray:
        shape = list(self.model.shape.data_shape)
        outputs = []
        for row in _rows(model_input):
            has_n, has_data = not _missing(row.get("n")), not _missing(row.get("data"))
            if has_n == has_data:
                raise _bad_request("each row needs either n (samples to draw, with an optional seed) or "
                                   f"data (a batch of shape (N, {', '.join(map(str, shape))}) to reconstruct)")
            if has_n:
                count = float(row["n"])
                if not count.is_integer() or not 1 <= count <= MAX_SAMPLES_PER_ROW:
                    raise _bad_request(f"n must be an integer from 1 to {MAX_SAMPLES_PER_ROW}, got {row['n']!r}")
                seed = row.get("seed")
                seed = 0 if _missing(seed) else int(seed)
                outputs.append(sample(self.model, int(count), seed).numpy())
                continue
            batch = np.asarray(_nested_list(row["data"]), dtype=np.float32)
            if batch.ndim == len(shape):  # one item given without its batch dimension
                batch = batch[None]
            if list(batch.shape[1:]) != shape or math.prod(batch.shape) == 0:
                raise _bad_request(f"data must be a batch of shape (N, {', '.join(map(str, shape))}), "
                                   f"got shape {batch.shape}")
            outputs.append(reconstruct(self.model, torch.from_numpy(batch)).numpy())
        if not outputs:
            raise _bad_request("no rows in the request")
        return np.concatenate(outputs).astype(np.float32, copy=False)


def _nested_list(value: Any) -> Any:
    """Schema enforcement leaves arrays of arrays as object arrays; make them rectangular lists."""
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

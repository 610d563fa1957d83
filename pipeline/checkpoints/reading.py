"""Reading one checkpoint, wherever it is (a local directory or an s3:// URL): its validated
meta.json, its files checked against the sizes and digests meta.json records, the weights, the
training state (tensors and numbers only), or the whole model rebuilt from it."""

from __future__ import annotations

import dataclasses
import io
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load

from gapm import Method, model_from_meta
from pipeline.checkpoints.errors import CheckpointError, DamagedCheckpoint
from pipeline.checkpoints.local import check_file
from pipeline.checkpoints.locations import (
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    Checkpoint,
    child,
    is_remote,
)
from pipeline.checkpoints.meta import CheckpointMeta, parse_meta
from pipeline.data import storage


def read_meta(checkpoint: Checkpoint) -> CheckpointMeta:
    """The validated meta.json of `checkpoint`; CheckpointError if there is none (not a
    complete checkpoint), DamagedCheckpoint if it is unreadable or invalid."""
    meta_path = child(checkpoint, META_FILE)
    label = f"reading {meta_path}"
    exists = (storage.with_retries(lambda: storage.exists(meta_path), label) if is_remote(checkpoint)
              else Path(meta_path).is_file())
    if not exists:
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {META_FILE}); "
                              "pick another one or start without --resume")
    raw = (storage.with_retries(lambda: storage.read_bytes(meta_path), label) if is_remote(checkpoint)
           else Path(meta_path).read_bytes())
    return parse_meta(raw, meta_path)


def local_file(checkpoint: Checkpoint, name: str, scratch: str) -> Path:
    """The path of one checkpoint file on local disk (downloaded into `scratch` if remote)."""
    if not is_remote(checkpoint):
        return Path(checkpoint) / name
    target = Path(scratch) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    storage.with_retries(lambda: storage.download_file(child(checkpoint, name), str(target)),
                         f"downloading {child(checkpoint, name)}")
    return target


def verified_bytes(checkpoint: Checkpoint, name: str, meta: CheckpointMeta, scratch: str) -> bytes:
    """One file's bytes, checked against meta.json's record of it (when it has one)."""
    path = local_file(checkpoint, name, scratch)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{child(checkpoint, name)} is missing; delete this checkpoint") from None
    if name in meta.files:
        check_file(data, meta.files[name], child(checkpoint, name))
    return data


def local_copy(checkpoint: Checkpoint, scratch: str, names: tuple[str, ...] = (META_FILE, MODEL_FILE)) -> Path:
    """A local directory holding the files `names` of the checkpoint, each verified: the
    checkpoint itself if it is local, else their download into `scratch`."""
    meta = read_meta(checkpoint)
    for name in names:
        if name == META_FILE:
            if is_remote(checkpoint):  # downloaded as it is, and validated again
                parse_meta(local_file(checkpoint, META_FILE, scratch).read_bytes(), child(checkpoint, META_FILE))
        else:
            verified_bytes(checkpoint, name, meta, scratch)  # a remote file stays in `scratch`
    return Path(scratch) if is_remote(checkpoint) else Path(checkpoint)


def read_weights(checkpoint: Checkpoint, meta: CheckpointMeta) -> dict[str, torch.Tensor]:
    """The verified, parsed model.safetensors of `checkpoint`."""
    with tempfile.TemporaryDirectory() as scratch:
        data = verified_bytes(checkpoint, MODEL_FILE, meta, scratch)
    try:
        return safetensors_load(data)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise DamagedCheckpoint(f"{child(checkpoint, MODEL_FILE)} is unreadable, truncated or corrupt "
                                f"({first_line(error)}); delete this checkpoint") from None


def load_model_weights(model: Method, checkpoint: Checkpoint, meta: CheckpointMeta | None = None) -> None:
    weights = read_weights(checkpoint, meta or read_meta(checkpoint))
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"cannot load weights from {checkpoint}: {first_line(error)}") from None


def load_training_state(checkpoint: Checkpoint, meta: CheckpointMeta | None = None) -> dict[str, Any]:
    """Optimizer and loss-scaler state, loaded with weights_only=True: tensors and numbers only."""
    meta = meta or read_meta(checkpoint)
    where = child(checkpoint, STATE_FILE)
    with tempfile.TemporaryDirectory() as scratch:
        data = verified_bytes(checkpoint, STATE_FILE, meta, scratch)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DamagedCheckpoint(
            f"{where} is refused: it holds Python objects other than tensors and numbers, which could run "
            "code when loaded; gapm never writes those, so it was replaced or tampered with - delete it") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise DamagedCheckpoint(f"{where} is unreadable, truncated or corrupt ({first_line(error)}); "
                                "delete this checkpoint") from None
    if not isinstance(state, dict) or "optimizers" not in state:
        raise DamagedCheckpoint(f"{where} is not a gapm training state (no optimizer states); delete it")
    return state


def load_model(checkpoint: Checkpoint) -> tuple[Method, CheckpointMeta]:
    """Rebuilds the model from a checkpoint alone, in eval mode."""
    meta = read_meta(checkpoint)
    weights = read_weights(checkpoint, meta)
    try:
        return model_from_meta(dataclasses.asdict(meta), weights), meta
    except RuntimeError as error:
        raise CheckpointError(f"cannot load weights from {checkpoint}: {first_line(error)}") from None


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]

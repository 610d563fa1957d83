"""Checkpoints: written whole or not at all, found again after a crash.

A checkpoint is a directory `step-XXXXXXXX/` holding
  model.safetensors    every network's weights and buffers (no pickled code)
  training_state.pt    optimizer and grad-scaler states (tensors and numbers only, loaded
                       with weights_only=True)
  meta.json            stage, step, data position, model shape — written LAST.
It is built in a hidden temporary directory and renamed into place, so a reader never sees
a half-written one; a directory without meta.json is ignored (and cleaned up).

The checkpoint location may also be `s3://bucket/prefix`: the files are built locally, then
uploaded with meta.json last (each S3 PUT is atomic), and pruning deletes meta.json first, so
the same rule holds — a checkpoint exists exactly when its meta.json does.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gapm import Method, ModelShape, build_model
from pipeline.data import storage
from pipeline.errors import GapmError

# A checkpoint is a local directory (Path) or an s3:// URL (str).
Checkpoint = Path | str

FORMAT_VERSION = 1
MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "training_state.pt", "meta.json"


class CheckpointError(GapmError):
    """A checkpoint that cannot be used; the message says which and what to do."""


@dataclass
class CheckpointMeta:
    stage: int  # the stage in progress when saved (stage 2 with stage_step == steps: finished)
    step: int  # iterations completed over both stages
    stage_step: int  # iterations completed in `stage`
    data_epoch: int
    data_batch_in_epoch: int
    model_shape: dict[str, Any]
    experiment: str
    model_kind: str = "gapm"
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created: float = 0.0


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def is_remote(location: Checkpoint) -> bool:
    return isinstance(location, str) and storage.is_s3_url(location)


def child(location: Checkpoint, name: str) -> Checkpoint:
    return storage.join_url(location, name) if is_remote(location) else Path(location) / name


def checkpoint_basename(checkpoint: Checkpoint) -> str:
    return str(checkpoint).rstrip("/").rsplit("/", 1)[-1]


def save_checkpoint(checkpoints_dir: Checkpoint, model: Method, optimizers: dict[str, Any],
                    extra_state: dict[str, Any], meta: CheckpointMeta) -> Checkpoint:
    """Writes one checkpoint atomically and returns where it is."""
    if is_remote(checkpoints_dir):
        with tempfile.TemporaryDirectory() as staging:
            local = save_checkpoint(Path(staging), model, optimizers, extra_state, meta)
            remote = child(checkpoints_dir, local.name)
            storage.delete(child(remote, META_FILE))  # an older copy of this step stops counting first
            for name in (MODEL_FILE, STATE_FILE, META_FILE):  # meta.json last: completes it
                storage.upload_file(str(local / name), child(remote, name))
        return remote
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / checkpoint_name(meta.step)
    staging = checkpoints_dir / f".tmp-{final.name}-{time.time_ns()}"
    staging.mkdir()
    try:
        weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
        save_file(weights, str(staging / MODEL_FILE))
        torch.save({"optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                    **extra_state}, staging / STATE_FILE)
        meta.created = time.time()
        (staging / META_FILE).write_text(json.dumps(dataclasses.asdict(meta), indent=1))
        if final.exists():  # same step saved again (e.g. end of stage == periodic save)
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def read_meta(checkpoint: Checkpoint) -> CheckpointMeta:
    meta_path = child(checkpoint, META_FILE)
    if not (storage.exists(meta_path) if is_remote(checkpoint) else Path(meta_path).is_file()):
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {META_FILE}); "
                              "pick another one or start without --resume")
    try:
        values = json.loads(storage.read_bytes(meta_path) if is_remote(checkpoint) else Path(meta_path).read_text())
        return CheckpointMeta(**values)
    except (json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{meta_path} is unreadable ({error}); delete this checkpoint") from None


def list_checkpoints(checkpoints_dir: Checkpoint) -> list[Checkpoint]:
    """Complete checkpoints, oldest first."""
    if is_remote(checkpoints_dir):
        metas = storage.list_urls(checkpoints_dir, suffix="/" + META_FILE)
        found = [url[: -len(META_FILE) - 1] for url in metas]
        return sorted((u for u in found if checkpoint_basename(u).startswith("step-")), key=checkpoint_basename)
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.glob("step-*") if (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(checkpoints_dir: Checkpoint) -> Checkpoint | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def prune_checkpoints(checkpoints_dir: Checkpoint, keep_last: int) -> None:
    """Keeps the newest `keep_last` complete checkpoints; removes stale temporaries."""
    if is_remote(checkpoints_dir):
        for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
            storage.delete(child(old, META_FILE))  # invalid from here on, even if the rest fails
            for name in (MODEL_FILE, STATE_FILE):
                storage.delete(child(old, name))
        return
    for stale in Path(checkpoints_dir).glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def check_compatible(meta: CheckpointMeta, shape: ModelShape, checkpoint: Checkpoint, kind: str = "gapm") -> None:
    if meta.model_kind != kind:
        raise CheckpointError(f"checkpoint {checkpoint} holds a '{meta.model_kind}' model, not '{kind}'; "
                              "use a new experiment name or pass --resume never")
    expected = dataclasses.asdict(shape)
    saved = dataclasses.asdict(ModelShape.from_dict(meta.model_shape))
    if saved != expected:
        differing = sorted(k for k in expected if saved.get(k) != expected[k])
        raise CheckpointError(
            f"checkpoint {checkpoint} was written for a different model "
            f"(differs in: {', '.join(differing) or 'keys'}); use a new experiment name, "
            "pass --resume never, or restore the original config")


def local_file(checkpoint: Checkpoint, name: str, scratch: str) -> str:
    """The path of one checkpoint file on local disk (downloaded into `scratch` if remote)."""
    if not is_remote(checkpoint):
        return str(Path(checkpoint) / name)
    target = str(Path(scratch) / name)
    storage.download_file(child(checkpoint, name), target)
    return target


def load_model_weights(model: Method, checkpoint: Checkpoint) -> None:
    try:
        with tempfile.TemporaryDirectory() as scratch:
            model.load_state_dict(load_file(local_file(checkpoint, MODEL_FILE, scratch)))
    except (RuntimeError, OSError) as error:
        raise CheckpointError(f"cannot load weights from {checkpoint}: {error}") from None


def load_training_state(checkpoint: Checkpoint) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        return torch.load(local_file(checkpoint, STATE_FILE, scratch), map_location="cpu", weights_only=True)


def load_model(checkpoint: Checkpoint) -> tuple[Method, CheckpointMeta]:
    """Rebuilds the model from a checkpoint alone, in eval mode."""
    meta = read_meta(checkpoint)
    model = build_model(meta.model_kind, ModelShape.from_dict(meta.model_shape), **meta.hyperparameters)
    load_model_weights(model, checkpoint)
    return model.eval(), meta

"""Checkpoints: written whole or not at all, found again after a crash.

A checkpoint is a directory `step-XXXXXXXX/` holding
  model.safetensors    every network's weights and buffers (no pickled code)
  training_state.pt    optimizer and grad-scaler states (tensors and numbers only, loaded
                       with weights_only=True)
  meta.json            stage, step, data position, model shape — written LAST.
It is built in a hidden temporary directory and renamed into place, so a reader never sees
a half-written one; a directory without meta.json is ignored (and cleaned up).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gapm import GAPM, ModelShape

FORMAT_VERSION = 1
MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "training_state.pt", "meta.json"


class CheckpointError(RuntimeError):
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
    format_version: int = FORMAT_VERSION
    created: float = 0.0


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(checkpoints_dir: Path, model: GAPM, optimizers: dict[str, Any],
                    extra_state: dict[str, Any], meta: CheckpointMeta) -> Path:
    """Writes one checkpoint atomically and returns its final path."""
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


def read_meta(checkpoint: Path) -> CheckpointMeta:
    meta_path = Path(checkpoint) / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {META_FILE}); "
                              "pick another one or start without --resume")
    try:
        values = json.loads(meta_path.read_text())
        return CheckpointMeta(**values)
    except (json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{meta_path} is unreadable ({error}); delete this checkpoint") from None


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.glob("step-*") if (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def prune_checkpoints(checkpoints_dir: Path, keep_last: int) -> None:
    """Keeps the newest `keep_last` complete checkpoints; removes stale temporaries."""
    for stale in Path(checkpoints_dir).glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def check_compatible(meta: CheckpointMeta, shape: ModelShape, checkpoint: Path) -> None:
    expected = dataclasses.asdict(shape)
    if meta.model_shape != expected:
        differing = sorted(k for k in expected if meta.model_shape.get(k) != expected[k])
        raise CheckpointError(
            f"checkpoint {checkpoint} was written for a different model "
            f"(differs in: {', '.join(differing) or 'keys'}); use a new experiment name, "
            "pass --resume never, or restore the original config")


def load_model_weights(model: GAPM, checkpoint: Path) -> None:
    try:
        model.load_state_dict(load_file(str(Path(checkpoint) / MODEL_FILE)))
    except (RuntimeError, OSError) as error:
        raise CheckpointError(f"cannot load weights from {checkpoint}: {error}") from None


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)


def load_model(checkpoint: Path) -> tuple[GAPM, CheckpointMeta]:
    """Rebuilds the model from a checkpoint alone, in eval mode."""
    meta = read_meta(checkpoint)
    model = GAPM(ModelShape(**meta.model_shape))
    load_model_weights(model, checkpoint)
    return model.eval(), meta

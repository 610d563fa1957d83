"""Checkpoints: written whole or not at all, found again after a crash.

A checkpoint is a directory `step-XXXXXXXX/` holding
  model.safetensors    every network's weights and buffers (no pickled code)
  training_state.pt    optimizer and grad-scaler states (tensors and numbers only, loaded
                       with weights_only=True)
  meta.json            stage, step, data position, model shape — written LAST.
It is built in a hidden temporary directory — every file flushed to disk, one file mode for
all — and renamed into place, the directory synced, so a reader never sees a half-written one,
even after a crash; a directory without meta.json is ignored (and cleaned up). A checkpoint of
the same step is set aside, not deleted, until its replacement is in place.

The checkpoint location may also be `s3://bucket/prefix`: the files are built locally, then
uploaded with meta.json last (each S3 PUT is atomic), and pruning deletes meta.json first, so
the same rule holds — a checkpoint exists exactly when its meta.json does. Transient storage
errors are retried (`storage.with_retries`); training uploads in the background
(`checkpoint_uploads`). Damaged files raise `DamagedCheckpoint`, with one line saying which.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import shutil
import tempfile
import time
import zipfile
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


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are truncated, corrupt or not what gapm writes."""


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
    """Writes one checkpoint and returns where it is: atomically into a local directory, or —
    for an s3:// location — built locally and uploaded now, meta.json last (training uses
    `checkpoint_uploads.RemoteCheckpointWriter` to upload in the background instead)."""
    if is_remote(checkpoints_dir):
        with tempfile.TemporaryDirectory() as staging:
            local = save_checkpoint(Path(staging), model, optimizers, extra_state, meta)
            return upload_checkpoint(local, checkpoints_dir)
    return save_local(Path(checkpoints_dir), model, optimizers, extra_state, meta)


def save_local(checkpoints_dir: Path, model: Method, optimizers: dict[str, Any], extra_state: dict[str, Any],
               meta: CheckpointMeta) -> Path:
    """Builds the checkpoint in a hidden directory — every file flushed to disk, with the usual
    file mode — then renames it into place and syncs the directory, so that after a crash a
    checkpoint is either complete or absent. A checkpoint of the same step that exists already
    stays until its replacement is complete. A full disk is one clear error."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / checkpoint_name(meta.step)
    staging = checkpoints_dir / f".tmp-{final.name}-{time.time_ns()}"
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    try:
        staging.mkdir()
        save_file(weights, str(staging / MODEL_FILE))
        torch.save({"optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                    **extra_state}, staging / STATE_FILE)
        meta.created = time.time()
        (staging / META_FILE).write_text(json.dumps(dataclasses.asdict(meta), indent=1))
        for name in (MODEL_FILE, STATE_FILE, META_FILE):
            _make_durable(staging / name)
        storage.fsync_directory(str(staging))
        replaced = None
        if final.exists():  # the same step saved again (e.g. end of stage == periodic save)
            replaced = checkpoints_dir / f".replaced-{final.name}-{time.time_ns()}"
            final.rename(replaced)
        staging.rename(final)
        storage.fsync_directory(str(checkpoints_dir))
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if _disk_full(error, checkpoints_dir, weights):
            raise CheckpointError(_disk_full_message(checkpoints_dir, weights)) from None
        raise
    return final


def _disk_full(error: BaseException, directory: Path, weights: dict[str, torch.Tensor]) -> bool:
    """ENOSPC, or a write error (torch.save reports one as a bare iostream RuntimeError) where
    the device has less room than the checkpoint needs."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return False
    return free < 3 * sum(t.numel() * t.element_size() for t in weights.values())


def _make_durable(path: Path) -> None:
    os.chmod(path, storage.new_file_mode())
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _disk_full_message(directory: Path, weights: dict[str, torch.Tensor]) -> str:
    needed = sum(t.numel() * t.element_size() for t in weights.values())
    free = shutil.disk_usage(directory).free
    # Adam keeps two moments per weight: a checkpoint is about three times the weights.
    return (f"no space left on the device of {directory} while writing a checkpoint: {free / 2**20:.1f} MiB "
            f"free, a checkpoint takes about {3 * needed / 2**20:.1f} MiB; free space there (or lower "
            "train.keep_last_checkpoints, or set train.checkpoint_dir elsewhere) and relaunch: training "
            "resumes from the last complete checkpoint")


def upload_checkpoint(local: Path, checkpoints_dir: str) -> str:
    """Uploads a complete local checkpoint to `checkpoints_dir` (s3://), meta.json last; retries
    transient storage errors (`storage.with_retries`). Returns its URL."""
    remote = child(checkpoints_dir, local.name)
    label = f"uploading checkpoint {local.name} to {checkpoints_dir}"
    # An older copy of this step stops counting first; each S3 PUT is atomic, meta.json completes it.
    storage.with_retries(lambda: storage.delete(child(remote, META_FILE)), label)
    for name in (MODEL_FILE, STATE_FILE, META_FILE):
        storage.with_retries(lambda name=name: storage.upload_file(str(local / name), child(remote, name)), label)
    return remote


def read_meta(checkpoint: Checkpoint) -> CheckpointMeta:
    meta_path = child(checkpoint, META_FILE)
    exists = (storage.with_retries(lambda: storage.exists(meta_path), f"reading {meta_path}") if is_remote(checkpoint)
              else Path(meta_path).is_file())
    if not exists:
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {META_FILE}); "
                              "pick another one or start without --resume")
    try:
        raw = (storage.with_retries(lambda: storage.read_bytes(meta_path), f"reading {meta_path}")
               if is_remote(checkpoint) else Path(meta_path).read_bytes())
        return CheckpointMeta(**json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
        raise DamagedCheckpoint(f"{meta_path} is unreadable ({error}); delete this checkpoint") from None


def list_checkpoints(checkpoints_dir: Checkpoint) -> list[Checkpoint]:
    """Complete checkpoints, oldest first."""
    if is_remote(checkpoints_dir):
        metas = storage.with_retries(lambda: storage.list_urls(checkpoints_dir, suffix="/" + META_FILE),
                                     f"listing checkpoints in {checkpoints_dir}")
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
    """Keeps the newest `keep_last` complete checkpoints; removes stale temporaries. A
    checkpoint set aside while its same-step replacement was written comes back if the
    replacement never completed (a crash between the two renames)."""
    if is_remote(checkpoints_dir):
        for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
            label = f"deleting old checkpoint {old}"
            # invalid from here on, even if the rest fails
            storage.with_retries(lambda old=old: storage.delete(child(old, META_FILE)), label)
            for name in (MODEL_FILE, STATE_FILE):
                storage.with_retries(lambda old=old, name=name: storage.delete(child(old, name)), label)
        return
    directory = Path(checkpoints_dir)
    for stale in directory.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for set_aside in sorted(directory.glob(".replaced-step-*")):
        original = directory / set_aside.name.removeprefix(".replaced-").rsplit("-", 1)[0]
        if not (original / META_FILE).is_file() and (set_aside / META_FILE).is_file():
            shutil.rmtree(original, ignore_errors=True)
            set_aside.rename(original)
        else:
            shutil.rmtree(set_aside, ignore_errors=True)
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
    storage.with_retries(lambda: storage.download_file(child(checkpoint, name), target),
                         f"downloading {child(checkpoint, name)}")
    return target


def load_model_weights(model: Method, checkpoint: Checkpoint) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = local_file(checkpoint, MODEL_FILE, scratch)
        try:
            weights = load_file(path)
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise DamagedCheckpoint(f"{child(checkpoint, MODEL_FILE)} is unreadable, truncated or corrupt "
                                    f"({_first_line(error)}); delete this checkpoint") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"cannot load weights from {checkpoint}: {_first_line(error)}") from None


def load_training_state(checkpoint: Checkpoint) -> dict[str, Any]:
    """Optimizer and loss-scaler state, loaded with weights_only=True: tensors and numbers only."""
    where = child(checkpoint, STATE_FILE)
    with tempfile.TemporaryDirectory() as scratch:
        path = local_file(checkpoint, STATE_FILE, scratch)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise DamagedCheckpoint(
                f"{where} is refused: it holds Python objects other than tensors and numbers, which could run "
                "code when loaded; gapm never writes those, so it was replaced or tampered with - delete it") from None
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
            raise DamagedCheckpoint(f"{where} is unreadable, truncated or corrupt ({_first_line(error)}); "
                                    "delete this checkpoint") from None
    if not isinstance(state, dict) or "optimizers" not in state:
        raise DamagedCheckpoint(f"{where} is not a gapm training state (no optimizer states); delete it")
    return state


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def load_model(checkpoint: Checkpoint) -> tuple[Method, CheckpointMeta]:
    """Rebuilds the model from a checkpoint alone, in eval mode."""
    meta = read_meta(checkpoint)
    model = build_model(meta.model_kind, ModelShape.from_dict(meta.model_shape), **meta.hyperparameters)
    load_model_weights(model, checkpoint)
    return model.eval(), meta

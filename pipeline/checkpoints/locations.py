"""Where checkpoints are and what they are called: a checkpoint is a directory `step-XXXXXXXX`
(a local Path, or an s3:// URL as str) inside a checkpoint directory, and it exists exactly when
its meta.json does (meta.json is always written last and deleted first)."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.checkpoints.errors import CheckpointError
from pipeline.data import storage

# A checkpoint (or a directory of them) is a local directory (Path) or an s3:// URL (str).
Checkpoint = Path | str

MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "training_state.pt", "meta.json"
RUN_CONFIG = "config.yaml"  # the resolved config a training writes into its run directory
PAYLOAD_FILES = (MODEL_FILE, STATE_FILE)  # what meta.json describes; written before it


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint name `step-XXXXXXXX`; None for any other name."""
    digits = name.removeprefix("step-")
    return int(digits) if name.startswith("step-") and digits.isdigit() else None


def is_remote(location: Checkpoint) -> bool:
    return isinstance(location, str) and storage.is_s3_url(location)


def as_location(location: Checkpoint | str) -> Checkpoint:
    """An s3:// URL stays a str; anything else (a path, a file:// URL) becomes a Path."""
    return location if is_remote(location) else Path(storage.local_path(str(location)))


def child(location: Checkpoint, name: str) -> Checkpoint:
    return storage.join_url(location, name) if is_remote(location) else Path(location) / name


def checkpoint_basename(checkpoint: Checkpoint) -> str:
    return str(checkpoint).rstrip("/").rsplit("/", 1)[-1]


def list_checkpoints(checkpoints_dir: Checkpoint) -> list[Checkpoint]:
    """The checkpoints of a directory that have their meta.json, oldest first (whether each
    one's meta.json is valid is for `read_meta` to say)."""
    if is_remote(checkpoints_dir):
        metas = storage.with_retries(lambda: storage.list_urls(checkpoints_dir, suffix="/" + META_FILE),
                                     f"listing checkpoints in {checkpoints_dir}")
        found = [url[: -len(META_FILE) - 1] for url in metas]
        return sorted((u for u in found if step_of(checkpoint_basename(u)) is not None),
                      key=lambda u: step_of(checkpoint_basename(u)))
    directory = Path(checkpoints_dir)
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step-*") if step_of(p.name) is not None and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: step_of(p.name))


def latest_checkpoint(checkpoints_dir: Checkpoint) -> Checkpoint | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def run_checkpoints_dir(run_dir: Path) -> Checkpoint | None:
    """The checkpoint directory of a run directory — its config.yaml's `train.checkpoint_dir`,
    else RUN_DIR/checkpoints — or None when `run_dir` is not one (a checkpoint, anything else)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or (run_dir / META_FILE).is_file():
        return None
    configured = None
    if (run_dir / RUN_CONFIG).is_file():
        try:
            configured = ((yaml.safe_load((run_dir / RUN_CONFIG).read_text()) or {}).get("train") or {}).get(
                "checkpoint_dir")
        except (yaml.YAMLError, AttributeError, OSError):
            configured = None  # not gapm's config.yaml: RUN_DIR/checkpoints, if there is one
    elif not (run_dir / "checkpoints").is_dir():
        return None
    return as_location(configured) if isinstance(configured, str) and configured else run_dir / "checkpoints"


def newest_run_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of a run directory (`gapm sample runs/NAME`), None when
    `run_dir` is not a run directory; CheckpointError when it has no checkpoint yet."""
    directory = run_checkpoints_dir(run_dir)
    if directory is None:
        return None
    newest = latest_checkpoint(directory)
    if newest is None:
        raise CheckpointError(f"run directory {run_dir} has no complete checkpoint in {directory} yet; "
                              "train it (gapm train ... resumes) or name a checkpoint")
    return newest

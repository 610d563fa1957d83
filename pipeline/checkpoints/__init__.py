"""Checkpoints: the one component that writes, finds, reads, uploads and prunes them.

A checkpoint is a directory `step-XXXXXXXX/` (local, or under an s3:// prefix) holding
  model.safetensors    every network's weights and buffers (no pickled code)
  training_state.pt    optimizer and grad-scaler states (tensors and numbers only, loaded
                       with weights_only=True)
  meta.json            stage, step, data position, model kind/shape/hyper-parameters and the
                       size and sha256 of the two files above — written LAST, deleted FIRST:
                       a checkpoint exists exactly when its meta.json does.

    settings      CheckpointConfig, the component's typed settings (no torch)
    locations     names, local/s3 locations, listing complete checkpoints, a run directory's newest
    meta          CheckpointMeta and its schema (a checkpoint that fails it is damaged)
    local         atomic local writes, whole-file verification, pruning
    remote        s3:// uploads (verified local copy first, meta.json last) and deletes
    uploads       rank 0's background uploads through `<run dir>/.checkpoint-uploads/`
    reading       one checkpoint's meta, files (checked against meta.json), weights, state, model
    checkpointer  Checkpointer: a run's checkpoint directory (save, restore with fallback, prune)
    errors        what fails and with which exit status (2: bad input, 75: resumable)

It imports gapm, pipeline.data.storage and the foundations (errors, stopping) only: the
training loop, the registry and the evaluation jobs sit above it.
"""

from pipeline.checkpoints.checkpointer import Checkpointer, Restored
from pipeline.checkpoints.errors import (
    CheckpointError,
    DamagedCheckpoint,
    NoSpaceLeft,
    UnwritableLocation,
    disk_failure,
)
from pipeline.checkpoints.local import save_local, verify_complete
from pipeline.checkpoints.locations import (
    META_FILE,
    MODEL_FILE,
    PAYLOAD_FILES,
    STATE_FILE,
    Checkpoint,
    as_location,
    checkpoint_basename,
    checkpoint_name,
    child,
    is_remote,
    latest_checkpoint,
    list_checkpoints,
    newest_run_checkpoint,
    run_checkpoints_dir,
    step_of,
)
from pipeline.checkpoints.meta import (
    FORMAT_VERSION,
    CheckpointMeta,
    check_compatible,
    check_plan,
    parse_meta,
)
from pipeline.checkpoints.reading import (
    load_model,
    load_model_weights,
    load_training_state,
    local_copy,
    local_file,
    read_meta,
)
from pipeline.checkpoints.settings import STAGING, CheckpointConfig
from pipeline.checkpoints.uploads import CheckpointUploadFailed

__all__ = [
    "FORMAT_VERSION", "META_FILE", "MODEL_FILE", "PAYLOAD_FILES", "STAGING", "STATE_FILE", "Checkpoint",
    "CheckpointConfig", "CheckpointError", "CheckpointMeta", "CheckpointUploadFailed", "Checkpointer",
    "DamagedCheckpoint", "NoSpaceLeft", "Restored", "UnwritableLocation", "as_location", "check_compatible",
    "check_plan", "checkpoint_basename", "checkpoint_name", "child", "disk_failure", "is_remote",
    "latest_checkpoint", "list_checkpoints", "load_model", "load_model_weights", "load_training_state",
    "local_copy", "local_file", "newest_run_checkpoint", "parse_meta", "read_meta", "run_checkpoints_dir",
    "save_local", "step_of", "verify_complete",
]

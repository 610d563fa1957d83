"""Checkpoints in object storage (s3://). Each PUT is atomic, and meta.json is uploaded last
and deleted first, so a checkpoint exists exactly when its meta.json does. A checkpoint is only
uploaded once its local copy is verified whole (`local.verify_complete`): a partial local
directory never touches the remote one. Transient storage errors are retried
(`storage.with_retries`, within train.storage_retry_seconds).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.checkpoints.local import verify_complete
from pipeline.checkpoints.locations import (
    META_FILE,
    PAYLOAD_FILES,
    Checkpoint,
    child,
    list_checkpoints,
)
from pipeline.data import storage

log = logging.getLogger(__name__)


def upload_checkpoint(local: Path, checkpoints_dir: str) -> str:
    """Uploads the complete local checkpoint `local` into `checkpoints_dir`, meta.json last, and
    returns its URL. Raises DamagedCheckpoint, before anything remote is touched, if `local` is
    not whole. A remote copy with the same meta.json (uploaded before a launch stopped) is kept
    as it is; another copy of the same step stops counting (its meta.json goes) only now."""
    verify_complete(local)
    remote = child(checkpoints_dir, local.name)
    remote_meta = child(remote, META_FILE)
    label = f"uploading checkpoint {local.name} to {checkpoints_dir}"
    local_meta = (local / META_FILE).read_bytes()
    if storage.with_retries(lambda: storage.exists(remote_meta), label) and storage.with_retries(
            lambda: storage.read_bytes(remote_meta), label) == local_meta:
        log.info("checkpoint %s is already in %s", local.name, checkpoints_dir)
        return remote
    storage.with_retries(lambda: storage.delete(remote_meta), label)
    for name in (*PAYLOAD_FILES, META_FILE):
        storage.with_retries(lambda name=name: storage.upload_file(str(local / name), child(remote, name)), label)
    return remote


def delete_checkpoint(checkpoint: Checkpoint) -> None:
    """meta.json first: the checkpoint stops counting at once, even if the rest fails."""
    label = f"deleting old checkpoint {checkpoint}"
    for name in (META_FILE, *PAYLOAD_FILES):
        storage.with_retries(lambda name=name: storage.delete(child(checkpoint, name)), label)


def prune_remote(checkpoints_dir: str, keep_last: int) -> None:
    for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
        delete_checkpoint(old)

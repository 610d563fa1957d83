"""Checkpoints in object storage without stalling training: rank 0 writes each checkpoint
complete to a local staging directory (`<run dir>/.checkpoint-uploads/`) and one background
thread uploads them in order, retrying transient storage errors (an endpoint restarting, a
network blip) for `train.storage_retry_seconds`, pruning old ones once a new one is up. Training
goes on meanwhile.

If an upload still fails, training stops with the resumable status (exit 75) at the next
checkpoint or at the end; the staged checkpoints stay on local disk, and the next launch uploads
them before it resumes — nothing is lost and nothing is reported as an input error.

A staged checkpoint is removed only after its upload, and whole (renamed away first). One that
is nonetheless partial at the next launch — a file missing or truncated, e.g. a kill while an
older version deleted it — is never uploaded: it is set aside as `.incomplete-step-...` with a
warning, and the remote checkpoints stay as they are.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.checkpoints.errors import DamagedCheckpoint
from pipeline.checkpoints.local import discard
from pipeline.checkpoints.locations import step_of
from pipeline.checkpoints.remote import prune_remote, upload_checkpoint
from pipeline.data import outages, storage
from pipeline.stopping import TrainingInterrupted

log = logging.getLogger(__name__)


class CheckpointUploadFailed(TrainingInterrupted):
    """Storage stayed unavailable for longer than the retry budget: stop, resumable."""

    def __init__(self, staged: Path, destination: str, error: BaseException):
        Exception.__init__(self, f"checkpoint {staged.name} could not be uploaded to {destination} ({error}); it is "
                                 f"kept at {staged} and uploaded when the run is launched again (--resume auto)")
        self.checkpoint = staged


def staged_checkpoints(staging: Path) -> list[Path]:
    """Every `step-*` directory waiting in `staging`, complete or not, oldest first."""
    if not staging.is_dir():
        return []
    return sorted((p for p in staging.iterdir() if step_of(p.name) is not None), key=lambda p: step_of(p.name))


def set_aside(staged: Path, why: DamagedCheckpoint) -> Path:
    aside = staged.with_name(f".incomplete-{staged.name}-{time.time_ns()}")
    staged.rename(aside)
    log.warning("staged checkpoint %s is incomplete (%s): not uploaded, set aside as %s; the uploaded checkpoints "
                "are untouched", staged.name, why, aside)
    return aside


def upload_staged(staging: Path, destination: str, keep_last: int) -> None:
    """At start-up: uploads what an earlier launch could not (oldest first), then prunes. A
    partial staged checkpoint is set aside, never uploaded."""
    for leftover in (*staging.glob(".tmp-step-*"), *staging.glob(".discarded-step-*")):
        shutil.rmtree(leftover, ignore_errors=True)  # never complete: a write or a removal cut short
    for staged in staged_checkpoints(staging):
        try:
            log.warning("uploading checkpoint %s left by an earlier launch to %s", staged.name, destination)
            upload_checkpoint(staged, destination)
        except DamagedCheckpoint as why:
            set_aside(staged, why)
            continue
        discard(staged)
        prune_remote(destination, keep_last)


class RemoteCheckpointWriter:
    """Rank 0's checkpoint uploads, in order, on one background thread."""

    def __init__(self, destination: str, staging: Path, keep_last: int,
                 uploaded: Callable[[str], None] = lambda url: None):
        self.destination, self.staging, self.keep_last, self.uploaded = destination, staging, keep_last, uploaded
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self.failure: CheckpointUploadFailed | None = None
        self._thread = threading.Thread(target=self._work, name="checkpoint-uploads", daemon=True)
        self._thread.start()

    def submit(self, staged: Path) -> str:
        """Queues a complete local checkpoint; returns the URL it will have."""
        self._queue.put(staged)
        return storage.join_url(self.destination, staged.name)

    def drain(self, timeout_s: float | None = None) -> bool:
        """Waits until every queued checkpoint is up (or one failed for good); False if
        `timeout_s` passed first (what is left stays staged for the next launch)."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout_s)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        while True:
            staged = self._queue.get()
            try:
                if staged is None:
                    return
                if self.failure is None:  # after a failure the rest stays staged for the next launch
                    self._upload(staged)
            finally:
                self._queue.task_done()

    def _upload(self, staged: Path) -> None:
        try:
            with outages.consequence("training goes on, the checkpoint waits in " + str(staged),
                                     "then the run stops resumably (exit 75) and the checkpoint is uploaded at the "
                                     "next launch"):
                url = upload_checkpoint(staged, self.destination)
                prune_remote(self.destination, self.keep_last)
        except (storage.StorageError, DamagedCheckpoint, OSError) as error:
            log.error("checkpoint %s: upload to %s failed: %s", staged.name, self.destination, error)
            self.failure = CheckpointUploadFailed(staged, self.destination, error)
            return
        discard(staged)
        self.uploaded(url)

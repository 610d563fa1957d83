"""`Checkpointer`: one run's checkpoint directory — saving (atomically, local or s3:// through
the background uploads), listing, the latest complete checkpoint to resume from (falling back
over damaged ones), and retention."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gapm import Method
from pipeline.checkpoints.errors import DamagedCheckpoint, disk_failure
from pipeline.checkpoints.local import prune_local, save_local
from pipeline.checkpoints.locations import (
    Checkpoint,
    as_location,
    is_remote,
    list_checkpoints,
)
from pipeline.checkpoints.meta import CheckpointMeta, check_compatible, check_plan
from pipeline.checkpoints.reading import (
    load_model_weights,
    load_training_state,
    read_meta,
)
from pipeline.checkpoints.remote import prune_remote, upload_checkpoint
from pipeline.checkpoints.settings import CheckpointConfig
from pipeline.checkpoints.uploads import (
    CheckpointUploadFailed,
    RemoteCheckpointWriter,
    upload_staged,
)

log = logging.getLogger(__name__)


@dataclass
class Restored:
    """The checkpoint a run resumes from: where, its meta, and its optimizer/scaler state (the
    model's weights are loaded already)."""

    checkpoint: Checkpoint
    meta: CheckpointMeta
    state: dict[str, Any]


class Checkpointer:
    """The checkpoints of one directory (`config.directory`). Reading needs nothing else;
    `start` (rank 0, before training) makes it ready to write."""

    def __init__(self, config: CheckpointConfig, uploaded: Callable[[Checkpoint], None] = lambda location: None):
        self.config = config
        self.directory: Checkpoint = as_location(config.directory)
        self.uploaded = uploaded  # told of every complete checkpoint (the tracker logs it)
        self._writer: RemoteCheckpointWriter | None = None

    @classmethod
    def at(cls, directory: Checkpoint | str) -> "Checkpointer":
        """A reader of the checkpoints in `directory` (local, file:// or s3://)."""
        return cls(CheckpointConfig(directory=directory))

    # ------------------------------------------------------------------ reading

    def list(self) -> list[Checkpoint]:
        """The checkpoints with a meta.json, oldest first."""
        return list_checkpoints(self.directory)

    def latest(self) -> Checkpoint | None:
        found = self.list()
        return found[-1] if found else None

    def restore(self, resume: str, model: Method, stage_steps: Sequence[int],
                announce: bool = True) -> Restored | None:
        """Loads into `model` the weights of the checkpoint to resume from and returns it with
        its state; None to start afresh. `resume`: 'auto' (the newest checkpoint that is whole,
        valid and within `stage_steps`; a damaged one is skipped with one warning), 'never', or
        one checkpoint (a damaged one is an error). `announce`: log what happens (rank 0)."""
        if resume == "never":
            return None
        candidates = (list(reversed(self.list())) if resume == "auto" else [as_location(resume)])
        for index, checkpoint in enumerate(candidates):
            try:
                meta = read_meta(checkpoint)
                check_compatible(meta, model.shape, checkpoint, model.kind)
                check_plan(meta, stage_steps, checkpoint)
                load_model_weights(model, checkpoint, meta)
                state = load_training_state(checkpoint, meta)
            except DamagedCheckpoint as error:
                if resume != "auto" or index == len(candidates) - 1:
                    raise
                if announce:
                    log.warning("not resuming from %s: %s; trying the checkpoint before it", checkpoint, error)
                continue
            if announce:
                log.info("resuming from %s (stage %d, step %d)", checkpoint, meta.stage, meta.step)
            return Restored(checkpoint, meta, state)
        return None

    # ------------------------------------------------------------------ writing (rank 0)

    def start(self) -> None:
        """Before training, on rank 0: a local directory must be writable (one line and exit 2
        if not); for s3://, what an earlier launch left staged goes up first (a partial one is
        set aside), then uploads run in the background."""
        if not is_remote(self.directory):
            try:
                Path(self.directory).mkdir(parents=True, exist_ok=True)
                probe = Path(self.directory) / ".write-probe"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as error:
                failure = disk_failure(error, Path(self.directory), "checkpoints", setting="train.checkpoint_dir")
                if failure is None:
                    raise
                raise failure from None
            return
        if self.config.staging is not None:
            upload_staged(self.config.staging, self.directory, self.config.keep_last)
            self._writer = RemoteCheckpointWriter(self.directory, self.config.staging, self.config.keep_last,
                                                  uploaded=self.uploaded)

    def save(self, model: Method, optimizers: dict[str, Any], extra_state: dict[str, Any],
             meta: CheckpointMeta) -> Checkpoint:
        """Writes one checkpoint (rank 0) and returns where it is — for s3://, where it will be
        once its background upload is done. Older ones beyond keep_last are pruned."""
        if self._writer is not None:
            staged = save_local(self.config.staging, model, optimizers, extra_state, meta, setting="output_dir")
            return self._writer.submit(staged)
        if is_remote(self.directory):  # no staging directory: built in a temporary one, uploaded now
            with tempfile.TemporaryDirectory() as scratch:
                url = upload_checkpoint(save_local(Path(scratch), model, optimizers, extra_state, meta), self.directory)
            prune_remote(self.directory, self.config.keep_last)
            self.uploaded(url)
            return url
        saved = save_local(Path(self.directory), model, optimizers, extra_state, meta)
        self.prune()
        self.uploaded(saved)
        return saved

    def prune(self) -> None:
        """Keeps the newest `keep_last` checkpoints."""
        if is_remote(self.directory):
            prune_remote(self.directory, self.config.keep_last)
        else:
            prune_local(Path(self.directory), self.config.keep_last, self.list())

    @property
    def upload_failure(self) -> CheckpointUploadFailed | None:
        """The background upload that failed for good, if one did."""
        return self._writer.failure if self._writer is not None else None

    def wait_for_uploads(self, timeout_s: float | None = None) -> None:
        """Blocks until the background uploads are done or `timeout_s` passed (what is left
        stays staged and goes up at the next launch)."""
        if self._writer is not None and not self._writer.drain(timeout_s):
            log.warning("checkpoint uploads to %s still running after %.0f s; what is left stays in %s and is "
                        "uploaded at the next launch", self.directory, timeout_s, self.config.staging)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

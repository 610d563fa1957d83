"""What can go wrong with a checkpoint, and the exit status each failure ends in.

    CheckpointError        a checkpoint that cannot be used as asked (another model, an explicit
                           --resume that is not a checkpoint): bad input, exit 2
    DamagedCheckpoint      truncated, corrupt, swapped or invalid files (meta.json fails its
                           schema, a file's size or sha256 differs from what meta.json records):
                           `--resume auto` falls back to the checkpoint before it; named
                           explicitly, bad input, exit 2
    UnwritableLocation     a place that cannot be written: a path under a regular file, a
                           read-only file system, no permission. Bad input — a relaunch would
                           fail the same way until the path or its permissions are fixed: exit 2
    NoSpaceLeft            the disk, the quota or the file-size limit (`ulimit -f`) ran out while
                           writing. Not the user's input, and training is safe — the checkpoint
                           being written is discarded whole, the previous ones stay — so a relaunch
                           once space is freed resumes: exit 75 (resumable), like a storage outage

`disk_failure` sorts an OSError into the last two; every other error keeps its traceback.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from pipeline.errors import GapmError
from pipeline.stopping import TrainingInterrupted

NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


class CheckpointError(GapmError):
    """A checkpoint that cannot be used; the message says which and what to do."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are truncated, corrupt, invalid or not what gapm writes."""


class UnwritableLocation(GapmError):
    """A directory gapm must write to that cannot be written (exit 2)."""


class NoSpaceLeft(TrainingInterrupted):
    """The disk (or quota, or file-size limit) ran out while writing: stop, resumable (exit 75)."""

    def __init__(self, message: str, checkpoint=None):
        Exception.__init__(self, message)
        self.checkpoint = checkpoint


def disk_failure(error: OSError, directory: Path, writing: str, *, setting: str = "",
                 needed_bytes: int | None = None) -> GapmError | NoSpaceLeft | None:
    """The one-line error for an OSError raised while writing `writing` into `directory`, or
    None when it is not a disk failure (then it is a bug and keeps its traceback). `setting`
    names the config key that chose the place; `needed_bytes`, about how much is written."""
    where = error.filename or directory
    reason = (error.strerror or str(error)).rstrip(".")
    if error.errno in NO_SPACE:
        free = _free_bytes(directory)
        limit = (" (the file-size limit, `ulimit -f`, of this process)" if error.errno == errno.EFBIG else "")
        room = f"{_size(free)} free" if free is not None else "free space unknown"
        needs = f", it needs about {_size(needed_bytes)}" if needed_bytes else ""
        return NoSpaceLeft(
            f"no space left on the device of {directory} while writing {writing}: {reason}{limit}; {room}{needs}; "
            "nothing complete was lost: free space there (or raise the limit, lower train.keep_last_checkpoints, "
            f"or move {setting or 'the directory'} elsewhere) and relaunch with --resume auto: training resumes "
            "from the last complete checkpoint")
    if error.errno in UNWRITABLE:
        fix = {errno.ENOTDIR: "a part of the path is a regular file, not a directory",
               errno.EEXIST: "a regular file is in the way of the directory",
               errno.EROFS: "the file system is mounted read-only"}.get(error.errno, "no permission to write there")
        return UnwritableLocation(
            f"cannot write {writing} to {where} ({reason}: {fix}); point {setting or 'it'} at a writable "
            "directory, or fix the permissions, and launch again")
    return None


def _free_bytes(directory: Path) -> int | None:
    for candidate in (Path(directory), *Path(directory).parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.0f} KiB"

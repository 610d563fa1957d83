"""Checkpoints on local disk: written whole or not at all, and pruned.

A checkpoint is built in a hidden directory `.tmp-step-XXXXXXXX-<ns>` — every file written
from memory with one ordinary write, flushed to disk, one file mode for all, meta.json last —
then renamed into place and the directory synced, so a reader never sees a half-written one,
even after a crash. A checkpoint of the same step is set aside (`.replaced-...`), not deleted,
until its replacement is in place. A full disk or an unwritable directory is one line
(`errors.disk_failure`); the half-built directory is removed and the earlier checkpoints stay.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from gapm import Method
from pipeline.checkpoints.errors import DamagedCheckpoint, disk_failure
from pipeline.checkpoints.locations import (
    META_FILE,
    MODEL_FILE,
    PAYLOAD_FILES,
    STATE_FILE,
    checkpoint_name,
    step_of,
)
from pipeline.checkpoints.meta import (
    FORMAT_VERSION,
    CheckpointMeta,
    file_record,
    parse_meta,
)
from pipeline.data import storage


def checkpoint_files(model: Method, optimizers: dict[str, Any], extra_state: dict[str, Any]) -> dict[str, bytes]:
    """The bytes of model.safetensors and training_state.pt, serialised in memory so that
    writing them is one plain write each (a full disk is then an OSError with its errno)."""
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    state = io.BytesIO()
    torch.save({"optimizers": {name: opt.state_dict() for name, opt in optimizers.items()}, **extra_state}, state)
    return {MODEL_FILE: safetensors_bytes(weights), STATE_FILE: state.getvalue()}


def save_local(checkpoints_dir: Path, model: Method, optimizers: dict[str, Any], extra_state: dict[str, Any],
               meta: CheckpointMeta, setting: str = "train.checkpoint_dir") -> Path:
    """Writes one checkpoint atomically into `checkpoints_dir` and returns it. `meta` gets the
    files' sizes and digests; `setting` names the config key of the place in errors."""
    payload = checkpoint_files(model, optimizers, extra_state)
    meta.files = {name: file_record(data) for name, data in payload.items()}
    meta.format_version, meta.created = FORMAT_VERSION, time.time()
    final = checkpoints_dir / checkpoint_name(meta.step)
    staging = checkpoints_dir / f".tmp-{final.name}-{time.time_ns()}"
    try:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        for name, data in {**payload, META_FILE: meta.to_json().encode()}.items():
            write_durable(staging / name, data)
        storage.fsync_directory(str(staging))
        replaced = None
        if final.exists():  # the same step saved again (e.g. a resumed run re-saving its stage end)
            replaced = checkpoints_dir / f".replaced-{final.name}-{time.time_ns()}"
            final.rename(replaced)
        staging.rename(final)
        storage.fsync_directory(str(checkpoints_dir))
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        failure = disk_failure(error, checkpoints_dir, f"checkpoint {final.name}", setting=setting,
                               needed_bytes=sum(map(len, payload.values()))) if isinstance(error, OSError) else None
        if failure is not None:
            raise failure from None
        raise
    return final


def write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, storage.new_file_mode())


def verify_complete(directory: Path) -> CheckpointMeta:
    """A local checkpoint directory holds every file whole: meta.json valid, each file of the
    size and sha256 meta.json records (present and non-empty for format 1). DamagedCheckpoint
    naming what is missing or wrong otherwise."""
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise DamagedCheckpoint(f"{directory} has no {META_FILE}")
    meta = parse_meta(meta_path.read_bytes(), meta_path)
    for name in PAYLOAD_FILES:
        path = directory / name
        if not path.is_file():
            raise DamagedCheckpoint(f"{directory} has no {name}")
        record = meta.files.get(name)
        if record is None:
            if path.stat().st_size == 0:
                raise DamagedCheckpoint(f"{path} is empty")
            continue
        check_file(path.read_bytes(), record, path)
    return meta


def check_file(data: bytes, record: dict[str, Any], where: Any) -> None:
    """`data` is the file meta.json describes with `record` (size, then sha256)."""
    if len(data) != record["bytes"]:
        raise DamagedCheckpoint(f"{where} is truncated or replaced: {len(data)} bytes, meta.json records "
                                f"{record['bytes']}; delete this checkpoint")
    if file_record(data)["sha256"] != record["sha256"]:
        raise DamagedCheckpoint(f"{where} is corrupt or replaced: its sha256 differs from the one meta.json "
                                "records; delete this checkpoint")


def prune_local(directory: Path, keep_last: int, complete: list[Path]) -> None:
    """Keeps the newest `keep_last` of `complete` (oldest first); removes stale temporaries. A
    checkpoint set aside while its same-step replacement was written comes back if the
    replacement never completed (a crash between the two renames)."""
    for pattern in (".tmp-step-*", ".discarded-step-*"):
        for stale in directory.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    for set_aside in sorted(directory.glob(".replaced-step-*")):
        original = directory / set_aside.name.removeprefix(".replaced-").rsplit("-", 1)[0]
        if not (original / META_FILE).is_file() and (set_aside / META_FILE).is_file():
            shutil.rmtree(original, ignore_errors=True)
            set_aside.rename(original)
        else:
            shutil.rmtree(set_aside, ignore_errors=True)
    for old in complete[:-keep_last]:
        discard(old)


def discard(checkpoint: Path) -> None:
    """Removes a local checkpoint so that it is gone whole: renamed out of the `step-*`
    namespace first (one atomic step), then deleted — a kill midway leaves a hidden
    `.discarded-*` directory, never a `step-*` missing some files."""
    if step_of(checkpoint.name) is None or not checkpoint.exists():
        shutil.rmtree(checkpoint, ignore_errors=True)
        return
    doomed = checkpoint.with_name(f".discarded-{checkpoint.name}-{time.time_ns()}")
    checkpoint.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)

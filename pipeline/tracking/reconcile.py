"""Completing an MLflow run from the run directory: what a process that died could not deliver.

The outbox (pipeline.tracking.outbox) keeps undelivered MLflow calls in memory, so a process
that dies while MLflow is unreachable (kill -9, OOM, a lost node) or that ends before MLflow
is back loses them. What they would have delivered is on disk anyway:

* metric values: `metrics.jsonl`, which `RunDirectoryTracker` appends (and flushes) before
  MLflow is even queued, and fsyncs at every checkpoint;
* checkpoint artifacts: the complete checkpoints of the checkpoint directory, and the
  hard-linked copies in `<run_dir>/.mlflow-upload/` of those that were pruned before their
  upload (`stage_checkpoint`; a copy is made under a temporary name and renamed when whole, so
  a half-made copy is never taken for a checkpoint).

So every start reconciles: `EarlierRecord.snapshot` notes, before the new process logs
anything, how far metrics.jsonl goes and which checkpoints exist (staging each one, so that
pruning in this process cannot take it away before it is delivered); the tracker's first
MLflow call compares that record with the run and sends what is missing.

Idempotent, so that a delivery whose acknowledgement was lost is not sent twice (MLflow does
not deduplicate): a recorded value counts as delivered when the run holds a value with the
same key, step and value — counted as a multiset, so a step recorded twice (re-trained after a
resume) is expected twice. A checkpoint counts as delivered when `checkpoints/step-N` among
the run's artifacts has every file of the local copy at the same size. A reconciliation cut
short is simply done again at the next start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import checkpoints

log = logging.getLogger(__name__)

METRICS_RECORD = "metrics.jsonl"  # written by pipeline.tracking.tracker.RunDirectoryTracker
UPLOAD_STAGING = ".mlflow-upload"  # in the run directory: checkpoints waiting for their upload
CHECKPOINT_ARTIFACTS = "checkpoints"  # checkpoints/step-XXXXXXXX among the run's artifacts
PARTIAL = ".partial"
RecordedValue = tuple[str, float, int, int]  # (key, value, milliseconds, step)


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The complete local checkpoints, oldest first, as the checkpoint component decides."""
    return [Path(c) for c in checkpoints.list_checkpoints(checkpoints_dir)]


# --------------------------------------------------------------------------- staging


def stage_checkpoint(checkpoint: Path, staging: Path) -> Path | None:
    """A hard-linked copy of `checkpoint` in `staging` (no data copied) that survives the
    checkpoint's pruning until it is uploaded; None where the filesystem has no hard links."""
    name = f"{checkpoint.name}-{time.time_ns()}"
    partial, staged = staging / f".{name}{PARTIAL}", staging / name
    try:
        staging.mkdir(parents=True, exist_ok=True)
        shutil.copytree(checkpoint, partial, copy_function=os.link)
        os.replace(partial, staged)  # whole, or not there
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        return None
    return staged


def staged_name(staged: Path) -> str:
    """The checkpoint a staged copy is of: step-00000010-<ns> -> step-00000010."""
    return staged.name.rsplit("-", 1)[0]


def staged_checkpoints(staging: Path) -> list[Path]:
    """The whole staged copies, oldest first; half-made ones (a process died while linking)
    are removed."""
    if not staging.is_dir():
        return []
    found = []
    for entry in staging.iterdir():
        if entry.name.endswith(PARTIAL):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_dir() and entry.name.startswith("step-"):
            found.append(entry)
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]) if p.name.rsplit("-", 1)[1].isdigit() else 0)


# --------------------------------------------------------------------------- the record


def read_record(path: Path, end: int) -> list[RecordedValue]:
    """Every metric value in the first `end` bytes of a metrics.jsonl, in order; a line that is
    not JSON (cut by a crash while written) is skipped."""
    try:
        with open(path, "rb") as record:
            return [value for line in _lines_before(record, end) for value in _row_values(line)]
    except FileNotFoundError:
        return []


def _lines_before(record: Any, end: int) -> Iterable[bytes]:
    """The lines of an open file within its first `end` bytes, read as they come."""
    remaining = end
    for line in record:
        if remaining <= 0:
            return
        yield line[:remaining]
        remaining -= len(line)


def _row_values(line: bytes) -> list[RecordedValue]:
    """The metric values of one metrics.jsonl line; none for a line that is not a row."""
    values: list[RecordedValue] = []
    if line:
        try:
            row = json.loads(line)
            step, milliseconds = int(row["step"]), int(float(row["time"]) * 1000)
        except (ValueError, KeyError, TypeError):
            return values
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                values.append((key, float(value), milliseconds, step))
    return values


def _same_value(value: float) -> object:
    """What MLflow gives back for a logged value: NaN as NaN, infinities as the largest floats."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return math.copysign(sys.float_info.max, value)
    return value


def missing_values(recorded: Iterable[RecordedValue], history: Callable[[str], Iterable[Any]]
                   ) -> list[RecordedValue]:
    """The recorded values the run does not hold; `history(key)` gives the run's values of a
    key (objects with .step and .value, as MlflowClient.get_metric_history)."""
    by_key: dict[str, list[RecordedValue]] = {}
    for value in recorded:
        by_key.setdefault(value[0], []).append(value)
    missing = []
    for key, values in by_key.items():
        held = Counter((int(m.step), _same_value(float(m.value))) for m in history(key))
        for value in values:
            identity = (value[3], _same_value(value[1]))
            if held[identity] > 0:
                held[identity] -= 1
            else:
                missing.append(value)
    return missing


def is_delivered(local: Path, listed: dict[str, int | None]) -> bool:
    """Does the run hold every file of the checkpoint copy `local` ({name: size} listed)?"""
    files = {p.name: p.stat().st_size for p in local.iterdir() if p.is_file()}
    return bool(files) and all(listed.get(name, -1) in (size, None) for name, size in files.items())


@dataclass
class EarlierRecord:
    """What the processes before this one left in the run directory (see the module doc)."""

    run_dir: Path
    metrics_end: int = 0  # bytes of metrics.jsonl written before this process
    checkpoints: dict[str, list[Path]] = field(default_factory=dict)  # name -> staged copies, oldest first

    @classmethod
    def snapshot(cls, run_dir: Path, checkpoints_dir: Path | None) -> "EarlierRecord":
        """Notes the record before this process logs anything, and stages (hard links) the
        complete checkpoints of `checkpoints_dir` (None: checkpoints are not uploaded), so that
        this process's pruning cannot take one away before it is found delivered or uploaded."""
        run_dir = Path(run_dir)
        try:
            metrics_end = (run_dir / METRICS_RECORD).stat().st_size
        except OSError:
            metrics_end = 0
        record = cls(run_dir, metrics_end)
        if checkpoints_dir is None:
            return record
        staging = run_dir / UPLOAD_STAGING
        for staged in staged_checkpoints(staging):
            record.checkpoints.setdefault(staged_name(staged), []).append(staged)
        for checkpoint in complete_checkpoints(checkpoints_dir):
            staged = stage_checkpoint(checkpoint, staging) or checkpoint
            record.checkpoints.setdefault(checkpoint.name, []).append(staged)
        return record

    def __bool__(self) -> bool:
        return self.metrics_end > 0 or bool(self.checkpoints)

    def reconcile(self, client: Any, run_id: str, send_metrics: Callable[[list[RecordedValue]], None],
                  upload: Callable[[Path, str], None]) -> tuple[int, int]:
        """Sends what the run lacks; returns (metric values, checkpoints) sent."""
        recorded = read_record(self.run_dir / METRICS_RECORD, self.metrics_end)
        missing = missing_values(recorded, lambda key: client.get_metric_history(run_id, key))
        for start in range(0, len(missing), 1000):
            send_metrics(missing[start:start + 1000])
        uploaded = 0
        if self.checkpoints:
            logged = {Path(a.path).name for a in client.list_artifacts(run_id, CHECKPOINT_ARTIFACTS) if a.is_dir}
            for name, copies in sorted(self.checkpoints.items()):
                existing = [c for c in copies if c.is_dir()]
                if existing:
                    newest = existing[-1]
                    artifact_dir = f"{CHECKPOINT_ARTIFACTS}/{name}"
                    listed = ({Path(a.path).name: a.file_size for a in client.list_artifacts(run_id, artifact_dir)}
                              if name in logged else {})
                    if not is_delivered(newest, listed):
                        upload(newest, artifact_dir)
                        uploaded += 1
                for copy in copies:  # delivered: the staged copies are done with
                    if copy.parent.name == UPLOAD_STAGING:
                        shutil.rmtree(copy, ignore_errors=True)
        return len(missing), uploaded

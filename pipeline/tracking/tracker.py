"""Experiment tracking behind one small interface.

The training loop only ever calls the methods of `Tracker`. The run directory always gets a
plain-file record (params.json, metrics.jsonl, tags.json); MLflow (pipeline/tracking/mlflow_sink.py)
plugs in as another Tracker through `MultiTracker`, after the run directory, so metrics.jsonl
has every value before MLflow is asked for it (pipeline/tracking/reconcile.py relies on that).
Only rank 0 tracks: other ranks get `NullTracker`. Params and tags are redacted
(pipeline/redaction.py) before they are written anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol

from pipeline.redaction import redact_mapping, redact_value
from pipeline.tracking.mlflow_sink import MlflowTracker
from pipeline.tracking.params import flatten
from pipeline.tracking.settings import TrackingConfig


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_checkpoint(self, checkpoint: Path | str) -> None: ...  # a complete checkpoint was written
    def log_model(self, checkpoint: Path | str) -> None: ...  # the trained model (end of stage 2)
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    def log_params(self, params: dict[str, Any]) -> None: pass
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: pass
    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None: pass
    def set_tags(self, tags: dict[str, str]) -> None: pass
    def log_checkpoint(self, checkpoint: Path | str) -> None: pass
    def log_model(self, checkpoint: Path | str) -> None: pass
    def finish(self, status: str = "FINISHED") -> None: pass


class RunDirectoryTracker:
    """Appends metrics as JSON lines in the run directory (flushed at once, fsynced at every
    checkpoint: the record MLflow is completed from after a crash); artifacts already live there."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes()[-1:] == b"\n"
        self.metrics_file = path.open("a")
        if torn:  # a process died while writing its last line: the next row starts a line of its own
            self.metrics_file.write("\n")

    def log_params(self, params: dict[str, Any]) -> None:
        (self.run_dir / "params.json").write_text(json.dumps(flatten(redact_mapping(params)), indent=1, default=str))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics_file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.metrics_file.flush()

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        pass  # written into the run directory by the caller

    def set_tags(self, tags: dict[str, str]) -> None:
        path = self.run_dir / "tags.json"
        existing = json.loads(path.read_text()) if path.exists() else {}
        tags = {key: redact_value(value) for key, value in tags.items()}
        path.write_text(json.dumps({**existing, **tags}, indent=1))

    def log_checkpoint(self, checkpoint: Path | str) -> None:
        # The checkpoint is in the run directory already; the values logged before it reach
        # the disk with it (os.fsync only: this may run on an upload thread).
        try:
            os.fsync(self.metrics_file.fileno())
        except (OSError, ValueError):  # closed, or a filesystem without fsync
            pass

    def log_model(self, checkpoint: Path | str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        self.set_tags({"status": status})
        self.metrics_file.close()


class MultiTracker:
    """Forwards every call to several trackers."""

    def __init__(self, *trackers: Tracker):
        self.trackers = trackers

    def log_params(self, params: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step)

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        for tracker in self.trackers:
            tracker.log_artifact(path, artifact_dir)

    def set_tags(self, tags: dict[str, str]) -> None:
        for tracker in self.trackers:
            tracker.set_tags(tags)

    def log_checkpoint(self, checkpoint: Path | str) -> None:
        for tracker in self.trackers:
            tracker.log_checkpoint(checkpoint)

    def log_model(self, checkpoint: Path | str) -> None:
        for tracker in self.trackers:
            tracker.log_model(checkpoint)

    def finish(self, status: str = "FINISHED") -> None:
        for tracker in self.trackers:
            tracker.finish(status)


def default_tracker(settings: TrackingConfig, run_dir: Path, name: str, checkpoint_dir: Path | str) -> Tracker:
    """The run directory's record, plus MLflow unless `tracking.enabled` is false. `name`: the
    experiment's (the MLflow run's name); `checkpoint_dir`: where its checkpoints are written."""
    directory = RunDirectoryTracker(run_dir)
    if not settings.enabled:
        return directory
    return MultiTracker(directory, MlflowTracker.from_settings(settings, run_dir, name, checkpoint_dir))


def git_commit() -> str | None:
    """The commit of the source tree this package runs from: GAPM_GIT_COMMIT (set it when
    building images without .git), else `git rev-parse HEAD` (+ '-dirty'), else None."""
    if os.environ.get("GAPM_GIT_COMMIT"):
        return os.environ["GAPM_GIT_COMMIT"]
    source = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")

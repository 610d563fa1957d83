"""Experiment tracking behind one small interface.

The training loop only ever calls the five methods of `Tracker`. The run directory always
gets a plain-file record (params.json, metrics.jsonl); MLflow plugs in as another Tracker.
Only rank 0 tracks: other ranks get `NullTracker`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    def log_params(self, params: dict[str, Any]) -> None: pass
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: pass
    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None: pass
    def set_tags(self, tags: dict[str, str]) -> None: pass
    def finish(self, status: str = "FINISHED") -> None: pass


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the shape trackers want for params."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class RunDirectoryTracker:
    """Appends metrics as JSON lines in the run directory; artifacts already live there."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a")

    def log_params(self, params: dict[str, Any]) -> None:
        (self.run_dir / "params.json").write_text(json.dumps(flatten(params), indent=1, default=str))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics_file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.metrics_file.flush()

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        pass  # written into the run directory by the caller

    def set_tags(self, tags: dict[str, str]) -> None:
        path = self.run_dir / "tags.json"
        existing = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**existing, **tags}, indent=1))

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

    def finish(self, status: str = "FINISHED") -> None:
        for tracker in self.trackers:
            tracker.finish(status)

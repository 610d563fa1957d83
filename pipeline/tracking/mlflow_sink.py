"""MLflow as a `Tracker`: params, tags, metrics, pictures, checkpoints and the trained model.

Where: the server named by MLFLOW_TRACKING_URI, else the embedded default, a sqlite store in
the run directory (sqlite:///<run_dir>/mlflow.db, artifacts in <run_dir>/mlartifacts), which
the model registry works on too. The experiment is `tracking.experiment`, by default the
config's `name`; the run is named after the config's `name`.

One MLflow run per run directory, both stages in it: stage 2 only means something together
with the stage-1 autoencoder it maps into, the step counter runs on across both stages, and
the final checkpoint (the registered model) holds both. Metric keys say the stage
(`stage1/...`, `stage2/...`) and the tag `stage` says which one is in progress. The run id is
kept in <run_dir>/mlflow_run_id, so a resumed training continues the same run.

Tracking never stops or slows training. Every MLflow call runs on one background thread, in
order; the training loop only appends to in-memory queues. When MLflow is unreachable the
thread warns once per outage, keeps metrics (up to `max_buffered_metrics`, oldest dropped
first) and the other calls, and retries with a growing interval; when the server is back
everything queued is delivered into the same run. HTTP retries inside MLflow are kept short
(MLFLOW_HTTP_REQUEST_MAX_RETRIES=0, MLFLOW_HTTP_REQUEST_TIMEOUT=10 unless already set) so an
outage is noticed in seconds, not minutes. `finish` waits for delivery up to
`finish_timeout_s` while MLflow is unreachable; whatever is still undelivered is named in a
warning — the run directory keeps the full record either way.
"""

from __future__ import annotations

import atexit
import collections
import getpass
import itertools
import logging
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pipeline.tracking.tracker import flatten, mask_secret_value, mask_secrets

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
EMBEDDED_DB, EMBEDDED_ARTIFACTS = "mlflow.db", "mlartifacts"
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # batch logs: no progress bars
LATEST_CHECKPOINT_TAG = "gapm.latest_checkpoint"
UPLOAD_STAGING = ".mlflow-upload"  # in the run directory: checkpoints waiting to be uploaded
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH = 1000, 100
FAILURES_BEFORE_DROPPING = 3  # a call that fails while the server answers other calls


def resolve_tracking_uri(run_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None for the server's)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    run_dir = Path(run_dir).resolve()
    return f"sqlite:///{run_dir / EMBEDDED_DB}", (run_dir / EMBEDDED_ARTIFACTS).as_uri()


def prepare_embedded_store(db_path: Path, artifact_root: str) -> None:
    """Creating a sqlite store runs MLflow's ~100 schema migrations (5-10 s on a small CPU) —
    once per MLflow version here: later run directories get a copy of an empty, migrated store.
    On any problem MLflow simply creates the store itself."""
    if db_path.exists():
        return
    try:
        import mlflow

        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gapm"
        template = cache / f"mlflow-{mlflow.__version__}-empty.db"
        if not template.exists():
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            cache.mkdir(parents=True, exist_ok=True)
            staging = cache / f".{template.name}.{os.getpid()}.tmp"
            store = SqlAlchemyStore(f"sqlite:///{staging}", default_artifact_root=artifact_root)
            store.engine.dispose()
            os.replace(staging, template)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        staging = db_path.with_name(f".{db_path.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, staging)
        with sqlite3.connect(staging) as connection:  # the Default experiment: this run's store
            connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                               (f"{artifact_root}/0",))
        connection.close()
        os.replace(staging, db_path)
    except Exception as error:  # noqa: BLE001 - an optimisation only
        log.debug("no template MLflow store (%s); MLflow creates %s itself", error, db_path)


def is_transient(error: BaseException) -> bool:
    """Worth retrying later (server down, restarting, overloaded) rather than a bad request."""
    if isinstance(error, FileNotFoundError):
        return False
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        MlflowException = ()  # type: ignore[assignment]  # noqa: N806
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    if isinstance(error, (OSError, ConnectionError, TimeoutError)):  # includes requests' errors
        return True
    return type(error).__name__ in ("OperationalError", "EndpointConnectionError", "ConnectTimeoutError",
                                    "ReadTimeoutError", "ConnectionClosedError")


@dataclass
class _Call:
    what: str  # named in warnings
    run: Callable[[], None]
    after: int  # metric values numbered below this were logged before the call: send them first
    failures: int = 0


@dataclass
class _Outbox:
    calls: collections.deque = field(default_factory=collections.deque)
    metrics: collections.deque = field(default_factory=collections.deque)  # (number, key, value, ms, step)
    next_number: int = 0
    dropped_metrics: int = 0


class MlflowTracker:
    """Satisfies pipeline.tracking.tracker.Tracker; see the module docstring."""

    def __init__(self, run_dir: Path, experiment_name: str, *, run_name: str | None = None,
                 tracking_uri: str | None = None, registered_model_name: str | None = None,
                 register_model: bool = True,
                 log_checkpoints: bool = True, system_metrics: bool = True,
                 retry_interval_s: float = 5.0, max_retry_interval_s: float = 60.0,
                 max_buffered_metrics: int = 100_000, finish_timeout_s: float = 30.0):
        self.run_dir = Path(run_dir)
        self.experiment_name = experiment_name
        self.run_name = run_name or experiment_name
        default_uri, self.artifact_location = resolve_tracking_uri(self.run_dir)
        self.tracking_uri = tracking_uri or default_uri
        if tracking_uri and tracking_uri != default_uri:
            self.artifact_location = None
        self.registered_model_name = registered_model_name or f"gapm-{self.run_name}"
        self.register_model = register_model
        self.log_checkpoints = log_checkpoints
        self.system_metrics = system_metrics
        self.retry_interval_s, self.max_retry_interval_s = retry_interval_s, max_retry_interval_s
        self.max_buffered_metrics = max_buffered_metrics
        self.finish_timeout_s = finish_timeout_s
        for name, value in HTTP_SETTINGS.items():
            os.environ.setdefault(name, value)

        self.run_id: str | None = None
        self.resumed = False
        self._client: Any = None
        self._monitor: Any = None
        self._outbox = _Outbox()
        self._lock = threading.Condition()
        self._closing = False
        self._finished = False
        self._disabled = False
        self._outage = False
        self._next_attempt = 0.0
        self._backoff = retry_interval_s
        self._close_deadline = float("inf")
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()
        # A training that dies with an exception never calls finish: mark its run FAILED and
        # deliver what is queued (briefly) rather than leave it RUNNING forever.
        atexit.register(self._at_exit)

    @classmethod
    def from_config(cls, config: ExperimentConfig, run_dir: Path) -> "MlflowTracker":
        t = config.tracking
        return cls(run_dir, t.experiment or config.name, run_name=config.name,
                   registered_model_name=t.registered_model_name, register_model=t.register_model,
                   log_checkpoints=t.log_checkpoints, system_metrics=t.system_metrics)

    # ---- the Tracker interface: called by the training loop, never blocks on MLflow ----

    def log_params(self, params: dict[str, Any]) -> None:
        masked = mask_secrets(params)
        self._call("params", lambda: self._send_params(masked))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            if self._closing or self._disabled:
                return
            box = self._outbox
            for key, value in metrics.items():
                if len(box.metrics) >= self.max_buffered_metrics:
                    box.metrics.popleft()
                    if box.dropped_metrics == 0:
                        log.warning("MLflow: more than %d metric values waiting; dropping the oldest "
                                    "(metrics.jsonl in the run directory keeps them all)",
                                    self.max_buffered_metrics)
                    box.dropped_metrics += 1
                box.metrics.append((box.next_number, key, float(value), now, int(step)))
                box.next_number += 1
            self._lock.notify_all()

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        path = Path(path)
        self._call(f"artifact {path.name}", lambda: self._upload(path, artifact_dir))

    def set_tags(self, tags: dict[str, str]) -> None:
        tags = {key: str(mask_secret_value(value)) for key, value in tags.items()}
        if tags.get("git_commit"):
            tags["mlflow.source.git.commit"] = tags["git_commit"].removesuffix("-dirty")
        self._call("tags", lambda: self._send_tags(tags))

    def log_checkpoint(self, checkpoint: Path | str) -> None:
        """Uploads the checkpoint directory as artifacts checkpoints/step-XXXXXXXX; a remote
        checkpoint (s3://...) or `log_checkpoints: false` records only its location (tag)."""
        location = str(checkpoint)
        remote = isinstance(checkpoint, str) and "://" in location
        if remote or not self.log_checkpoints:
            self._call("checkpoint location", lambda: self._send_tags({LATEST_CHECKPOINT_TAG: location}))
            return
        path = Path(checkpoint)
        # Uploads run later, in the background; pruning (train.keep_last_checkpoints) may delete
        # the directory first. Hard links keep the files (no copy) until they are uploaded.
        staged = self.run_dir / UPLOAD_STAGING / f"{path.name}-{time.time_ns()}"
        try:
            shutil.copytree(path, staged, copy_function=os.link)
        except OSError:
            staged = path  # no hard links on this filesystem: upload from the original

        def upload() -> None:
            self._upload(staged, f"checkpoints/{path.name}")
            self._send_tags({LATEST_CHECKPOINT_TAG: str(path.resolve())})
            if staged != path:
                shutil.rmtree(staged, ignore_errors=True)

        self._call(f"checkpoint {path.name}", upload)

    def log_model(self, checkpoint: Path | str) -> None:
        """Logs the final checkpoint (directory or s3:// URL) as the run's pyfunc model and
        registers it."""
        self._call("model", lambda: self._send_model(checkpoint))

    def finish(self, status: str = "FINISHED") -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
            if not self._disabled:
                self._outbox.calls.append(_Call(f"run status {status}", lambda: self._terminate(status),
                                                after=self._outbox.next_number))
            self._closing = True
            self._close_deadline = time.monotonic() + self.finish_timeout_s
            self._next_attempt = 0.0
            self._lock.notify_all()
        self._thread.join()
        atexit.unregister(self._at_exit)
        shutil.rmtree(self.run_dir / UPLOAD_STAGING, ignore_errors=True)
        calls, metrics = self.pending()
        if calls or metrics:
            box = self._outbox
            log.warning("MLflow at %s unreachable at the end of training: not delivered to run %s: %d metric "
                        "values and %s. The run directory keeps the full record; once MLflow is back, "
                        "running the same `gapm train` again (resume auto) logs and registers the model.",
                        self.tracking_uri, self.run_id or "(never created)", metrics,
                        ", ".join(c.what for c in box.calls) or "no other calls")

    def _at_exit(self) -> None:
        if self._finished or (self.run_id is None and not any(self.pending())):
            return
        self.finish_timeout_s = min(self.finish_timeout_s, 5.0)
        self.finish("FAILED")

    # ---- for tests and tools ----

    def pending(self) -> tuple[int, int]:
        """(calls, metric values) not yet delivered."""
        with self._lock:
            return len(self._outbox.calls), len(self._outbox.metrics)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Waits until everything logged so far is delivered; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._next_attempt = 0.0
            self._lock.notify_all()
            while self._outbox.calls or self._outbox.metrics:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._disabled or not self._thread.is_alive():
                    return False
                self._lock.wait(min(remaining, 0.1))
        return True

    # ---- the background thread ----

    def _call(self, what: str, run: Callable[[], None]) -> None:
        with self._lock:
            if self._closing or self._disabled:
                return
            self._outbox.calls.append(_Call(what, run, after=self._outbox.next_number))
            self._lock.notify_all()

    def _work(self) -> None:
        while True:
            with self._lock:
                while True:
                    has_work = bool(self._outbox.calls or self._outbox.metrics)
                    if self._closing and (not has_work or self._disabled):
                        return
                    wait = self._next_attempt - time.monotonic()
                    if has_work and wait <= 0:
                        break
                    self._lock.wait(wait if has_work else None)
            if self._deliver():
                continue
            with self._lock:
                if self._closing and time.monotonic() >= self._close_deadline:
                    return
                self._next_attempt = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, self.max_retry_interval_s)
                if self._closing:
                    self._next_attempt = min(self._next_attempt, self._close_deadline)

    def _deliver(self) -> bool:
        """Sends everything queued; False when MLflow is unreachable (retry later)."""
        try:
            if self.run_id is None:
                started = time.monotonic()
                self._start_run()
                log.debug("MLflow: starting the run took %.2f s", time.monotonic() - started)
            self._send_in_order()
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            if not is_transient(error):
                self._disable(error)
                return True
            if not self._outage:
                log.warning("MLflow at %s is unreachable (%s); training goes on, tracking calls are kept "
                            "and retried (metrics: up to %d values)", self.tracking_uri,
                            _short(error), self.max_buffered_metrics)
            self._outage = True
            return False
        if self._outage:
            log.warning("MLflow at %s is reachable again; delivered what was kept during the outage "
                        "to run %s", self.tracking_uri, self.run_id)
            self._outage = False
            self._restart_system_metrics()
        self._backoff = self.retry_interval_s
        return True

    def _send_in_order(self) -> None:
        """Calls and metric values in the order the training loop logged them."""
        while True:
            with self._lock:
                call = self._outbox.calls[0] if self._outbox.calls else None
            self._send_metrics(before=call.after if call else None)
            if call is None:
                return
            started = time.monotonic()
            try:
                call.run()
                log.debug("MLflow: %s took %.2f s", call.what, time.monotonic() - started)
            except Exception as error:  # noqa: BLE001
                if is_transient(error):
                    call.failures += 1
                    if call.failures < FAILURES_BEFORE_DROPPING or not self._server_answers():
                        raise
                log.warning("MLflow: could not log %s to run %s: %s", call.what, self.run_id, _short(error))
            with self._lock:
                self._outbox.calls.popleft()
                self._lock.notify_all()

    def _send_metrics(self, before: int | None) -> None:
        """Sends the queued metric values numbered below `before` (None: all)."""
        from mlflow.entities import Metric

        while True:
            with self._lock:
                batch = [m for m in itertools.islice(self._outbox.metrics, MAX_METRICS_PER_BATCH)
                         if before is None or m[0] < before]
            if not batch:
                return
            try:
                self._client.log_batch(self.run_id, metrics=[Metric(key, value, ms, step)
                                                             for _, key, value, ms, step in batch])
            except Exception as error:  # noqa: BLE001
                if is_transient(error):
                    raise
                log.warning("MLflow: dropped %d metric values that run %s refused: %s", len(batch), self.run_id,
                            _short(error))
            last = batch[-1][0]
            with self._lock:
                while self._outbox.metrics and self._outbox.metrics[0][0] <= last:
                    self._outbox.metrics.popleft()
                self._lock.notify_all()

    def _disable(self, error: BaseException) -> None:
        log.warning("MLflow tracking is off for this run: %s (the run directory keeps the full record)",
                    _short(error))
        with self._lock:
            self._disabled = True
            self._outbox.calls.clear()
            self._outbox.metrics.clear()
            self._lock.notify_all()

    def _server_answers(self) -> bool:
        try:
            self._client.get_run(self.run_id)
            return True
        except Exception:  # noqa: BLE001
            return False

    # ---- MLflow calls (background thread only) ----

    def _start_run(self) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        if self._client is None:
            if self.tracking_uri.startswith("sqlite:///") and self.artifact_location:
                prepare_embedded_store(Path(self.tracking_uri.removeprefix("sqlite:///")),
                                       self.artifact_location)
            registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or self.tracking_uri
            self._client = MlflowClient(self.tracking_uri, registry_uri=registry_uri)
        client = self._client
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(self.experiment_name,
                                                         artifact_location=self.artifact_location)
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = client.get_experiment_by_name(self.experiment_name).experiment_id
        elif experiment.lifecycle_stage == "deleted":
            raise RuntimeError(f"experiment {self.experiment_name!r} is deleted in MLflow at {self.tracking_uri}; "
                               "restore it (mlflow experiments restore) or use another config name")
        else:
            experiment_id = experiment.experiment_id

        id_file = self.run_dir / RUN_ID_FILE
        saved = id_file.read_text().strip() if id_file.is_file() else ""
        if saved:
            try:
                run = client.get_run(saved)
            except MlflowException as error:
                if error.get_http_status_code() >= 500:
                    raise
                run = None
            if run is not None and run.info.lifecycle_stage != "deleted" and run.info.experiment_id == experiment_id:
                client.update_run(saved, status="RUNNING")
                self.run_id, self.resumed = saved, True
                log.info("MLflow: continuing run %s (experiment %s) at %s", saved, self.experiment_name,
                         self.tracking_uri)
            else:
                log.warning("MLflow at %s has no run %s (named in %s) in experiment %s; starting a new run",
                            self.tracking_uri, saved, id_file, self.experiment_name)
        if self.run_id is None:
            tags = {"gapm.run_dir": str(self.run_dir.resolve()), "gapm.registered_model_name":
                    self.registered_model_name, "mlflow.source.name": "gapm train", "mlflow.source.type": "JOB"}
            try:
                tags["mlflow.user"] = getpass.getuser()
            except (KeyError, OSError):
                pass
            run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            self.run_dir.mkdir(parents=True, exist_ok=True)
            staging = id_file.with_name(f".{RUN_ID_FILE}.tmp")
            staging.write_text(self.run_id + "\n")
            os.replace(staging, id_file)
            log.info("MLflow: run %s in experiment %s at %s", self.run_id, self.experiment_name, self.tracking_uri)
        self._start_system_metrics(resume=self.resumed)

    def _start_system_metrics(self, resume: bool) -> None:
        if not self.system_metrics:
            return
        try:
            import psutil  # noqa: F401 - MLflow's monitor needs it
            from mlflow.system_metrics.system_metrics_monitor import (
                SystemMetricsMonitor,
            )

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume,
                                                 tracking_uri=self.tracking_uri)
            self._monitor.start()
        except Exception as error:  # noqa: BLE001 - optional
            log.info("MLflow: no system metrics (%s)", _short(error))
            self._monitor = None

    def _restart_system_metrics(self) -> None:
        # MLflow's monitor thread ends when it cannot reach the server.
        thread = getattr(self._monitor, "_process", None)
        if self._monitor is not None and (thread is None or not thread.is_alive()):
            self._start_system_metrics(resume=True)

    def _send_params(self, params: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        flat = {key: "null" if value is None else str(value) for key, value in flatten(params).items()}
        try:
            self._log_params(flat)
        except MlflowException as error:
            if error.error_code != "INVALID_PARAMETER_VALUE":
                raise
            # A resumed run with a changed config: MLflow params cannot change; keep the first.
            logged = self._client.get_run(self.run_id).data.params
            changed = sorted(key for key, value in flat.items() if key in logged and logged[key] != value)
            self._log_params({key: value for key, value in flat.items() if key not in logged})
            if changed:
                log.warning("MLflow: run %s keeps its first values of the changed config keys %s; "
                            "config.yaml artifact and the run directory have the new ones",
                            self.run_id, ", ".join(changed))
        self._client.log_dict(self.run_id, params, "config.yaml")

    def _log_params(self, flat: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in flat.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])

    def _send_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in tags.items()])

    def _upload(self, path: Path, artifact_dir: str | None) -> None:
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_dir)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_dir)
        else:
            raise FileNotFoundError(f"{path} no longer exists (a pruned checkpoint?)")

    def _send_model(self, checkpoint: Path | str) -> None:
        from pipeline.tracking import registry

        logged = registry.log_model(self._client, self.run_id, checkpoint)
        tags = {"gapm.model_id": logged.model_id}
        if self.register_model:
            version = registry.register_logged_model(self._client, self.registered_model_name, logged)
            tags["gapm.registered_model_version"] = str(version.version)
            log.info("MLflow: registered %s version %s (models:/%s/%s)", self.registered_model_name,
                     version.version, self.registered_model_name, version.version)
        self._send_tags(tags)

    def _terminate(self, status: str) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._client.set_terminated(self.run_id, status)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


__all__ = ["MlflowTracker", "resolve_tracking_uri", "prepare_embedded_store"]

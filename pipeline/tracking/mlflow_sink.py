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

Tracking never stops or slows training: every MLflow call goes through an `Outbox`
(pipeline.tracking.outbox), delivered in order by one background thread that survives
outages and delivers everything into the same run when the server is back. HTTP retries
inside MLflow are kept short (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0, MLFLOW_HTTP_REQUEST_TIMEOUT=10
unless already set) so an outage is noticed in seconds, not minutes. `finish` waits for
delivery up to `finish_timeout_s` while MLflow is unreachable; whatever is still undelivered
is named in a warning — the run directory keeps the full record either way, and the next
start in the run directory delivers it: the first MLflow call of every start completes the
run from the record the earlier processes left (metrics.jsonl, the checkpoints;
pipeline.tracking.reconcile), so a process killed with deliveries pending loses nothing.

Secrets never reach MLflow: params, tags and the config.yaml artifact go through
pipeline.redaction on their way out, and the tracking URI is named redacted.
"""

from __future__ import annotations

import atexit
import getpass
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.tracking.embedded_store import prepare_embedded_store
from pipeline.tracking.outbox import MetricValue, Outbox
from pipeline.tracking.reconcile import (
    UPLOAD_STAGING,
    EarlierRecord,
    RecordedValue,
    stage_checkpoint,
)
from pipeline.redaction import (
    install_log_redaction,
    install_stdout_redaction,
    redact,
    redact_mapping,
)
from pipeline.tracking.params import flatten
from pipeline.tracking.settings import TrackingConfig

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
EMBEDDED_DB, EMBEDDED_ARTIFACTS = "mlflow.db", "mlartifacts"
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # batch logs: no progress bars
                 # stdout is for results: MLflow's "View run ... at: URL" lines become one log line
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
LATEST_CHECKPOINT_TAG = "gapm.latest_checkpoint"
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH = 1000, 100


def resolve_tracking_uri(run_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None for the server's)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    run_dir = Path(run_dir).resolve()
    return f"sqlite:///{run_dir / EMBEDDED_DB}", (run_dir / EMBEDDED_ARTIFACTS).as_uri()


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


class MlflowTracker:
    """Satisfies pipeline.tracking.tracker.Tracker: the MLflow calls of a run, queued in an
    Outbox; see the module docstring."""

    def __init__(self, run_dir: Path, experiment_name: str, *, run_name: str | None = None,
                 tracking_uri: str | None = None, registered_model_name: str | None = None,
                 register_model: bool = True,
                 log_checkpoints: bool = True, system_metrics: bool = True,
                 retry_interval_s: float = 5.0, max_retry_interval_s: float = 60.0,
                 max_buffered_metrics: int = 100_000, finish_timeout_s: float = 30.0,
                 checkpoints_dir: Path | str | None = None):
        """`checkpoints_dir`: the training's local checkpoint directory (default
        <run_dir>/checkpoints), whose checkpoints an earlier process may not have delivered."""
        self.run_dir = Path(run_dir)
        self.experiment_name = experiment_name
        self.run_name = run_name or experiment_name
        default_uri, self.artifact_location = resolve_tracking_uri(self.run_dir)
        self.tracking_uri = tracking_uri or default_uri
        if tracking_uri and tracking_uri != default_uri:
            self.artifact_location = None
        self.name = f"MLflow at {redact(self.tracking_uri)}"
        self.registered_model_name = registered_model_name or f"gapm-{self.run_name}"
        self.register_model = register_model
        self.log_checkpoints = log_checkpoints
        self.system_metrics = system_metrics
        self.finish_timeout_s = finish_timeout_s
        for name, value in HTTP_SETTINGS.items():
            os.environ.setdefault(name, value)
        # Whoever started training: MLflow's log records (and its "View run ... at: URL" lines
        # on stdout, where a user re-enables them) name the tracking URI, which may hold a password.
        install_log_redaction()
        install_stdout_redaction()

        self.run_id: str | None = None
        self.resumed = False
        self._client: Any = None
        self._experiment_id: str | None = None
        self._monitor: Any = None
        self._finished = False
        self._outbox = Outbox(self, retry_interval_s=retry_interval_s, max_retry_interval_s=max_retry_interval_s,
                              max_buffered_metrics=max_buffered_metrics, max_metrics_per_batch=MAX_METRICS_PER_BATCH,
                              thread_name="mlflow-tracker")
        # Before this process logs anything: what the earlier ones left, delivered first.
        checkpoints_dir = str(checkpoints_dir or self.run_dir / "checkpoints")
        uploaded = log_checkpoints and "://" not in checkpoints_dir  # s3:// ones are referenced, not uploaded
        earlier = EarlierRecord.snapshot(self.run_dir, Path(checkpoints_dir) if uploaded else None)
        if earlier:
            self._outbox.add_call("what earlier processes could not deliver", lambda: self._reconcile(earlier))
        # A training that dies with an exception never calls finish: mark its run FAILED and
        # deliver what is queued (briefly) rather than leave it RUNNING forever.
        atexit.register(self._at_exit)

    @classmethod
    def from_settings(cls, settings: TrackingConfig, run_dir: Path, name: str,
                      checkpoint_dir: Path | str) -> "MlflowTracker":
        """The tracker of experiment `name`'s run in `run_dir`, whose checkpoints go to `checkpoint_dir`."""
        return cls(run_dir, settings.experiment or name, run_name=name,
                   registered_model_name=settings.registered_model_name, register_model=settings.register_model,
                   log_checkpoints=settings.log_checkpoints, system_metrics=settings.system_metrics,
                   checkpoints_dir=checkpoint_dir)

    # ---- the Tracker interface: called by the training loop, never blocks on MLflow ----

    def log_params(self, params: dict[str, Any]) -> None:
        masked = redact_mapping(params)
        self._outbox.add_call("params", lambda: self._send_params(masked))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._outbox.add_metrics(metrics, step)

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        path = Path(path)
        self._outbox.add_call(f"artifact {path.name}", lambda: self._upload(path, artifact_dir))

    def set_tags(self, tags: dict[str, str]) -> None:
        tags = {key: redact(str(value)) for key, value in tags.items()}
        if tags.get("git_commit"):
            tags["mlflow.source.git.commit"] = tags["git_commit"].removesuffix("-dirty")
        self._outbox.add_call("tags", lambda: self._send_tags(tags))

    def log_checkpoint(self, checkpoint: Path | str) -> None:
        """Uploads the checkpoint directory as artifacts checkpoints/step-XXXXXXXX; a remote
        checkpoint (s3://...) or `log_checkpoints: false` records only its location (tag)."""
        location = str(checkpoint)
        remote = isinstance(checkpoint, str) and "://" in location
        if remote or not self.log_checkpoints:
            self._outbox.add_call("checkpoint location", lambda: self._send_tags({LATEST_CHECKPOINT_TAG: location}))
            return
        path = Path(checkpoint)
        # Uploads run later, in the background; pruning (train.keep_last_checkpoints) may delete
        # the directory first. Hard links keep the files (no copy) until they are uploaded, and
        # the next start uploads them if this process dies first (pipeline.tracking.reconcile).
        staged = stage_checkpoint(path, self.run_dir / UPLOAD_STAGING) or path  # else: no hard links

        def upload() -> None:
            self._upload(staged, f"checkpoints/{path.name}")
            self._send_tags({LATEST_CHECKPOINT_TAG: str(path.resolve())})
            if staged != path:
                shutil.rmtree(staged, ignore_errors=True)

        self._outbox.add_call(f"checkpoint {path.name}", upload)

    def log_model(self, checkpoint: Path | str) -> None:
        """Logs the final checkpoint (directory or s3:// URL) as the run's pyfunc model and
        registers it."""
        self._outbox.add_call("model", lambda: self._send_model(checkpoint))

    def finish(self, status: str = "FINISHED") -> None:
        if self._finished:
            return
        self._finished = True
        self._outbox.add_call(f"run status {status}", lambda: self._terminate(status), final=True)
        self._outbox.close(self.finish_timeout_s)
        atexit.unregister(self._at_exit)
        # Staged checkpoints not uploaded stay in the run directory for the next start.
        calls, metrics = self.pending()
        if calls or metrics:
            log.warning("%s unreachable at the end of training: not delivered to run %s: %d metric "
                        "values and %s. The run directory keeps the full record; once MLflow is back, "
                        "running the same `gapm train` again (resume auto) delivers it all and logs and "
                        "registers the model.", self.name, self.run_id or "(never created)", metrics,
                        ", ".join(c.what for c in self._outbox.calls) or "no other calls")

    def _at_exit(self) -> None:
        if self._finished or (self.run_id is None and not any(self.pending())):
            return
        self.finish_timeout_s = min(self.finish_timeout_s, 5.0)
        self.finish("FAILED")

    # ---- for tests and tools ----

    def pending(self) -> tuple[int, int]:
        """(calls, metric values) not yet delivered."""
        return self._outbox.pending()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Waits until everything logged so far is delivered; False on timeout."""
        return self._outbox.flush(timeout_s)

    # ---- the Sink side of the outbox (background thread only) ----

    def connect(self) -> None:
        if self.run_id is None:
            started = time.monotonic()
            self._start_run()
            log.debug("MLflow: starting the run took %.2f s", time.monotonic() - started)

    def send_metrics(self, values: list[MetricValue]) -> None:
        from mlflow.entities import Metric

        self._client.log_batch(self.run_id, metrics=[Metric(key, value, ms, step) for _, key, value, ms, step in values])

    def answers(self) -> bool:
        try:
            self._client.get_run(self.run_id)
            return True
        except Exception:  # noqa: BLE001
            return False

    def reconnected(self) -> None:
        self._restart_system_metrics()

    def is_transient(self, error: BaseException) -> bool:
        return is_transient(error)

    def describe(self, error: BaseException) -> str:
        return _short(error)

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
            raise RuntimeError(f"experiment {self.experiment_name!r} is deleted in {self.name}; "
                               "restore it (mlflow experiments restore) or use another config name")
        else:
            experiment_id = experiment.experiment_id

        self._experiment_id = experiment_id
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
                         redact(self.tracking_uri))
            else:
                log.warning("%s has no run %s (named in %s) in experiment %s; starting a new run",
                            self.name, saved, id_file, self.experiment_name)
        if self.run_id is None:
            tags = {"gapm.run_dir": redact(str(self.run_dir.resolve())), "gapm.registered_model_name":
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
            log.info("MLflow: run %s in experiment %s at %s", self.run_id, self.experiment_name,
                     redact(self.tracking_uri))
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

        flat = {key: "null" if value is None else str(value) for key, value in flatten(redact_mapping(params)).items()}
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
        self._client.log_dict(self.run_id, redact_mapping(params), "config.yaml")

    def _log_params(self, flat: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, redact(value)) for key, value in flat.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])

    def _send_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(key, redact(str(value))) for key, value in tags.items()])

    def _upload(self, path: Path, artifact_dir: str | None) -> None:
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_dir)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_dir)
        else:
            raise FileNotFoundError(f"{path} no longer exists (a pruned checkpoint?)")

    def _send_model(self, checkpoint: Path | str) -> None:
        from pipeline.tracking import registry  # deferred: it imports MLflow, which untracked runs never load

        logged = registry.log_model(self._client, self.run_id, checkpoint)
        tags = {"gapm.model_id": logged.model_id}
        if self.register_model:
            version, created = registry.ensure_registered(self._client, self.registered_model_name, logged)
            tags["gapm.registered_model_version"] = str(version.version)
            log.info("MLflow: %s %s version %s (models:/%s/%s)", "registered" if created else "already registered as",
                     self.registered_model_name, version.version, self.registered_model_name, version.version)
        self._send_tags(tags)

    def _reconcile(self, earlier: EarlierRecord) -> None:
        """Completes the run from the record of the processes before this one."""
        def send(values: list[RecordedValue]) -> None:
            self.send_metrics([(0, key, value, milliseconds, step) for key, value, milliseconds, step in values])

        started = time.monotonic()
        values, checkpoints = earlier.reconcile(self._client, self.run_id, send, self._upload)
        if values or checkpoints:
            log.info("MLflow: delivered to run %s what earlier processes could not: %d metric values, "
                     "%d checkpoints (%.1f s)", self.run_id, values, checkpoints, time.monotonic() - started)

    def _terminate(self, status: str) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._client.set_terminated(self.run_id, status)
        if self.tracking_uri.startswith(("http://", "https://")):  # where MLflow would print it
            experiment_url = f"{self.tracking_uri.rstrip('/')}/#/experiments/{self._experiment_id}"
            log.info("MLflow: view run %s at %s/runs/%s (experiment: %s)", self.run_name,
                     redact(experiment_url), self.run_id, redact(experiment_url))


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


__all__ = ["MlflowTracker", "resolve_tracking_uri", "prepare_embedded_store"]

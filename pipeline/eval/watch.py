"""`gapm eval-watch`, the scheduled evaluation job: every pass lists the gapm runs in MLflow,
their checkpoints (local, s3:// or run artifacts), scores each one that has no result for the
current reference — claiming it first, so that several jobs never score the same checkpoint —
and moves the registry alias (`eval.champion_alias`) to the best comparable score.

Only checkpoints that can generate are scored, and only their scores compete for the alias: a
method samples through every stage it trains (GAPM draws its latent codes from the latent
generator g, which its last stage, stage 2, trains), so a checkpoint counts when it was saved in
the method's last stage (meta `stage == len(stages)`) after at least one step of it
(`stage_step > 0`). Judged per run from its newest checkpoint, whose meta gives the step where
the last stage began (`step - stage_step`): GAPM's stage-1 checkpoints, including the one that
ends stage 1, are left out; a baseline has one stage, so every checkpoint counts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gapm import Method, is_image_shape
from gapm.methods import method_class
from pipeline import checkpoints
from pipeline.data import storage
from pipeline.data.settings import DataConfig
from pipeline.eval import fid
from pipeline.eval.claims import DEFAULT_TTL_S, ClaimStore
from pipeline.eval.mlflow_runs import (
    CHECKPOINT_ARTIFACTS,
    RunSettings,
    download_checkpoint,
    logged_run_settings,
    mlflow_client,
    parse_result_tag,
    publish,
    result_tag,
)
from pipeline.eval.scoring import (
    EvalError,
    Reference,
    RunMismatch,
    distributed_ranks,
    evaluate_model,
    image_reference,
    point_reference,
    result_record,
)
from pipeline.eval.settings import EvalConfig, EvalSettings
from pipeline.stopping import StopRequest
from pipeline.tracking import registry
from pipeline.tracking.mlflow_sink import LATEST_CHECKPOINT_TAG

log = logging.getLogger(__name__)

CLAIMS_ENV = "GAPM_EVAL_CLAIMS"
CHAMPION_WAIT_S = 120.0
VERSION_SCORE_TAG, VERSION_REFERENCE_TAG = "gapm.eval.score", "gapm.eval.reference"


@dataclass
class Candidate:
    run: Any  # mlflow Run
    step: int
    sources: list[str]  # where the checkpoint can be read, best first

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


@dataclass
class PassSummary:
    evaluated: list[dict[str, Any]] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # claimed by another job
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    champions: dict[str, str] = field(default_factory=dict)  # model name -> "version N (moved)" / "(kept)"

    @property
    def did_nothing(self) -> bool:
        return not self.evaluated and not any(c.endswith("(moved)") for c in self.champions.values())


@dataclass
class WatchOptions:
    experiments: list[str] | None  # MLflow experiment names; None: all
    claims: str
    run_names: list[str] | None = None  # only runs of these config names (None: every gapm run)
    tracking_uri: str | None = None
    alias: str = EvalConfig.champion_alias
    claim_ttl_s: float = DEFAULT_TTL_S
    max_evaluations: int | None = None
    data: DataConfig | None = None  # from --config: for runs without a logged config.yaml
    data_seed: int | None = None


def registered_name(run: Any, client: Any) -> str:
    name = run.data.tags.get(registry.REGISTERED_NAME_TAG)
    return name or registry.default_model_name(run.info.run_name)


def gapm_runs(client: Any, experiments: list[str] | None, run_names: list[str] | None = None) -> list[Any]:
    """Active runs written by `gapm train` in the named experiments (all when None), only
    those named `run_names` (the config names) when given."""
    from mlflow.entities import ViewType

    if experiments:
        found = []
        for name in experiments:
            experiment = client.get_experiment_by_name(name)
            if experiment is None or experiment.lifecycle_stage != "active":
                log.info("MLflow has no experiment %r yet: nothing to evaluate there", name)
                continue
            found.append(experiment.experiment_id)
        experiment_ids = found
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    runs, token = [], None
    while experiment_ids:
        page = client.search_runs(experiment_ids, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(run for run in page if registry.REGISTERED_NAME_TAG in run.data.tags
                    and (run_names is None or run.info.run_name in run_names))
        token = page.token
        if not token:
            break
    return runs


def checkpoints_of_run(client: Any, run: Any) -> dict[int, list[str]]:
    """step -> places to read the checkpoint from: a local or s3:// copy where the run's
    checkpoints live (tag gapm.latest_checkpoint), then the run's artifacts."""
    found: dict[int, list[str]] = {}
    latest = run.data.tags.get(LATEST_CHECKPOINT_TAG)
    if latest:
        directory = latest.rstrip("/").rsplit("/", 1)[0]
        try:
            if checkpoints.is_remote(directory) or Path(directory).is_dir():
                for location in checkpoints.Checkpointer.at(directory).list():
                    step = _step_of(checkpoints.checkpoint_basename(location))
                    if step is not None:
                        found.setdefault(step, []).append(str(location))
        except storage.StorageError as error:
            log.warning("run %s: cannot list checkpoints in %s (%s)", run.info.run_id, directory, error)
    run_id = run.info.run_id
    for entry in client.list_artifacts(run_id, CHECKPOINT_ARTIFACTS):
        step = _step_of(entry.path.rsplit("/", 1)[-1])
        if not entry.is_dir or step is None:
            continue
        names = {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(run_id, entry.path) if not f.is_dir}
        if {checkpoints.META_FILE, checkpoints.MODEL_FILE} <= names:  # else: still uploading
            found.setdefault(step, []).append(f"runs:/{run_id}/{entry.path}")
    return found


def first_generating_step(meta: checkpoints.CheckpointMeta) -> int | None:
    """The first training step whose checkpoint can generate, from a run's newest checkpoint
    (see the module docstring); None while the run has not done a step of its last stage."""
    stages = len(method_class(meta.model_kind).stages)
    if meta.stage < stages or meta.stage_step < 1:
        return None
    return meta.step - meta.stage_step + 1


def _step_of(name: str) -> int | None:
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def read_candidate_meta(client: Any, candidate: Candidate) -> checkpoints.CheckpointMeta:
    source = candidate.sources[0]
    if source.startswith("runs:/"):
        with tempfile.TemporaryDirectory() as scratch:
            path = client.download_artifacts(candidate.run_id, f"{source.split('/', 2)[2]}/{checkpoints.META_FILE}",
                                             scratch)
            return checkpoints.read_meta(Path(path).parent)
    return checkpoints.read_meta(source if checkpoints.is_remote(source) else Path(source))


def load_candidate(client: Any, candidate: Candidate, scratch: str) -> tuple[Method, str, Path | None]:
    """(model, the source used, a local directory with its files — for registering)."""
    errors = []
    for source in candidate.sources:
        try:
            if source.startswith("runs:/"):
                local = download_checkpoint(client, candidate.run_id, source.split("/", 2)[2], scratch)
                return checkpoints.load_model(local)[0], source, local
            location = source if checkpoints.is_remote(source) else Path(source)
            model = checkpoints.load_model(location)[0]
            return model, source, None if checkpoints.is_remote(source) else Path(source)
        except Exception as error:  # noqa: BLE001 - try the next copy
            errors.append(f"{source}: {error}")
    raise EvalError(f"run {candidate.run_id} step {candidate.step}: no readable copy ({'; '.join(errors)})")


class Watcher:
    """One eval-watch process: evaluation passes over MLflow, claims, champion moves."""

    def __init__(self, settings: EvalSettings, options: WatchOptions):
        self.settings, self.options = settings, options
        self.client = mlflow_client(options.tracking_uri)
        self.claims = ClaimStore(options.claims, ttl_s=options.claim_ttl_s)
        self.ranks = distributed_ranks(settings.device)
        if self.ranks.world > 1:
            raise EvalError("eval-watch runs as one process (launch several copies to share the work; "
                            "`gapm eval` splits one evaluation across processes)")
        self._image_reference: Reference | None = None
        self._run_settings: dict[str, RunSettings | None] = {}  # by run id: each run's config read once

    def image_reference(self) -> Reference:
        if self._image_reference is None:
            self._image_reference = image_reference(self.settings, self.ranks.device)
        return self._image_reference

    def run_data(self, run: Any) -> tuple[DataConfig, int]:
        """The data settings the run was trained with (its logged config.yaml); the --config's
        only for a run without one; --test-data wins."""
        run_id = run.info.run_id
        if run_id not in self._run_settings:
            self._run_settings[run_id] = logged_run_settings(self.client, run_id)
        trained = self._run_settings[run_id]
        if trained is not None or self.options.data is None:
            trained = trained or RunSettings()
            data, seed = dataclasses.replace(trained.data), trained.seed
        else:
            data, seed = dataclasses.replace(self.options.data), self.options.data_seed or 0
        if self.settings.test_data:
            data.test = self.settings.test_data
        return data, seed

    def reference_for(self, run: Any, meta: checkpoints.CheckpointMeta) -> Reference:
        shape = meta.model_shape["data_shape"]
        if is_image_shape(shape):
            reference = self.image_reference()
            expected = reference.stats.image_shape
            if expected and list(shape[1:]) != list(expected[1:]):
                raise RunMismatch(f"run {run.info.run_id} generates {shape} images, the statistics "
                                f"{self.settings.stats} are of {expected} images")
            return reference
        data, seed = self.run_data(run)
        return point_reference(data, seed, self.settings.samples)

    def run_once(self) -> PassSummary:
        summary = PassSummary()
        try:
            runs = gapm_runs(self.client, self.options.experiments, self.options.run_names)
        except Exception as error:  # noqa: BLE001 - one clear line, not a stack trace
            if isinstance(error, (EvalError, fid.FidError)):
                raise
            raise EvalError(f"cannot list runs in MLflow at {self.client.tracking_uri} ({str(error).splitlines()[0][:300]}); "
                            "check MLFLOW_TRACKING_URI and that the server is running") from None
        log.info("%d gapm run(s) in %s at %s", len(runs), ", ".join(self.options.experiments or ["all experiments"]),
                 self.client.tracking_uri)
        work: list[tuple[Candidate, Reference]] = []
        names: dict[str, set[str]] = {}  # registered model -> reference keys seen
        generating_from: dict[str, int] = {}  # run id -> first step whose checkpoint can generate
        for run in runs:
            try:
                found = checkpoints_of_run(self.client, run)
                if not found:
                    continue
                meta = read_candidate_meta(self.client, Candidate(run, max(found), found[max(found)]))
                first = first_generating_step(meta)
            except Exception as error:  # noqa: BLE001 - one broken run must not stop the others
                log.warning("skipping run %s: %s", run.info.run_id, error)
                summary.failed.append(f"{run.info.run_id}: {error}")
                continue
            try:  # errors of the job's own settings (statistics, extractor) stop the pass
                reference = self.reference_for(run, meta)
            except RunMismatch as error:
                log.warning("skipping run %s: %s", run.info.run_id, error)
                summary.skipped.append(f"{run.info.run_id}: {error}")
                continue
            log.info("run %s: checkpoints at steps %s", run.info.run_id, sorted(found))
            if first is None:
                log.info("run %s: nothing to score yet: its newest checkpoint (step %d, stage %d) precedes a step of "
                         "its last stage (GAPM: the latent generator is untrained)", run.info.run_id, meta.step,
                         meta.stage)
                continue
            if min(found) < first:
                log.info("run %s: scoring the checkpoints from step %d on; those before precede a step of its last "
                         "stage (GAPM: the latent generator is untrained)", run.info.run_id, first)
            generating_from[run.info.run_id] = first
            names.setdefault(registered_name(run, self.client), set()).add(reference.key)
            for step, locations in found.items():
                if step >= first and result_tag(reference.key, step) not in run.data.tags:
                    work.append((Candidate(run, step, locations), reference))
        work.sort(key=lambda item: item[0].step, reverse=True)  # newest first
        for candidate, reference in work:
            if self.options.max_evaluations is not None and len(summary.evaluated) >= self.options.max_evaluations:
                break
            self.evaluate_candidate(candidate, reference, summary)
        for name, keys in names.items():
            for key in keys:
                try:
                    summary.champions[name] = self.promote_champion(name, key, runs, generating_from)
                except Exception as error:  # noqa: BLE001
                    log.warning("could not update %s@%s: %s", name, self.options.alias, error)
                    summary.failed.append(f"champion {name}: {error}")
        return summary

    def evaluate_candidate(self, candidate: Candidate, reference: Reference, summary: PassSummary) -> None:
        label = f"run {candidate.run_id} {checkpoints.checkpoint_name(candidate.step)}"
        claim = self.claims.try_acquire(f"{candidate.run_id}/{reference.key}/{checkpoints.checkpoint_name(candidate.step)}")
        if claim is None:
            log.info("%s: another job is evaluating it", label)
            summary.busy.append(label)
            return
        with claim:
            try:
                if result_tag(reference.key, candidate.step) in self.client.get_run(candidate.run_id).data.tags:
                    log.info("%s: evaluated meanwhile by another job", label)
                    summary.busy.append(label)
                    return
                started = time.perf_counter()
                with tempfile.TemporaryDirectory() as scratch:
                    model, source, _ = load_candidate(self.client, candidate, scratch)
                data, seed = self.run_data(candidate.run)
                log.info("%s: evaluating (%s)", label, reference.description)
                metrics, _ = evaluate_model(model, self.settings, data=data, data_seed=seed, ranks=self.ranks,
                                            reference=reference)
                record = result_record(model, metrics, reference, self.settings, candidate.step, source,
                                       time.perf_counter() - started)
                publish(self.client, candidate.run_id, candidate.step, metrics, record)
                record["run_id"] = candidate.run_id
                summary.evaluated.append(record)
                log.info("%s: %s = %.6g", label, record["score_metric"], record["score"])
            except Exception as error:  # noqa: BLE001 - the next pass tries again
                log.error("%s: evaluation failed: %s", label, error)
                summary.failed.append(f"{label}: {error}")

    def promote_champion(self, name: str, reference_key: str, runs: list[Any],
                         generating_from: dict[str, int]) -> str:
        """Points the alias at the model version of the best comparable score among checkpoints
        that can generate (`generating_from`: run id -> first such step; a `gapm eval` of an
        earlier checkpoint does not compete); registers the checkpoint's model first if needed.
        Serialised by a claim so that two jobs finishing at once cannot leave the alias on the
        worse of their results. Returns "version N (moved)", or "(kept)" when the alias stays."""
        from mlflow.exceptions import MlflowException

        claim = self.claims.acquire(f"champion/{name}", wait_s=CHAMPION_WAIT_S)
        if claim is None:
            raise EvalError(f"another job holds the champion claim of {name} for over {CHAMPION_WAIT_S:.0f}s")
        with claim:
            best = None
            for run in runs:  # fresh tags: results other jobs published meanwhile count too
                first = generating_from.get(run.info.run_id)
                if first is None or registered_name(run, self.client) != name:
                    continue
                for key, value in self.client.get_run(run.info.run_id).data.tags.items():
                    step = parse_result_tag(key, reference_key)
                    if step is None or step < first:
                        continue
                    record = {**json.loads(value), "run_id": run.info.run_id}
                    if best is None or (record["score"], -record["step"]) < (best["score"], -best["step"]):
                        best = record
            if best is None:
                return "no scores yet"
            try:
                current = self.client.get_model_version_by_alias(name, self.options.alias)
            except MlflowException:
                current = None
            if current is not None and current.tags.get(VERSION_REFERENCE_TAG) == reference_key:
                same = (current.run_id == best["run_id"]
                        and current.tags.get(registry.CHECKPOINT_STEP_TAG) == str(best["step"]))
                if same or float(current.tags.get(VERSION_SCORE_TAG, "inf")) <= best["score"]:
                    return f"version {current.version} (kept)"
            version = self.model_version_of(name, best)
            for key, value in {VERSION_SCORE_TAG: repr(float(best["score"])), VERSION_REFERENCE_TAG: reference_key,
                               "gapm.eval.metric": best["score_metric"],
                               "gapm.eval.reference_description": best.get("reference_description", "")}.items():
                self.client.set_model_version_tag(name, version.version, key, value)
            if current is not None and str(current.version) == str(version.version):
                # e.g. `gapm register --alias` or other statistics put it there: now scored, not moved
                return f"version {version.version} (kept)"
            self.client.set_registered_model_alias(name, self.options.alias, version.version)
            log.info("models:/%s@%s -> version %s (run %s step %d, %s %.6g)", name, self.options.alias,
                     version.version, best["run_id"], best["step"], best["score_metric"], best["score"])
            return f"version {version.version} (moved)"

    def model_version_of(self, name: str, record: dict[str, Any]) -> Any:
        run_id, step = record["run_id"], int(record["step"])
        logged = registry.find_logged_model(self.client, run_id, step)
        if logged is None:
            run = self.client.get_run(run_id)
            found = checkpoints_of_run(self.client, run)
            sources = ([record["checkpoint"]] if record.get("checkpoint") else []) + found.get(step, [])
            with tempfile.TemporaryDirectory() as scratch:
                _, _, local = load_candidate(self.client, Candidate(run, step, sources), scratch)
                if local is None:  # an s3:// checkpoint: its two files, verified against meta.json
                    remote = next(s for s in sources if checkpoints.is_remote(s))
                    local = checkpoints.local_copy(remote, str(Path(scratch) / "checkpoint"))
                logged = registry.log_model(self.client, run_id, local)
        return registry.register_logged_model(self.client, name, logged)


def watch(settings: EvalSettings, options: WatchOptions, *, once: bool, interval_s: float,
          report: Callable[[PassSummary], None] | None = None) -> PassSummary:
    """Evaluation passes until SIGTERM/SIGINT (or one pass with `once`)."""
    watcher = Watcher(settings, options)
    signals = () if once else (signal.SIGTERM, signal.SIGINT)
    with StopRequest(signals) as stop:
        while True:
            try:
                summary = watcher.run_once()
            except Exception as error:  # noqa: BLE001 - a watcher outlives a server restart
                if once:
                    raise
                log.error("evaluation pass failed: %s; next pass in %.0fs", error, interval_s)
                summary = PassSummary(failed=[str(error)])
            if report is not None:
                report(summary)
            if once or stop.wait(interval_s):
                return summary

"""`gapm eval`: score one checkpoint or model and publish the result to its MLflow run (the
scheduled job that scores every new checkpoint, `gapm eval-watch`, is pipeline.eval.watch).

Where results go. To the MLflow run the checkpoint belongs to, with the training step as
the metric step (`eval/fid`, `eval/kid`, `eval/test_reconstruction_mse`, ...), together with
one tag per checkpoint and reference, `gapm.eval.<reference>.step-XXXXXXXX`, holding the whole
result as JSON; that tag is the "already evaluated" mark. <reference> is a short hash of what
makes scores comparable (the statistics, their feature extractor, N) — new statistics or a
new N mean everything is scored again, and the champion is chosen among comparable scores
only. Metrics and tag are written in one `log_batch`.

What a score is: pipeline.eval.scoring. `eval-watch` is one process (one GPU is plenty for 50k samples); run several copies to
spread work — claims (pipeline.eval.claims) keep them from doing the same checkpoint twice.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.eval import reference_stats
from pipeline.eval.mlflow_runs import (
    CONFIG_ARTIFACT,
    RunSettings,
    Target,
    load_target,
    logged_run_settings,
    mlflow_client,
    publish,
    read_config_file,
    resolve_target,
    run_settings,
)
from pipeline.eval.scoring import distributed_ranks, evaluate_model, result_record
from pipeline.eval.settings import EvalSettings

log = logging.getLogger(__name__)


def run_stats_directory(settings: RunSettings | None, run_dir: Path | None) -> str:
    """Where the run keeps named statistics: its config's eval.fid_stats_dir, else
    $GAPM_FID_STATS_DIR, else the fid-stats directory next to the run directory (or
    runs/fid-stats when the run directory is unknown)."""
    configured = settings.eval.fid_stats_dir if settings is not None else None
    return reference_stats.stats_directory(configured, run_dir.parent if run_dir is not None else None)


def target_run_settings(target: Target) -> RunSettings | None:
    """The settings the target's run was trained with: config.yaml in its run directory, else
    the config.yaml artifact of its MLflow run; None if neither can be read."""
    if target.run_dir is not None and (target.run_dir / CONFIG_ARTIFACT).is_file():
        logged = read_config_file(target.run_dir / CONFIG_ARTIFACT)
        if logged is not None:
            return run_settings(logged, str(target.run_dir / CONFIG_ARTIFACT))
    if target.run_id and target.tracking_uri:
        return logged_run_settings(mlflow_client(target.tracking_uri), target.run_id)
    return None


def run_eval(uri: str, settings: EvalSettings, *, run_id: str | None = None, log_to_mlflow: bool = True
             ) -> dict[str, Any] | None:
    """`gapm eval`: scores one checkpoint or model; rank 0 returns (and logs) the record."""
    ranks = distributed_ranks(settings.device)
    target = resolve_target(uri, run_id)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        model, step = load_target(target, scratch)
    trained = target_run_settings(target)
    if settings.stats_dir is None:  # no --config: the statistics directory of the checkpoint's experiment
        settings = dataclasses.replace(settings, stats_dir=run_stats_directory(trained, target.run_dir))
    metrics, reference = evaluate_model(model, settings, data=trained.data if trained else None,
                                        data_seed=trained.seed if trained else 0, ranks=ranks)
    if not ranks.is_main:
        return None
    record = result_record(model, metrics, reference, settings, step or 0, uri, time.perf_counter() - started)
    if log_to_mlflow:
        if target.run_id and target.tracking_uri:
            publish(mlflow_client(target.tracking_uri), target.run_id, step or 0, metrics, record)
            record["run_id"] = target.run_id
            log.info("logged to MLflow run %s at step %s (%s)", target.run_id, step, target.tracking_uri)
        else:
            log.warning("%s: no MLflow run found for it (pass --run-id); results printed only", uri)
    return record



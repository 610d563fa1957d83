"""The training loop: stage 1 (autoencoder + interpolation critic), then stage 2 (latent GAN).

`train` runs one `TrainingJob` (pipeline.train.settings; pipeline.config assembles it from the
experiment config) and reads as its phases: prepare (Accelerate, data check, run directory,
tracker, model, checkpointer), restore (the checkpoint to resume from, the optimizers and
distributed wrappers, this rank's data), one `run_stage` per stage of the method, and finish
(metrics, outputs, the logged model). Accelerate supplies the device, DDP wrapping,
mixed precision and cross-rank reductions; the loop owns data position, checkpoints and logging.
Randomness inside iteration t on rank r is seeded from (seed, r, t) alone, so a resumed run
draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from gapm import Method, build_model, to_model_space
from pipeline import console
from pipeline.checkpoints import (
    Checkpoint,
    Checkpointer,
    CheckpointMeta,
    NoSpaceLeft,
    UnwritableLocation,
    disk_failure,
)
from pipeline.data import sources, storage
from pipeline.errors import GapmError
from pipeline.redaction import redact_mapping
from pipeline.stopping import StopRequest, TrainingInterrupted
from pipeline.tracking.tracker import NullTracker, Tracker, default_tracker, git_commit
from pipeline.train import outputs
from pipeline.train.distributed import (
    any_rank,
    average_batchnorm_statistics,
    check_world_size,
    gather_batchnorm_statistics,
    max_parameter_divergence,
    restore_rank_batchnorm_statistics,
)
from pipeline.train.engines import (
    Engines,
    build_optimizers,
    prepare_engines,
)
from pipeline.train.settings import TrainingJob, optimizer_settings, scheduled_lr

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path | str | None
    metrics: dict[str, float]


@dataclass
class Setup:
    """What `prepare` builds, before anything is restored."""

    job: TrainingJob
    accelerator: Accelerator
    tracker: Tracker
    model: Method
    checkpointer: Checkpointer

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class Run(Setup):
    """What the phases of one training share, complete once `restore` has built it. From then
    on only these change: `step` (run_stage, one per iteration), `position` (advanced in place
    by `batches`) and `last_saved` (save)."""

    engines: Engines = field(kw_only=True)
    source: sources.TrainingSource = field(kw_only=True)  # this rank's batches, epoch by epoch
    batches: Iterator[torch.Tensor] = field(kw_only=True)  # endless, over `source` from `position`
    position: sources.StreamPosition = field(kw_only=True)
    resumed_from: CheckpointMeta | None = field(kw_only=True)
    step: int = field(kw_only=True)  # iterations completed over all stages
    last_saved: Checkpoint | None = field(kw_only=True)


def train(job: TrainingJob, *, resume: str = "auto", tracker: Tracker | None = None,
          stop: StopRequest | None = None) -> TrainResult:
    """Trains every stage of `job`'s method. `stop`: the stop request `gapm train` installed
    before its imports (else one is installed here)."""
    if not isinstance(job, TrainingJob):  # an experiment config: its sections are assembled above this layer
        raise TypeError(f"train() runs a TrainingJob, not {type(job).__name__}: pass "
                        "pipeline.config.training_job(config)")
    with (stop or StopRequest()) as stop:
        run = restore(prepare(job, tracker), resume)
        if stop.agreed(run.accelerator):  # asked to stop during start-up: nothing new to save
            run.tracker.finish("KILLED")
            raise TrainingInterrupted(stop.signal_name, run.last_saved)
        for stage in range(1, len(run.model.stages) + 1):
            if run.resumed_from is None or stage >= run.resumed_from.stage:
                run_stage(run, stage, stop)
    return finish(run)


# --------------------------------------------------------------------------- prepare


def prepare(job: TrainingJob, tracker: Tracker | None) -> Setup:
    accelerator = Accelerator(
        mixed_precision=job.train.mixed_precision,
        # The latent BatchNorm's buffers change in every forward; broadcasting them from
        # rank 0 before each of several forwards per step breaks autograd (in-place error).
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    check_world_size(accelerator)  # before anything is written
    # Every storage call of this process and its loader workers retries outages this long.
    os.environ[storage.RETRY_BUDGET_ENV] = str(job.train.storage_retry_seconds)
    sources.check_sources(job.data, job.model_shape.data_shape)
    if accelerator.is_main_process:
        write_run_directory(job)
    # Only rank 0 tracks: the run directory record, plus MLflow unless tracking.enabled is false.
    if not accelerator.is_main_process:
        tracker = NullTracker()
    elif tracker is None:
        tracker = default_tracker(job.tracking, job.run_dir, job.name, job.checkpoints.directory)
    set_seed(job.seed)  # identical initial weights on every rank
    model = build_model(job.model_kind, job.model_shape, **job.hyperparameters)
    setup = Setup(job, accelerator, tracker, model, Checkpointer(job.checkpoints, tracker.log_checkpoint))
    if setup.is_main:  # checks the directory; s3://: uploads what an earlier launch left staged
        setup.checkpointer.start()
    accelerator.wait_for_everyone()  # the other ranks resume from what rank 0 has uploaded
    return setup


def write_run_directory(job: TrainingJob) -> None:
    """The run directory and its config.yaml; a place that cannot be written is one line."""
    try:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        # The resolved config, secrets masked (a token in a URL stays out of the run directory).
        (job.run_dir / "config.yaml").write_text(yaml.safe_dump(redact_mapping(job.record), sort_keys=False))
    except OSError as error:
        failure = disk_failure(error, job.run_dir, "the run directory", setting="output_dir")
        if failure is None:
            raise
        raise failure from None


# --------------------------------------------------------------------------- restore


def restore(setup: Setup, resume: str) -> Run:
    """The run, from the checkpoint to resume from (if any): weights, optimizer moments, loss
    scaler and data position; then the distributed wrappers and this rank's data stream."""
    job, model, accelerator = setup.job, setup.model, setup.accelerator
    optimizers = build_optimizers(model, job.optimizers)
    stage_steps = [job.stage_length(stage) for stage in range(1, len(model.stages) + 1)]
    restored = setup.checkpointer.restore(resume, model, stage_steps, announce=setup.is_main)
    meta, state = (restored.meta, restored.state) if restored is not None else (None, {})
    last_saved = restored.checkpoint if restored is not None else None
    position = sources.StreamPosition(meta.data_epoch, meta.data_batch_in_epoch) if meta else sources.StreamPosition()
    for name, optimizer in optimizers.items():
        if name in state.get("optimizers", {}):
            optimizer.load_state_dict(state["optimizers"][name])
        elif restored is not None and setup.is_main:
            log.warning("checkpoint %s has no optimizer state for %s (written under DeepSpeed); "
                        "its Adam moments restart", last_saved, name)
    engines = prepare_engines(accelerator, model, optimizers, job.train, job.data.batch_size)
    if accelerator.scaler is not None and "grad_scaler" in state and not engines.deepspeed:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    if RANK_BATCHNORM_STATE in state:  # stopped between two averagings: each rank's own statistics
        rank, world_size = accelerator.process_index, accelerator.num_processes
        own_statistics = restore_rank_batchnorm_statistics(model, state[RANK_BATCHNORM_STATE], rank, world_size)
        if not own_statistics and setup.is_main:
            log.warning("%s was written by %d ranks; the %d ranks start from their averaged BatchNorm statistics",
                        last_saved, len(state[RANK_BATCHNORM_STATE]), world_size)
    source = sources.training_source(job.data, rank=accelerator.process_index, world_size=accelerator.num_processes,
                                     seed=job.seed, data_shape=model.shape.data_shape,
                                     agree=lambda failed: any_rank(accelerator, failed))
    if setup.is_main:
        record_start(setup)
    return Run(**vars(setup), engines=engines, source=source, batches=sources.endless_batches(source, position),
               position=position, resumed_from=meta, step=meta.step if meta else 0, last_saved=last_saved)


def record_start(setup: Setup) -> None:
    """The run's params and the tags of this start (rank 0)."""
    setup.tracker.log_params(setup.job.record)
    tags = {"world_size": str(setup.accelerator.num_processes),
            "mixed_precision": setup.accelerator.mixed_precision, "dataset": setup.job.data.train}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    setup.tracker.set_tags(tags)


# --------------------------------------------------------------------------- one stage


def seed_iteration(seed: int, rank: int, step: int, device: torch.device) -> None:
    """Seeds the generators iteration `step` on `rank` draws from: the CPU's and `device`'s.

    The same values torch.manual_seed would set, without its cost: it also seeds every other
    GPU, and until CUDA is initialised (a CUDA build on a CPU machine) it records a formatted
    stack trace on every call, 0.1-0.3 ms (issue 16).
    """
    value = (seed * 1_000_003 + rank * 7_919 + step) % 2**63
    torch.random.default_generator.manual_seed(value)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(value)
    elif device.type != "cpu":
        torch.manual_seed(value)


def run_stage(run: Run, stage: int, stop: StopRequest) -> None:
    """The iterations of one stage, from where a resumed run left off; checkpoints every
    `train.checkpoint_every` steps and at the end; stops resumably on a signal."""
    job, model, engines, accelerator = run.job, run.model, run.engines, run.accelerator
    trained = model.stages[stage - 1]
    run.tracker.set_tags({"stage": str(stage)})  # both stages share one tracked run
    if stage > 1:  # GAPM's stage 2 reads BN(E(x)) with running statistics: the same on all ranks
        average_batchnorm_statistics(model, accelerator)
    resumed = run.resumed_from
    first = resumed.stage_step if resumed is not None and stage == resumed.stage else 0
    total = job.stage_length(stage)
    for name, network in engines.networks.items():
        network.train(name in trained)
    schedules = {name: optimizer_settings(job.optimizers, name) for name in trained}
    window = MetricWindow(stage)
    progress = progress_bar(run, stage, first, total)
    for stage_step in range(first, total):
        for name, settings in schedules.items():
            for group in engines.optimizers[name].param_groups:
                group["lr"] = scheduled_lr(settings, stage_step, total)
        seed_iteration(job.seed, accelerator.process_index, run.step, accelerator.device)
        try:  # every rank gets its batch, or every rank gets this error (sources.ShardBatches)
            batch = next(run.batches)
        except storage.StorageUnavailable as unavailable:
            stop_for_storage(run, stage, stage_step, first, stop, unavailable)
        data = to_model_space(batch.to(accelerator.device), model.shape.data_shape)
        logs = model.stage_step(stage, {name: engines.networks[name] for name in trained}, data, engines.update)
        run.step += 1
        window.add(logs, len(data))
        progress.update(1)
        done = stage_step + 1
        if done % job.train.log_every == 0 or done == total:
            means = window.flush(run, {name: engines.optimizers[name] for name in trained})
            # shown with the bar's next drawing: a forced one would be a line per window in batch logs
            progress.set_postfix({key.split("/", 1)[1]: f"{value:.4f}" for key, value in means.items()}, refresh=False)
        at_accumulation_boundary = done % job.train.gradient_accumulation_steps == 0
        if at_accumulation_boundary and done < total and stop.agreed(accelerator):
            saved = save(run, stage, done)
            progress.close()
            wait_for_uploads(run, STOP_UPLOAD_WAIT_S)
            run.tracker.finish("KILLED")
            raise TrainingInterrupted(stop.signal_name, saved)
        if done % job.checkpoints.every == 0 and done < total:
            save(run, stage, done)
    progress.close()
    save(run, stage, total)


def stop_for_storage(run: Run, stage: int, stage_step: int, first: int, stop: StopRequest,
                     unavailable: storage.StorageUnavailable) -> NoReturn:
    """Storage stayed away for the whole retry budget (or a stop came while waiting for it):
    checkpoint the steps done so far and stop resumably (exit 75). Mid-way through gradient
    accumulation, or with nothing new since the last checkpoint, the last checkpoint stands."""
    new_steps = stage_step > first and stage_step % run.job.checkpoints.every != 0
    at_boundary = stage_step % run.job.train.gradient_accumulation_steps == 0
    saved = save(run, stage, stage_step) if new_steps and at_boundary else run.last_saved
    wait_for_uploads(run, STOP_UPLOAD_WAIT_S)
    run.tracker.finish("KILLED")
    reason = stop.signal_name if stop.received is not None else f"a storage outage ({unavailable})"
    raise TrainingInterrupted(reason, saved)


def progress_bar(run: Run, stage: int, first: int, total: int) -> tqdm:
    # rank 0 only; in batch logs (Slurm, Kubernetes) it redraws rarely: pipeline.console
    return console.progress_bar(total, f"stage {stage}", unit="step", initial=first,
                                enabled=run.is_main and run.job.train.progress_bar)


class MetricWindow:
    """Losses since the last log line, averaged over the window and over ranks."""

    def __init__(self, stage: int):
        self.stage = stage
        self.values: dict[str, list[float]] = {}
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, logs: dict[str, float], batch_size: int) -> None:
        for key, value in logs.items():
            self.values.setdefault(key, []).append(value)
        self.samples += batch_size

    def flush(self, run: Run, optimizers: dict[str, Any]) -> dict[str, float]:
        """Logs the window's means (and throughput, learning rates); returns the means."""
        keys = sorted(self.values)
        means = torch.tensor([np.mean(self.values[k]) for k in keys], device=run.accelerator.device)
        means = run.accelerator.reduce(means, reduction="mean").tolist()
        losses = {f"stage{self.stage}/{k}": v for k, v in zip(keys, means)}
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        metrics = {**losses, f"stage{self.stage}/samples_per_second":
                   self.samples * run.accelerator.num_processes / elapsed}
        for name, optimizer in optimizers.items():
            metrics[f"stage{self.stage}/lr_{name}"] = optimizer.param_groups[0]["lr"]
        run.tracker.log_metrics(metrics, run.step)
        self.values, self.samples, self.started = {}, 0, time.perf_counter()
        return losses


RANK_BATCHNORM_STATE = "rank_batchnorm_statistics"  # training-state key: one row per rank


def save(run: Run, stage: int, stage_step: int) -> Checkpoint | None:
    """A checkpoint of every rank's agreed state, written by rank 0 (None on other ranks).
    Every rank stops if rank 0 could not write it, or could not upload an earlier one.

    The uninterrupted run averages the ranks' BatchNorm statistics at every `checkpoint_every`
    steps and at the end of a stage. A checkpoint at another step (a stop signal) also keeps
    each rank's own statistics, which the resume restores: it continues as the run would have.
    """
    accelerator, model, job = run.accelerator, run.model, run.job
    extra: dict[str, Any] = {}
    if stage_step % job.checkpoints.every and stage_step != job.stage_length(stage):
        per_rank = gather_batchnorm_statistics(model, accelerator)
        if per_rank is not None:
            extra[RANK_BATCHNORM_STATE] = per_rank
    average_batchnorm_statistics(model, accelerator)
    accelerator.wait_for_everyone()
    saved, failure = None, None
    if run.is_main:
        if accelerator.scaler is not None:
            extra["grad_scaler"] = accelerator.scaler.state_dict()
        meta = CheckpointMeta(
            stage=stage, step=run.step, stage_step=stage_step, data_epoch=run.position.epoch,
            data_batch_in_epoch=run.position.batch_in_epoch, model_shape=dataclasses.asdict(model.shape),
            experiment=job.name, model_kind=model.kind, hyperparameters=model.hyperparameters)
        try:
            saved = run.checkpointer.save(model, run.engines.checkpointed_optimizers(), extra, meta)
            run.last_saved = saved
        except (NoSpaceLeft, UnwritableLocation) as error:  # the earlier checkpoints stay
            failure = error
    stop_if_a_checkpoint_failed(run, failure)
    return saved


def stop_if_a_checkpoint_failed(run: Run, write_failure: Exception | None = None) -> None:
    """Every rank stops once rank 0 could not write a checkpoint (`write_failure`) or upload
    one for good: with rank 0's error there (exit 2 or 75), a matching one elsewhere."""
    failure = write_failure or run.checkpointer.upload_failure
    bad_input = isinstance(failure, GapmError)
    flags = torch.tensor([float(bad_input), float(failure is not None and not bad_input)],
                         device=run.accelerator.device)
    bad_input_anywhere, resumable_anywhere = run.accelerator.reduce(flags, reduction="sum").tolist()
    if not (bad_input_anywhere or resumable_anywhere):
        return
    try:
        run.tracker.finish("FAILED" if bad_input_anywhere else "KILLED")
    except OSError as error:  # a full disk may refuse the tracker's last record too
        log.warning("could not close the run's record: %s", error)
    if failure is not None:
        raise failure
    if bad_input_anywhere:
        raise UnwritableLocation("rank 0 could not write a checkpoint (its message says why)")
    raise TrainingInterrupted("a checkpoint that rank 0 could not write or upload", run.last_saved)


STOP_UPLOAD_WAIT_S = 60.0  # after a stop signal: the rest stays staged and goes up at the next launch


def wait_for_uploads(run: Run, timeout_s: float | None = None) -> None:
    """Blocks until rank 0's background uploads are done (or `timeout_s` passed); all ranks
    learn if one failed for good."""
    run.checkpointer.wait_for_uploads(timeout_s)
    run.accelerator.wait_for_everyone()
    stop_if_a_checkpoint_failed(run)


# --------------------------------------------------------------------------- finish


def finish(run: Run) -> TrainResult:
    """Checks the ranks agree, totals data problems, writes the run's outputs and metrics, and
    logs the trained model."""
    accelerator, job, model = run.accelerator, run.job, run.model
    metrics: dict[str, float] = {"distributed/max_parameter_divergence": max_parameter_divergence(model, accelerator)}
    problems = run.source.data_problems()
    totals = accelerator.reduce(torch.tensor([float(v) for v in problems.values()], device=accelerator.device),
                                reduction="sum").tolist()
    for key, total in zip(problems, totals):
        metrics[f"data/{key}"] = total
        if total and run.is_main:
            log.warning("data: %d %s skipped during training (see warnings above for which)",
                        int(total), key.replace("_", " "))
    wait_for_uploads(run)  # the logged model is read from the uploaded final checkpoint
    if run.is_main:
        metrics.update(outputs.write_outputs(model, job.data, seed=job.seed, samples=job.end_of_run_samples,
                                             run_dir=job.run_dir, title=job.name, device=accelerator.device))
        outputs.write_metrics(job.run_dir, metrics)
        run.tracker.log_metrics(metrics, run.step)
        for name in outputs.PICTURES:
            if (job.run_dir / name).exists():
                run.tracker.log_artifact(job.run_dir / name)
        last_stage_trained = job.stage_length(len(model.stages)) > 0
        if last_stage_trained and run.last_saved is not None:  # a usable generator
            run.tracker.log_model(run.last_saved)  # MLflow: logged as the run's model and registered
        run.tracker.finish("FINISHED")
        run.checkpointer.close()
    accelerator.wait_for_everyone()
    return TrainResult(run_dir=job.run_dir, final_checkpoint=run.last_saved, metrics=metrics)

"""The training loop: stage 1 (autoencoder + interpolation critic), then stage 2 (latent GAN).

`train` reads as its phases: prepare (Accelerate, data check, run directory, tracker, model,
optimizers), restore (the checkpoint to resume from), one `run_stage` per stage of the method,
and finish (metrics, outputs, the logged model). Accelerate supplies the device, DDP wrapping,
mixed precision and cross-rank reductions; the loop owns data position, checkpoints and logging.
Randomness inside iteration t on rank r is seeded from (seed, r, t) alone, so a resumed run
draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from gapm import Method, build_model
from pipeline import console
from pipeline.checkpoints import (
    Checkpoint,
    Checkpointer,
    CheckpointMeta,
    NoSpaceLeft,
    UnwritableLocation,
    disk_failure,
)
from pipeline.config import (
    ExperimentConfig,
    checkpoint_config,
    method_hyperparameters,
    optimizer_settings,
    to_dict,
)
from pipeline.data import sources, storage
from pipeline.errors import GapmError
from pipeline.stopping import StopRequest, TrainingInterrupted
from pipeline.tracking.redaction import redact_mapping
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
from pipeline.train.settings import scheduled_lr

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path | str | None
    metrics: dict[str, float]


@dataclass
class Run:
    """What the phases of one training share."""

    config: ExperimentConfig
    accelerator: Accelerator
    tracker: Tracker
    model: Method
    checkpointer: Checkpointer
    engines: Engines | None = None
    source: Any = None  # a sources.*Batches: this rank's batches, epoch by epoch
    batches: Any = None  # endless iterator over `source` from `position`
    position: sources.StreamPosition = field(default_factory=sources.StreamPosition)
    resumed_from: CheckpointMeta | None = None
    step: int = 0  # iterations completed over all stages
    last_saved: Checkpoint | None = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def train(config: ExperimentConfig, *, resume: str = "auto", tracker: Tracker | None = None,
          stop: StopRequest | None = None) -> TrainResult:
    """Trains every stage of `config`'s method. `stop`: the stop request `gapm train` installed
    before its imports (else one is installed here)."""
    with (stop or StopRequest()) as stop:
        run = prepare(config, tracker)
        restore(run, resume)
        if stop.agreed(run.accelerator):  # asked to stop during start-up: nothing new to save
            run.tracker.finish("KILLED")
            raise TrainingInterrupted(stop.signal_name, run.last_saved)
        for stage in range(1, len(run.model.stages) + 1):
            if run.resumed_from is None or stage >= run.resumed_from.stage:
                run_stage(run, stage, stop)
    return finish(run)


# --------------------------------------------------------------------------- prepare


def prepare(config: ExperimentConfig, tracker: Tracker | None) -> Run:
    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision,
        # The latent BatchNorm's buffers change in every forward; broadcasting them from
        # rank 0 before each of several forwards per step breaks autograd (in-place error).
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    check_world_size(accelerator)  # before anything is written
    # Every storage call of this process and its loader workers retries outages this long.
    os.environ[storage.RETRY_BUDGET_ENV] = str(config.train.storage_retry_seconds)
    sources.check_sources(config.data, config.model.data_shape)
    if accelerator.is_main_process:
        write_run_directory(config)
    # Only rank 0 tracks: the run directory record, plus MLflow unless tracking.enabled is false.
    tracker = (tracker or default_tracker(config, config.run_dir)) if accelerator.is_main_process else NullTracker()
    set_seed(config.seed)  # identical initial weights on every rank
    model = build_model(config.model.kind, config.model.shape(), **method_hyperparameters(config))
    run = Run(config, accelerator, tracker, model, Checkpointer(checkpoint_config(config), tracker.log_checkpoint))
    if run.is_main:  # checks the directory; s3://: uploads what an earlier launch left staged
        run.checkpointer.start()
    accelerator.wait_for_everyone()  # the other ranks resume from what rank 0 has uploaded
    return run


def write_run_directory(config: ExperimentConfig) -> None:
    """The run directory and its config.yaml; a place that cannot be written is one line."""
    try:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        # The resolved config, secrets masked (a token in a URL stays out of the run directory).
        (config.run_dir / "config.yaml").write_text(yaml.safe_dump(redact_mapping(to_dict(config)), sort_keys=False))
    except OSError as error:
        failure = disk_failure(error, config.run_dir, "the run directory", setting="output_dir")
        if failure is None:
            raise
        raise failure from None


# --------------------------------------------------------------------------- restore


def restore(run: Run, resume: str) -> None:
    """Weights, optimizer moments, loss scaler and data position from the checkpoint to resume
    from (if any); then the distributed wrappers and this rank's data stream."""
    config, model = run.config, run.model
    optimizers = build_optimizers(model, config)
    stage_steps = [stage_length(config, stage) for stage in range(1, len(model.stages) + 1)]
    restored = run.checkpointer.restore(resume, model, stage_steps, announce=run.is_main)
    state: dict[str, Any] = {}
    if restored is not None:
        meta, state = restored.meta, restored.state
        run.resumed_from, run.step, run.last_saved = meta, meta.step, restored.checkpoint
        run.position = sources.StreamPosition(meta.data_epoch, meta.data_batch_in_epoch)
        for name, optimizer in optimizers.items():
            if name in state["optimizers"]:
                optimizer.load_state_dict(state["optimizers"][name])
            elif run.is_main:
                log.warning("checkpoint %s has no optimizer state for %s (written under DeepSpeed); "
                            "its Adam moments restart", restored.checkpoint, name)
    run.engines = prepare_engines(run.accelerator, model, optimizers, config)
    scaler = run.accelerator.scaler
    if scaler is not None and "grad_scaler" in state and not run.engines.deepspeed:
        scaler.load_state_dict(state["grad_scaler"])
    if RANK_BATCHNORM_STATE in state:  # stopped between two averagings: each rank's own statistics
        rank, world_size = run.accelerator.process_index, run.accelerator.num_processes
        own_statistics = restore_rank_batchnorm_statistics(model, state[RANK_BATCHNORM_STATE], rank, world_size)
        if not own_statistics and run.is_main:
            log.warning("%s was written by %d ranks; the %d ranks start from their averaged BatchNorm statistics",
                        run.last_saved, len(state[RANK_BATCHNORM_STATE]), world_size)
    run.source = sources.training_source(config.data, rank=run.accelerator.process_index,
                                         world_size=run.accelerator.num_processes, seed=config.seed,
                                         data_shape=model.shape.data_shape,
                                         agree=lambda failed: any_rank(run.accelerator, failed))
    run.batches = sources.endless_batches(run.source, run.position)
    if run.is_main:
        run.tracker.log_params(to_dict(config))
        tags = {"world_size": str(run.accelerator.num_processes),
                "mixed_precision": run.accelerator.mixed_precision, "dataset": config.data.train}
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
        run.tracker.set_tags(tags)


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


def stage_length(config: ExperimentConfig, stage: int) -> int:
    return config.stage1.steps if stage == 1 else config.stage2.steps


def run_stage(run: Run, stage: int, stop: StopRequest) -> None:
    """The iterations of one stage, from where a resumed run left off; checkpoints every
    `train.checkpoint_every` steps and at the end; stops resumably on a signal."""
    config, model, engines, accelerator = run.config, run.model, run.engines, run.accelerator
    trained = model.stages[stage - 1]
    run.tracker.set_tags({"stage": str(stage)})  # both stages share one tracked run
    if stage > 1:  # GAPM's stage 2 reads BN(E(x)) with running statistics: the same on all ranks
        average_batchnorm_statistics(model, accelerator)
    resumed = run.resumed_from
    first = resumed.stage_step if resumed is not None and stage == resumed.stage else 0
    total = stage_length(config, stage)
    for name, network in engines.networks.items():
        network.train(name in trained)
    schedules = {name: optimizer_settings(config.optimizers, name) for name in trained}
    window = MetricWindow(stage)
    progress = progress_bar(run, stage, first, total)
    for stage_step in range(first, total):
        for name, settings in schedules.items():
            for group in engines.optimizers[name].param_groups:
                group["lr"] = scheduled_lr(settings, stage_step, total)
        seed_iteration(config.seed, accelerator.process_index, run.step, accelerator.device)
        try:  # every rank gets its batch, or every rank gets this error (sources.ShardBatches)
            batch = next(run.batches)
        except storage.StorageUnavailable as unavailable:
            stop_for_storage(run, stage, stage_step, first, stop, unavailable)
        data = sources.to_model_space(batch.to(accelerator.device), model.shape.data_shape)
        logs = model.stage_step(stage, {name: engines.networks[name] for name in trained}, data, engines.update)
        run.step += 1
        window.add(logs, len(data))
        progress.update(1)
        done = stage_step + 1
        if done % config.train.log_every == 0 or done == total:
            means = window.flush(run, {name: engines.optimizers[name] for name in trained})
            # shown with the bar's next drawing: a forced one would be a line per window in batch logs
            progress.set_postfix({key.split("/", 1)[1]: f"{value:.4f}" for key, value in means.items()}, refresh=False)
        at_accumulation_boundary = done % config.train.gradient_accumulation_steps == 0
        if at_accumulation_boundary and done < total and stop.agreed(accelerator):
            saved = save(run, stage, done)
            progress.close()
            wait_for_uploads(run, STOP_UPLOAD_WAIT_S)
            run.tracker.finish("KILLED")
            raise TrainingInterrupted(stop.signal_name, saved)
        if done % run.checkpointer.config.every == 0 and done < total:
            save(run, stage, done)
    progress.close()
    save(run, stage, total)


def stop_for_storage(run: Run, stage: int, stage_step: int, first: int, stop: StopRequest,
                     unavailable: storage.StorageUnavailable) -> NoReturn:
    """Storage stayed away for the whole retry budget (or a stop came while waiting for it):
    checkpoint the steps done so far and stop resumably (exit 75). Mid-way through gradient
    accumulation, or with nothing new since the last checkpoint, the last checkpoint stands."""
    train = run.config.train
    new_steps = stage_step > first and stage_step % train.checkpoint_every != 0
    at_boundary = stage_step % train.gradient_accumulation_steps == 0
    saved = save(run, stage, stage_step) if new_steps and at_boundary else run.last_saved
    wait_for_uploads(run, STOP_UPLOAD_WAIT_S)
    run.tracker.finish("KILLED")
    reason = stop.signal_name if stop.received is not None else f"a storage outage ({unavailable})"
    raise TrainingInterrupted(reason, saved)


def progress_bar(run: Run, stage: int, first: int, total: int) -> tqdm:
    # rank 0 only; in batch logs (Slurm, Kubernetes) it redraws rarely: pipeline.console
    return console.progress_bar(total, f"stage {stage}", unit="step", initial=first,
                                enabled=run.is_main and run.config.train.progress_bar)


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
    accelerator, model, config = run.accelerator, run.model, run.config
    extra: dict[str, Any] = {}
    if stage_step % config.train.checkpoint_every and stage_step != stage_length(config, stage):
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
            experiment=config.name, model_kind=model.kind, hyperparameters=model.hyperparameters)
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
    accelerator, config, model = run.accelerator, run.config, run.model
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
        metrics.update(outputs.write_outputs(model, config, accelerator.device))
        outputs.write_metrics(config.run_dir, metrics)
        run.tracker.log_metrics(metrics, run.step)
        for name in outputs.PICTURES:
            if (config.run_dir / name).exists():
                run.tracker.log_artifact(config.run_dir / name)
        last_stage_trained = stage_length(config, len(model.stages)) > 0
        if last_stage_trained and run.last_saved is not None:  # a usable generator
            run.tracker.log_model(run.last_saved)  # MLflow: logged as the run's model and registered
        run.tracker.finish("FINISHED")
        run.checkpointer.close()
    accelerator.wait_for_everyone()
    return TrainResult(run_dir=config.run_dir, final_checkpoint=run.last_saved, metrics=metrics)

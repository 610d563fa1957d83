"""The training loop: stage 1 (autoencoder + interpolation critic), then stage 2 (latent GAN).

One function, read top to bottom. Accelerate supplies the device, DDP wrapping, mixed
precision and cross-rank reductions; the loop owns data position, checkpoints and logging.
Randomness inside iteration t on rank r is seeded from (seed, r, t) alone, so a resumed run
draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import json
import math
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from gapm import GAPM, ModelShape, build_model
from pipeline.train import checkpoints
from pipeline.data import sources
from pipeline.train import deepspeed_engines
from pipeline.eval import quality
from pipeline.eval import figures
from pipeline.train.distributed import (
    StopRequest, TrainingInterrupted, average_batchnorm_statistics, max_parameter_divergence)
from pipeline.config import ConfigError, ExperimentConfig, OptimizerConfig, dump_config, to_dict
from pipeline.tracking.tracker import NullTracker, Tracker, default_tracker, git_commit

log = logging.getLogger(__name__)



@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path | None
    metrics: dict[str, float]


def model_shape(config: ExperimentConfig) -> ModelShape:
    m = config.model
    return ModelShape(data_shape=list(m.data_shape), latent_dim=m.latent_dim, prior_dim=m.prior_dim,
                      width=m.width, latent_norm=m.latent_norm,
                      latent_generator_widths=list(m.latent_generator_widths),
                      latent_generator_output_norm=m.latent_generator_output_norm,
                      latent_discriminator_widths=list(m.latent_discriminator_widths),
                      latent_discriminator_spectral_norm=m.latent_discriminator_spectral_norm,
                      latent_discriminator_activation=m.latent_discriminator_activation)


def method_hyperparameters(config: ExperimentConfig) -> dict:
    """GAPM's come from the stage sections; a baseline's from model.hyperparameters."""
    if config.model.kind != "gapm":
        return dict(config.model.hyperparameters)
    s1, s2 = config.stage1, config.stage2
    return dict(mix_gamma=s1.mix_gamma, critic_offset_lambda=s1.critic_offset_lambda,
                omega_interpolation=s1.omega_interpolation, omega_reconstruction=s1.omega_reconstruction,
                max_mixing=s1.max_mixing, critic_steps=s1.critic_steps,
                adversarial_regularizer=s1.adversarial_regularizer, discriminator_steps=s2.discriminator_steps)


def build_method(config: ExperimentConfig, shape: ModelShape):
    """The model of `model.kind`; a bad hyper-parameter is reported against its config key."""
    try:
        return build_model(config.model.kind, shape, **method_hyperparameters(config))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config key 'model.hyperparameters' ({config.model.kind}): {error}") from None


def optimizer_settings(config: ExperimentConfig, stage_index: int, name: str) -> OptimizerConfig:
    """`stageK.<name>` when the config has such a section, else `stage1.autoencoder` (the
    baselines' networks share those Adam settings)."""
    section = config.stage1 if stage_index == 0 else config.stage2
    settings = getattr(section, name, None)
    return settings if isinstance(settings, OptimizerConfig) else config.stage1.autoencoder


def stage_lengths(config: ExperimentConfig, stage_count: int) -> list[int]:
    return [config.stage1.steps, config.stage2.steps][:stage_count]


def scheduled_lr(settings: OptimizerConfig, stage_step: int, stage_steps: int) -> float:
    """The learning rate of iteration `stage_step` (0-based) of a stage of `stage_steps`."""
    progress = stage_step / max(stage_steps, 1)
    if settings.schedule == "constant" or progress <= settings.decay_start:
        return settings.lr
    decayed = (progress - settings.decay_start) / (1.0 - settings.decay_start)
    shape = 0.5 * (1 + math.cos(math.pi * decayed)) if settings.schedule == "cosine" else 1.0 - decayed
    return settings.lr * (settings.final_lr_fraction + (1 - settings.final_lr_fraction) * shape)


def adam(parameters, settings: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=settings.lr, betas=tuple(settings.betas),
                            weight_decay=settings.weight_decay)


def seed_iteration(seed: int, rank: int, step: int) -> None:
    torch.manual_seed((seed * 1_000_003 + rank * 7_919 + step) % 2**63)


def resume_checkpoint(resume: str, checkpoints_dir: checkpoints.Checkpoint) -> checkpoints.Checkpoint | None:
    """'auto': the latest complete checkpoint, if any; 'never': none; else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return checkpoints.latest_checkpoint(checkpoints_dir)
    path = resume if checkpoints.is_remote(resume) else Path(resume)
    checkpoints.read_meta(path)  # raises a clear error if it is not a complete checkpoint
    return path


def train(config: ExperimentConfig, *, resume: str = "auto", tracker: Tracker | None = None) -> TrainResult:
    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision,
        # The latent BatchNorm's buffers change in every forward; broadcasting them from
        # rank 0 before each of several forwards per step breaks autograd (in-place error).
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    is_main = accelerator.is_main_process
    sources.check_sources(config.data, config.model.data_shape)
    run_dir = config.run_dir
    checkpoints_dir = config.train.checkpoint_dir or run_dir / "checkpoints"
    if not checkpoints.is_remote(checkpoints_dir):
        checkpoints_dir = Path(checkpoints_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    # Only rank 0 tracks: the run directory record, plus MLflow unless tracking.enabled is false.
    tracker = (tracker or default_tracker(config, run_dir)) if is_main else NullTracker()

    # Identical initial weights on every rank.
    set_seed(config.seed)
    shape = model_shape(config)
    model = build_method(config, shape)
    optimizers = {name: adam(getattr(model, name).parameters(), optimizer_settings(config, index, name))
                  for index, names in enumerate(model.stages) for name in names}

    checkpoint = resume_checkpoint(resume, checkpoints_dir)
    meta = None
    if checkpoint is not None:
        meta = checkpoints.read_meta(checkpoint)
        checkpoints.check_compatible(meta, shape, checkpoint, model.kind)
        checkpoints.load_model_weights(model, checkpoint)
        state = checkpoints.load_training_state(checkpoint)
        for name, optimizer in optimizers.items():
            if name in state["optimizers"]:
                optimizer.load_state_dict(state["optimizers"][name])
            elif is_main:
                log.warning("checkpoint %s has no optimizer state for %s (written under DeepSpeed); "
                            "its Adam moments restart", checkpoint, name)
        if is_main:
            log.info("resuming from %s (stage %d, step %d)", checkpoint, meta.stage, meta.step)

    accumulation = config.train.gradient_accumulation_steps
    backward_calls = {name: 0 for name in optimizers}
    use_deepspeed = deepspeed_engines.enabled(accelerator)
    if use_deepspeed:
        networks, optimizers, update = deepspeed_engines.prepare(accelerator, model, optimizers, config)
    else:
        names = list(optimizers)
        prepared = accelerator.prepare(*(getattr(model, n) for n in names), *(optimizers[n] for n in names))
        networks = dict(zip(names, prepared[: len(names)]))
        optimizers = dict(zip(names, prepared[len(names):]))
        if checkpoint is not None and accelerator.scaler is not None and "grad_scaler" in state:
            accelerator.scaler.load_state_dict(state["grad_scaler"])
    if config.train.compile:
        networks = {name: torch.compile(net) for name, net in networks.items()}

    def accelerate_update(name: str, loss: torch.Tensor) -> None:
        """Backward, then every `accumulation` calls for this network: clip and step.
        Accelerate scales fp16 losses and skips steps whose gradients overflowed."""
        accelerator.backward(loss / accumulation)
        backward_calls[name] += 1
        if backward_calls[name] % accumulation:
            return
        if config.train.grad_clip_norm is not None:
            accelerator.clip_grad_norm_(networks[name].parameters(), config.train.grad_clip_norm)
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    if not use_deepspeed:
        update = accelerate_update

    position = sources.StreamPosition()
    if meta is not None:
        position = sources.StreamPosition(meta.data_epoch, meta.data_batch_in_epoch)
    source = sources.training_source(config.data, rank=accelerator.process_index,
                                      world_size=accelerator.num_processes, seed=config.seed,
                                      data_shape=shape.data_shape)
    batches = sources.endless_batches(source, position)

    if is_main:
        tracker.log_params(to_dict(config))
        tags = {"world_size": str(accelerator.num_processes), "mixed_precision": accelerator.mixed_precision,
                "dataset": config.data.train}
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
        tracker.set_tags(tags)

    def save(stage: int, stage_step: int, step: int) -> Path | None:
        average_batchnorm_statistics(model, accelerator)
        accelerator.wait_for_everyone()
        saved = None
        if is_main:
            extra = {"grad_scaler": accelerator.scaler.state_dict()} if accelerator.scaler is not None else {}
            # Under DeepSpeed, ZeRO partitions the optimizer state across ranks: weights only.
            saved = checkpoints.save_checkpoint(
                checkpoints_dir, model, {} if use_deepspeed else optimizers, extra,
                checkpoints.CheckpointMeta(stage=stage, step=step, stage_step=stage_step,
                                           data_epoch=position.epoch,
                                           data_batch_in_epoch=position.batch_in_epoch,
                                           model_shape=dataclasses.asdict(shape), experiment=config.name,
                                           model_kind=model.kind, hyperparameters=model.hyperparameters))
            checkpoints.prune_checkpoints(checkpoints_dir, config.train.keep_last_checkpoints)
            tracker.log_checkpoint(saved)
        accelerator.wait_for_everyone()
        return saved

    step = meta.step if meta else 0
    last_saved = checkpoint
    lengths = stage_lengths(config, len(model.stages))
    with StopRequest() as stop:
        for index, trained in enumerate(model.stages):
            stage = index + 1  # stages count from 1 in logs, metrics and checkpoints
            if meta is not None and stage < meta.stage:
                continue
            tracker.set_tags({"stage": str(stage)})  # both stages share one tracked run
            if stage > 1:
                # GAPM's stage 2 reads BN(E(x)) with running statistics: the same on all ranks.
                average_batchnorm_statistics(model, accelerator)
            first = meta.stage_step if meta is not None and stage == meta.stage else 0
            total = lengths[index]
            for name, net in networks.items():
                net.train(name in trained)
            progress = tqdm(total=total, initial=first, desc=f"stage {stage}",
                            disable=not (is_main and config.train.progress_bar), dynamic_ncols=True,
                            # In batch logs (Slurm, Kubernetes) a redraw is a new line: redraw rarely.
                            mininterval=0.1 if sys.stderr.isatty() else 30.0)
            window: dict[str, list[float]] = {}
            window_start, window_steps = time.perf_counter(), 0
            schedules = {name: optimizer_settings(config, index, name) for name in trained}
            for stage_step in range(first, total):
                for name, settings in schedules.items():
                    for group in optimizers[name].param_groups:
                        group["lr"] = scheduled_lr(settings, stage_step, total)
                seed_iteration(config.seed, accelerator.process_index, step)
                data = sources.to_model_space(next(batches).to(accelerator.device), shape.data_shape)
                logs = model.stage_step(stage, {name: networks[name] for name in trained}, data, update)
                step += 1
                window_steps += 1
                for key, value in logs.items():
                    window.setdefault(key, []).append(value)
                progress.update(1)
                done = stage_step + 1
                if done % config.train.log_every == 0 or done == total:
                    keys = sorted(window)
                    means = torch.tensor([np.mean(window[k]) for k in keys], device=accelerator.device)
                    means = accelerator.reduce(means, reduction="mean").tolist()
                    elapsed = time.perf_counter() - window_start
                    metrics = {f"stage{stage}/{k}": v for k, v in zip(keys, means)}
                    metrics[f"stage{stage}/samples_per_second"] = (
                        window_steps * len(data) * accelerator.num_processes / max(elapsed, 1e-9))
                    for name in trained:
                        metrics[f"stage{stage}/lr_{name}"] = optimizers[name].param_groups[0]["lr"]
                    tracker.log_metrics(metrics, step)
                    progress.set_postfix({k: f"{v:.4f}" for k, v in zip(keys, means)})
                    window, window_start, window_steps = {}, time.perf_counter(), 0
                at_accumulation_boundary = done % accumulation == 0
                if at_accumulation_boundary and done < total and stop.agreed(accelerator):
                    saved = save(stage, done, step)
                    progress.close()
                    tracker.finish("KILLED")
                    raise TrainingInterrupted(stop.signal_name, saved)
                if done % config.train.checkpoint_every == 0 and done < total:
                    last_saved = save(stage, done, step) or last_saved
            progress.close()
            last_saved = save(stage, total, step) or last_saved

    metrics: dict[str, float] = {"distributed/max_parameter_divergence": max_parameter_divergence(model, accelerator)}
    problems = source.data_problems()
    totals = accelerator.reduce(torch.tensor([float(v) for v in problems.values()], device=accelerator.device),
                                reduction="sum").tolist()
    for key, total in zip(problems, totals):
        metrics[f"data/{key}"] = total
        if total and is_main:
            log.warning("data: %d %s skipped during training (see warnings above for which)",
                        int(total), key.replace("_", " "))
    if is_main:
        metrics.update(write_outputs(model, config, run_dir, accelerator.device))
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        tracker.log_metrics(metrics, step)
        for name in ("samples.png", "reconstructions.png", "figure4.png"):
            if (run_dir / name).exists():
                tracker.log_artifact(run_dir / name)
        if lengths[-1] > 0 and last_saved is not None:  # the last stage trained: a usable generator
            tracker.log_model(last_saved)  # MLflow: logged as the run's model and registered
        tracker.finish("FINISHED")
    accelerator.wait_for_everyone()
    return TrainResult(run_dir=run_dir, final_checkpoint=last_saved, metrics=metrics)


def write_outputs(model: GAPM, config: ExperimentConfig, run_dir: Path, device) -> dict[str, float]:
    """Evaluates the trained model; writes the recon/samples arrays and pictures."""
    shape = config.model.data_shape
    held_out = sources.held_out_data(config.data, config.seed, limit=config.eval.samples, data_shape=shape)
    model.to(device)
    metrics, reconstructions, samples = quality.evaluate(model, held_out, shape, config.eval.samples,
                                                            seed=config.seed, roll=sources.test_roll(config.data))
    np.save(run_dir / "recon.npy", reconstructions.numpy())
    np.save(run_dir / "samples.npy", samples.numpy())
    if sources.is_image_shape(shape):
        figures.save_image_grid(samples[:64], run_dir / "samples.png")
        paired = torch.stack([held_out[:32], reconstructions[:32]], dim=1).flatten(0, 1)
        figures.save_image_grid(paired, run_dir / "reconstructions.png")
    else:
        figures.save_point_panels(held_out, reconstructions, samples[: len(held_out)],
                                  run_dir / "figure4.png", title=config.name)
    return metrics

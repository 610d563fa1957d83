"""Per-step time of the pipeline's training loop against a bare PyTorch loop.

Both run the same networks on the same batches with the same step functions; the bare loop
is the minimum anyone would write (backward, step, zero_grad). The pipeline adds Accelerate
(device placement, autocast wrapper, backward hook), per-iteration seeding, the stop-signal
check, loss windows with a cross-rank reduce, and the progress bar (disabled). Checkpoint
writes are excluded from both (checkpoint_every > steps, end-of-stage save not timed).

    python benchmarks/train_step.py [--steps 300] [--batch-size 128] [--data-shape 3,32,32]
                                    [--mixed-precision bf16]
Points ([2], the default) use the swiss-roll MLPs; image shapes use the convolutional
networks on in-memory synthetic images, so neither side waits on I/O.
Prints seconds per step for each stage and the pipeline/bare ratio (target: < 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gapm import (  # noqa: E402
    GAPM,
    Stage1Hyperparameters,
    Stage2Hyperparameters,
    stage1_step,
    stage2_step,
)
from gapm.method import plain_update  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import sources  # noqa: E402
from pipeline.train.engines import adam  # noqa: E402
from pipeline.train.loop import train  # noqa: E402


def bare_loop(config, steps: int) -> dict[int, float]:
    """Seconds per step of stage 1 and stage 2 in plain PyTorch."""
    torch.manual_seed(config.seed)
    shape = config.model.shape()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.mixed_precision or "no")
    model = GAPM(shape).to(device)
    optimizers = {"autoencoder": adam(model.autoencoder.parameters(), config.stage1.autoencoder),
                  "critic": adam(model.critic.parameters(), config.stage1.critic),
                  "latent_generator": adam(model.latent_generator.parameters(), config.stage2.latent_generator),
                  "latent_discriminator": adam(model.latent_discriminator.parameters(),
                                               config.stage2.latent_discriminator)}
    update = plain_update(optimizers)
    if precision is not None:  # what Accelerate does: autocast the forwards, scale fp16 losses
        scaler = torch.amp.GradScaler(enabled=precision == torch.float16)

        def update(name, loss):  # noqa: F811
            scaler.scale(loss).backward()
            scaler.step(optimizers[name])
            scaler.update()
            optimizers[name].zero_grad(set_to_none=True)

        for network in (model.autoencoder, model.critic, model.latent_generator, model.latent_discriminator):
            network.forward = torch.autocast(device.type, dtype=precision)(network.forward)
    source = sources.training_source(config.data, rank=0, world_size=1, seed=config.seed,
                                      data_shape=shape.data_shape)
    batches = sources.endless_batches(source, sources.StreamPosition())
    timings = {}
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        data = sources.to_model_space(next(batches).to(device), shape.data_shape)
        stage1_step(model.autoencoder, model.critic, model.critic, data, Stage1Hyperparameters(), update)
    timings[1] = (time.perf_counter() - start) / steps
    model.autoencoder.eval()
    start = time.perf_counter()
    for _ in range(steps):
        data = sources.to_model_space(next(batches).to(device), shape.data_shape)
        stage2_step(model.autoencoder, model.latent_generator, model.latent_discriminator,
                    model.latent_discriminator, data, shape.prior_dim, Stage2Hyperparameters(), update)
    timings[2] = (time.perf_counter() - start) / steps
    return timings


def pipeline_loop(config) -> dict[int, float]:
    """Seconds per step as measured by the pipeline's own throughput metric (one window per stage)."""
    train(config, resume="never")
    rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    timings = {}
    for stage in (1, 2):
        rate = [r[f"stage{stage}/samples_per_second"] for r in rows if f"stage{stage}/samples_per_second" in r]
        timings[stage] = config.data.batch_size / rate[-1]
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="alternate bare/pipeline runs; report the best")
    parser.add_argument("--data-shape", default="2", help="2 (swiss-roll points) or C,S,S e.g. 3,32,32")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    args = parser.parse_args()
    os.environ.setdefault("ACCELERATE_USE_CPU", "1" if not torch.cuda.is_available() else "0")
    with tempfile.TemporaryDirectory() as tmp:
        data_shape = [int(v) for v in args.data_shape.split(",")]
        image_settings = [] if data_shape == [2] else [
            f"model.data_shape={data_shape}", "model.latent_dim=128", "model.prior_dim=128", "model.width=64",
            "model.latent_generator_widths=[400, 800, 400, 400]",
            "model.latent_discriminator_widths=[400, 400, 400, 64]",
            "data.train=synthetic", "data.test=synthetic", "data.swissroll_samples=4096"]
        config = load_config(Path(__file__).resolve().parent.parent / "configs/swissroll.yaml", [
            *image_settings, f"train.mixed_precision={args.mixed_precision}", "tracking.enabled=false",
            f"output_dir={tmp}", f"stage1.steps={args.steps}", f"stage2.steps={args.steps}",
            f"data.batch_size={args.batch_size}", f"train.log_every={args.steps}",
            f"train.checkpoint_every={args.steps}", "train.progress_bar=false", "eval.samples=100",
            "data.swissroll_test_samples=100"])
        best_bare, best_pipeline = {1: float("inf"), 2: float("inf")}, {1: float("inf"), 2: float("inf")}
        for _ in range(args.repeats):
            for stage, seconds in bare_loop(config, args.steps).items():
                best_bare[stage] = min(best_bare[stage], seconds)
            for stage, seconds in pipeline_loop(config).items():
                best_pipeline[stage] = min(best_pipeline[stage], seconds)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"train_step benchmark: data shape {args.data_shape}, batch {args.batch_size}, {args.steps} steps/stage, "
          f"{args.mixed_precision} precision, best of {args.repeats}, device {device}")
    for stage in (1, 2):
        ratio = best_pipeline[stage] / best_bare[stage]
        print(f"stage {stage}: bare {best_bare[stage] * 1e3:.2f} ms/step, pipeline "
              f"{best_pipeline[stage] * 1e3:.2f} ms/step, ratio {ratio:.3f} (target < 1.05)")


if __name__ == "__main__":
    main()

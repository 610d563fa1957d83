"""Per-step time of the pipeline's training loop against a bare PyTorch loop.

Both run the same networks on the same batches with the same step functions; the bare loop
is the minimum anyone would write (backward, step, zero_grad; autocast and a GradScaler for
mixed precision). The pipeline adds Accelerate (device placement, autocast wrapper, loss
scaling), per-iteration seeding, the stop-signal check, loss windows with a cross-rank reduce,
and the progress bar (disabled). Checkpoint writes are outside both timings.

    python benchmarks/train_step.py [--steps 200] [--batch-size 128] [--data-shape 3,32,32]
                                    [--mixed-precision bf16] [--repeats 5]
    python benchmarks/train_step.py --checkout /tmp/gapm-main      # that checkout vs this one, side by side

Points ([2], the default) use the swiss-roll MLPs; image shapes use the convolutional networks
on in-memory synthetic images, so neither side waits on I/O. Each repetition runs in a fresh
process (bare loop, then pipeline) and, with --checkout, the checkouts take turns, so a slow
period of a shared machine hits all of them. Prints the median ratio pipeline/bare per stage
and its spread (target: <= 1.05). On CPU, torch runs one thread unless --threads says otherwise:
with more threads than free cores the timings measure the machine's load, not the loop.
Progress goes to stderr as it runs (a line per repetition and checkout); the table to stdout
at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
CHECKOUT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

from benchmark_support import arguments_of_parent, measure_in_child, progress  # noqa: E402


def one_repetition(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """Seconds per step of stage 1 and 2, bare and pipeline, in this process (imports from the
    checkout on sys.path[0])."""
    import torch

    from pipeline.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    data_shape = [int(v) for v in args.data_shape.split(",")]
    image_settings = [] if data_shape == [2] else [
        f"model.data_shape={data_shape}", "model.latent_dim=128", "model.prior_dim=128", f"model.width={args.width}",
        "model.latent_generator_widths=[400, 800, 400, 400]", "model.latent_discriminator_widths=[400, 400, 400, 64]",
        "data.train=synthetic", "data.test=synthetic", "data.swissroll_samples=4096"]
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(CHECKOUT / "configs/swissroll.yaml", [
            *image_settings, f"train.mixed_precision={args.mixed_precision}", "tracking.enabled=false",
            f"output_dir={tmp}", f"stage1.steps={steps}", f"stage2.steps={steps}",
            f"data.batch_size={args.batch_size}", f"train.log_every={args.warmup}",
            f"train.checkpoint_every={steps}", "train.progress_bar=false", "eval.samples=100",
            "data.swissroll_test_samples=100"])
        bare = bare_seconds_per_step(config, args.warmup, args.steps)
        pipeline = pipeline_seconds_per_step(config)
    return {"bare": bare, "pipeline": pipeline}


def bare_seconds_per_step(config, warmup: int, steps: int) -> dict[int, float]:
    """The minimal loop: the method's step functions with plain Adam updates (autocast and a
    GradScaler for mixed precision, as Accelerate does), timed after `warmup` steps."""
    import torch

    from gapm import (
        GAPM,
        Stage1Hyperparameters,
        Stage2Hyperparameters,
        stage1_step,
        stage2_step,
    )
    from gapm.method import plain_update
    from pipeline.data import sources
    from pipeline.train.engines import adam
    try:
        from pipeline.config import optimizer_settings
    except ImportError:  # a checkout from before the `optimizers` section

        def optimizer_settings(_, name):
            return getattr(config.stage1 if name in ("autoencoder", "critic") else config.stage2, name)
    try:
        from gapm import to_model_space
    except ImportError:  # a checkout from before gapm owned the data spaces
        to_model_space = sources.to_model_space

    torch.manual_seed(config.seed)
    shape = config.model.shape()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.mixed_precision or "no")
    model = GAPM(shape).to(device)
    optimizers = {name: adam(getattr(model, name).parameters(), optimizer_settings(config.optimizers, name))
                  for name in ("autoencoder", "critic", "latent_generator", "latent_discriminator")}
    update = plain_update(optimizers)
    if precision is not None:  # what Accelerate does: autocast the forwards, scale fp16 losses
        scaler = torch.amp.GradScaler(enabled=precision == torch.float16 and device.type == "cuda")

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

    def stage1() -> None:
        data = to_model_space(next(batches).to(device), shape.data_shape)
        stage1_step(model.autoencoder, model.critic, model.critic, data, Stage1Hyperparameters(), update)

    def stage2() -> None:
        data = to_model_space(next(batches).to(device), shape.data_shape)
        stage2_step(model.autoencoder, model.latent_generator, model.latent_discriminator,
                    model.latent_discriminator, data, shape.prior_dim, Stage2Hyperparameters(), update)

    seconds = {}
    model.train()
    for stage, step in ((1, stage1), (2, stage2)):
        if stage == 2:
            model.autoencoder.eval()
        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[stage] = (time.perf_counter() - started) / steps
    return seconds


def pipeline_seconds_per_step(config) -> dict[int, float]:
    """The pipeline's training of the same config, by its own throughput metric over the logging
    windows after the warm-up one."""
    from pipeline.train.loop import train
    try:
        from pipeline.config import training_job
    except ImportError:  # a checkout from before the training job: train took the whole config
        train(config, resume="never")
    else:
        train(training_job(config), resume="never")
    rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = {}
    for stage in (1, 2):
        rates = [r[f"stage{stage}/samples_per_second"] for r in rows if f"stage{stage}/samples_per_second" in r]
        seconds[stage] = statistics.mean(config.data.batch_size / rate for rate in rates[1:])
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per stage (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="untimed steps before them; also the pipeline's logging window (--steps: a multiple) "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch of both loops (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="fresh-process repetitions (per checkout) (default: %(default)s)")
    parser.add_argument("--data-shape", default="2",
                        help="2 (swiss-roll points) or C,S,S e.g. 3,32,32 (default: %(default)s)")
    parser.add_argument("--width", type=int, default=64,
                        help="base channels of the image networks (default: %(default)s)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
                        help="precision of both loops (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 on CPU, torch's choice on a GPU machine)")
    parser.add_argument("--checkout", action="append", default=[],
                        help="another checkout of this repository to measure side by side, repeatable "
                             "(default: this checkout only)")
    parser.add_argument("--one-repetition", action="store_true", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = arguments_of_parent(build_parser(), "one_repetition", one_repetition)
    if args is None:  # this process was a child: it measured one repetition and answered
        return

    import torch  # only to name the device; every measurement runs in a child process

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is None and device == "cpu":
        args.threads = 1
    checkouts = [CHECKOUT, *(Path(c).resolve() for c in args.checkout)]
    child_args = [*_without_checkout_flags(sys.argv[1:]), "--one-repetition"]
    if args.threads:
        child_args += ["--threads", str(args.threads)]
    results: dict[Path, list[dict]] = {checkout: [] for checkout in checkouts}
    progress(f"{args.repeats} repetition(s) x {len(checkouts)} checkout(s), each a fresh process: bare loop, then "
             f"the pipeline, {args.warmup} + {args.steps} steps per stage")
    for repetition in range(args.repeats):
        for checkout in checkouts:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")]),
                   "ACCELERATE_USE_CPU": "1" if device == "cpu" else "0", "GAPM_LOG_LEVEL": "WARNING"}
            results[checkout].append(measure_in_child([sys.executable, str(HERE), *child_args], what=str(checkout),
                                                      env=env, cwd=checkout))
            measured = results[checkout][-1]
            progress(f"repetition {repetition + 1}/{args.repeats}"
                     f"{f' of {checkout}' if len(checkouts) > 1 else ''}: " + ", ".join(
                         f"stage {stage} pipeline/bare {measured['pipeline'][stage] / measured['bare'][stage]:.3f}"
                         for stage in ("1", "2")))

    print(f"train_step benchmark: data shape {args.data_shape}, batch {args.batch_size}, {args.steps} timed steps "
          f"per stage after {args.warmup}, {args.mixed_precision} precision, device {device}"
          f"{f', {args.threads} torch thread(s)' if args.threads else ''}, {args.repeats} repetitions"
          f"{' interleaved over checkouts' if len(checkouts) > 1 else ''}")
    for checkout, runs in results.items():
        if len(checkouts) > 1:
            print(f"{checkout}:")
        for stage in ("1", "2"):
            bare = [run["bare"][stage] * 1e3 for run in runs]
            pipeline = [run["pipeline"][stage] * 1e3 for run in runs]
            ratios = [p / b for p, b in zip(pipeline, bare)]
            print(f"stage {stage}: bare {statistics.median(bare):.2f} ms/step, pipeline {statistics.median(pipeline):.2f} "
                  f"ms/step, ratio {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}] "
                  "(target <= 1.05)")


def _without_checkout_flags(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--checkout":
            skip = True
        elif not arg.startswith("--checkout="):
            kept.append(arg)
    return kept


if __name__ == "__main__":
    main()

"""Training throughput per device: each stage and precision, fed from memory and from the
streaming loader, with and without `train.compile`, the stage-1 model-FLOPs utilisation, and
how many loader workers keep one device busy.

    python benchmarks/throughput.py                  # the CelebA 64x64 networks of configs/celeba64.yaml, batch 32
    python benchmarks/throughput.py --small          # a CPU-sized run: 3x32x32, width 16, batch 32
    python benchmarks/throughput.py --batch-size 128 --precisions bf16 --json out.json

What each number is:
- samples/s: images per second of the pipeline's own training loop (`pipeline.train.loop.run_stage`,
  one process, one device), the median over the logging windows after a warm-up window.
  "synthetic" feeds in-memory noise of the image shape (no I/O: what the device can consume);
  "streaming" feeds WebDataset shards of random PNGs of that shape through the real loader with
  `--workers` DataLoader workers, so a step that waits for input shows up as a lower rate.
- compiled: the same synthetic run with `train.compile: true` (torch.compile on every trained
  network); its warm-up window absorbs the compilation.
- workers needed: ceil(synthetic samples/s / decode rate of one loader worker), where the
  decode rate is samples per CPU-second of a worker process on shards of this shape
  (benchmarks/loader.py's measure): the workers that keep one device busy if each has a core.
- stage-1 MFU: FLOPs of one stage-1 iteration (2 critic updates + 1 autoencoder update, counted
  with torch.utils.flop_counter: matmuls and convolutions, forward and backward) times
  iterations/s, divided by a peak printed with the table: the GPU's published dense peak for
  the precision (fp32 runs are divided by the TF32 peak, since cuDNN runs fp32 convolutions in
  TF32 by default), or on a CPU, which has no published peak here, the rate this process measures
  for a large matmul in that precision. `--peak-tflops` overrides.

Each run is a fresh process (Accelerate's precision is per process). Not a test: numbers depend
on the machine, and on a shared one on its load. Progress goes to stderr as it runs (a line per
training run); the table to stdout at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
CHECKOUT = HERE.parent.parent
sys.path.insert(0, str(CHECKOUT))
sys.path.insert(0, str(HERE.parent))

from benchmark_support import arguments_of_parent, measure_in_child, progress  # noqa: E402

# Published dense peaks in TFLOP/s (NVIDIA datasheets, SXM parts): bf16/fp16 tensor cores, TF32.
GPU_PEAKS = {"H200": {"bf16": 989.4, "fp16": 989.4, "no": 494.7},
             "H100": {"bf16": 989.4, "fp16": 989.4, "no": 494.7},
             "A100": {"bf16": 312.0, "fp16": 312.0, "no": 156.0}}


def model_settings(args: argparse.Namespace) -> list[str]:
    shape = [3, 32, 32] if args.small else [3, 64, 64]
    width = 16 if args.small else 64
    return [f"model.data_shape={shape}", f"model.width={width}", f"data.batch_size={args.batch_size}"]


def image_side(args: argparse.Namespace) -> int:
    return 32 if args.small else 64


# --------------------------------------------------------------------------- one run (child process)


def one_run(args: argparse.Namespace) -> dict:
    """Samples/s per stage of one training run of `--windows` logging windows after a warm-up."""
    import torch

    from pipeline.config import load_config
    from pipeline.stopping import StopRequest
    from pipeline.tracking.tracker import NullTracker
    from pipeline.train import loop

    if args.threads:
        torch.set_num_threads(args.threads)

    class Rates(NullTracker):
        def __init__(self) -> None:
            self.rows: list[dict] = []

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            self.rows.append(metrics)

    steps = args.warmup * (1 + args.windows)
    data = ([f"data.train={args.shards}", f"data.num_workers={args.workers}", "data.shuffle_buffer=1000"]
            if args.shards else ["data.train=synthetic", f"data.swissroll_samples={max(4096, 4 * args.batch_size)}"])
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(CHECKOUT / "configs/celeba64.yaml", [
            *model_settings(args), *data, "data.test=synthetic", f"train.mixed_precision={args.precision}",
            f"train.compile={str(args.compile).lower()}", f"output_dir={tmp}", "tracking.enabled=false",
            f"stage1.steps={steps}", f"stage2.steps={steps}", f"train.log_every={args.warmup}",
            f"train.checkpoint_every={steps}", "train.progress_bar=false"])
        rates = Rates()
        try:
            from pipeline.config import training_job
        except ImportError:  # a checkout from before the training job: the loop took the whole config
            run = loop.prepare(config, rates)
            loop.restore(run, "never")
        else:
            run = loop.restore(loop.prepare(training_job(config), rates), "never")
        with StopRequest() as stop:
            for stage in (1, 2):
                loop.run_stage(run, stage, stop)
    result = {}
    for stage in (1, 2):
        windows = [row[f"stage{stage}/samples_per_second"] for row in rates.rows
                   if f"stage{stage}/samples_per_second" in row]
        result[stage] = statistics.median(windows[1:])  # the first window is the warm-up
    return result


def run_child(args: argparse.Namespace, **settings) -> dict[int, float]:
    what = ", ".join([settings["precision"], *(["compiled"] if settings.get("compile") else []),
                      "streaming" if settings.get("shards") else "synthetic"])
    progress(f"training run ({what})")
    rates = _run_child(args, **settings)
    progress(f"training run ({what}): " + ", ".join(f"stage {stage} {rate:.0f} samples/s"
                                                     for stage, rate in sorted(rates.items())))
    return rates


def _run_child(args: argparse.Namespace, **settings) -> dict[int, float]:
    argv = [sys.executable, str(HERE), "--one-run", "--batch-size", str(args.batch_size), "--warmup", str(args.warmup),
            "--windows", str(args.windows), "--precision", settings["precision"], "--workers", str(args.workers)]
    argv += ["--small"] if args.small else []
    argv += ["--compile"] if settings.get("compile") else []
    argv += ["--shards", settings["shards"]] if settings.get("shards") else []
    argv += ["--threads", str(args.threads)] if args.threads else []
    env = {**os.environ, "GAPM_LOG_LEVEL": "WARNING"}
    rates = measure_in_child(argv, what=f"run {settings}", env=env, timeout=args.run_timeout)
    return {int(stage): rate for stage, rate in rates.items()}


# --------------------------------------------------------------------------- FLOPs and peaks


def stage1_flops(args: argparse.Namespace, device) -> float:
    """Matmul and convolution FLOPs (forward + backward) of one stage-1 iteration."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gapm import GAPM, Stage1Hyperparameters, stage1_step
    from gapm.method import plain_update
    from pipeline.config import load_config

    config = load_config(CHECKOUT / "configs/celeba64.yaml", model_settings(args))
    model = GAPM(config.model.shape()).to(device)
    optimizers = {name: torch.optim.Adam(getattr(model, name).parameters()) for name in ("autoencoder", "critic")}
    data = torch.rand(args.batch_size, *config.model.data_shape, device=device) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        stage1_step(model.autoencoder, model.critic, model.critic, data, Stage1Hyperparameters(), plain_update(optimizers))
    return float(counter.get_total_flops())


def peak_flops(precision: str, device, override: float | None) -> tuple[float, str]:
    import torch

    if override:
        return override * 1e12, f"{override:g} TFLOP/s (--peak-tflops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAKS.items():
            if key in name:
                kind = "TF32" if precision == "no" else precision
                return peaks[precision] * 1e12, f"{peaks[precision]:g} TFLOP/s, {name} dense {kind} peak (datasheet)"
        return float("nan"), f"unknown peak for {name}: pass --peak-tflops"
    dtype = {"no": torch.float32, "bf16": torch.bfloat16}[precision]
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    repeats, started = 5, time.perf_counter()
    for _ in range(repeats):
        a @ b
    rate = repeats * 2 * 2048**3 / (time.perf_counter() - started)
    return rate, (f"{rate / 1e12:.3f} TFLOP/s, a 2048x2048 {dtype} matmul measured on this CPU with "
                  f"{torch.get_num_threads()} thread(s) (no published peak)")


# --------------------------------------------------------------------------- the table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="CPU size: 3x32x32 images, width 16 (default: celeba64.yaml's 3x64x64, width 64)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="per-device batch (celeba64.yaml: 32) (default: %(default)s)")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated: no,bf16,fp16, fp16 needs a GPU (default: no,bf16,fp16 on a GPU, "
                             "no,bf16 on a CPU)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="steps per logging window; the first is warm-up (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=3, help="measured windows per stage (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers of the streaming runs (default: CPUs - 1, from 1 to 4)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 on CPU, torch's choice on a GPU machine)")
    parser.add_argument("--compiled-precisions", default="all",
                        help="precisions that also get a train.compile run: all, none, or e.g. bf16 "
                             "(default: %(default)s)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the peak MFU divides by (default: the GPU's datasheet peak; on a CPU a measured "
                             "matmul rate)")
    parser.add_argument("--run-timeout", type=int, default=900,
                        help="seconds per training run (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (default: none)")
    # one run, in a child process
    parser.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="no", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shards", default=None, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = arguments_of_parent(build_parser(), "one_run", one_run)
    if args is None:  # this process was a child: it measured one run and answered
        return

    import torch
    from loader import shard_set, time_stream

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpus = os.cpu_count() or 1
    if device.type == "cpu" and args.threads is None:
        args.threads = 1
        torch.set_num_threads(1)
    if args.workers is None:
        args.workers = max(1, min(4, cpus - 1))
    precisions = (args.precisions or ("no,bf16,fp16" if device.type == "cuda" else "no,bf16")).split(",")
    if device.type == "cpu" and "fp16" in precisions:
        print("fp16 skipped: Accelerate runs fp16 only on a GPU")
        precisions.remove("fp16")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpus} cores)"

    steps_per_run = args.warmup * (1 + args.windows)
    samples_needed = 2 * steps_per_run * args.batch_size  # both stages, one epoch: no mid-run reshuffle restart
    with tempfile.TemporaryDirectory(prefix="gapm-throughput-") as tmp:
        size = max(samples_needed, 4096)  # also enough for a steady per-worker decode rate
        spec, _ = shard_set(tmp, size, image_side(args), samples_per_shard=size // 16)
        decode = time_stream(spec, batch_size=args.batch_size, workers=1, shuffle_buffer=1000)
        per_worker = decode["samples"] / decode["workers_cpu"]
        progress(f"loader: one worker decodes {per_worker:.0f} samples per CPU-second")
        flops = stage1_flops(args, device)
        rows = []
        for precision in precisions:
            peak, peak_text = peak_flops(precision, device, args.peak_tflops)
            synthetic = run_child(args, precision=precision)
            compiled = (run_child(args, precision=precision, compile=True)
                        if args.compiled_precisions == "all" or precision in args.compiled_precisions.split(",")
                        else None)
            streaming = run_child(args, precision=precision, shards=spec)
            for stage in (1, 2):
                row = {"stage": stage, "precision": precision, "synthetic": synthetic[stage],
                       "compiled": compiled[stage] if compiled else None, "streaming": streaming[stage],
                       "workers": args.workers, "workers_needed": math.ceil(synthetic[stage] / per_worker)}
                if stage == 1:
                    achieved = flops * synthetic[stage] / args.batch_size
                    row.update(flops_per_iteration=flops, achieved_tflops=achieved / 1e12, mfu=achieved / peak,
                               peak=peak_text)
                rows.append(row)

    side = image_side(args)
    width = 16 if args.small else 64
    print(f"throughput benchmark: {device_name}, {side}x{side} RGB, width {width}, batch {args.batch_size}, "
          f"torch {torch.__version__}{f', {args.threads} torch thread(s)' if args.threads else ''}; "
          f"{args.windows} windows of {args.warmup} steps after one warm-up window")
    print(f"loader: one worker decodes {per_worker:.0f} samples per CPU-second ({side}x{side} PNG); "
          f"streaming runs use {args.workers} worker(s)")
    print(f"stage-1 iteration: {flops / 1e9:.2f} GFLOP (2 critic + 1 autoencoder update, batch {args.batch_size})")
    print()
    print("| stage | precision | samples/s synthetic | compiled (x eager) | streaming, "
          f"{args.workers} worker(s) | workers to keep up | stage-1 TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        compiled_text = (f"{row['compiled']:.0f} ({row['compiled'] / row['synthetic']:.2f}x)"
                         if row["compiled"] else "not run")
        bound = " (input-bound)" if row["streaming"] < 0.9 * row["synthetic"] else ""
        mfu = (f"{row['achieved_tflops']:.3f} | {100 * row['mfu']:.1f}%" if row["stage"] == 1 else "- | -")
        print(f"| {row['stage']} | {row['precision']} | {row['synthetic']:.0f} | {compiled_text} | "
              f"{row['streaming']:.0f}{bound} | {row['workers_needed']} | {mfu} |")
    print()
    for row in rows:
        if row["stage"] == 1:
            print(f"MFU peak for {row['precision']}: {row['peak']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "batch_size": args.batch_size, "image_side": side, "width": width,
                       "decode_per_worker_cpu_s": per_worker, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

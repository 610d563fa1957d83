"""The `gapm` command line. Every failure the user can fix ends in one line on stderr
naming the problem and the fix, and a non-zero exit code.

Training's stop signals must be caught before torch is imported (seconds; see `main`), so
this module and the ones it imports at its top (cli_arguments, eval_commands,
matrix_commands, exit_codes, stopping, console, redaction) load neither torch nor MLflow: each
command imports what it runs when it runs, the imports marked "deferred".
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from pipeline import console, launcher
from pipeline.cli_arguments import (
    add_config_arguments,
    mlflow_environment,
    positive_int,
)
from pipeline.data.settings import SWISSROLL_SAMPLES, SWISSROLL_TEST_SAMPLES
from pipeline.errors import GapmError
from pipeline.eval_commands import add_evaluation_commands
from pipeline.exit_codes import EXIT_BAD_INPUT, launched, record_exit_reason
from pipeline.matrix_commands import add_matrix_commands
from pipeline.redaction import redact
from pipeline.stopping import EXIT_RESUMABLE, StopRequest, TrainingInterrupted


def command_train(args: argparse.Namespace, stop=None) -> int:
    from pipeline.config import load_config, training_job  # deferred
    from pipeline.train.loop import train  # deferred

    config = load_config(args.config, args.overrides)
    try:
        result = train(training_job(config), resume=args.resume, stop=stop)
    finally:
        import torch.distributed  # deferred

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if result.metrics:  # every rank returns; rank 0 has the whole result and says it
        console.report("metrics: " + ", ".join(f"{k}={v:.5g}" for k, v in sorted(result.metrics.items())),
                       f"run directory: {result.run_dir}")
    return 0


def command_shards(args: argparse.Namespace) -> int:
    from pipeline.data.shards import convert_dataset  # deferred

    manifests = convert_dataset(
        args.dataset, args.src, args.out, split=args.split, image_format=args.format,
        jpeg_quality=args.jpeg_quality, samples_per_shard=args.samples_per_shard, limit=args.limit,
        celeba_crop=args.celeba_crop, seed=args.seed, swissroll_samples=args.swissroll_samples)
    for split, manifest in manifests.items():
        print(f"{split}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards -> "
              f"{args.out.rstrip('/')}/{split}/ (manifest.json)")
    return 0


# `gapm report`'s default folder: under the default output_dir, never a tracked path of the repository
DEFAULT_REPORT_DIR = Path("runs") / "reports"


def command_report(args: argparse.Namespace) -> int:
    from pipeline.eval.report import write_report  # deferred

    mlflow_environment()  # before MLflow is touched: without it MLflow would create ./mlflow.db

    run_names = [name.strip() for name in args.runs.split(",") if name.strip()] if args.runs else None
    written = write_report(args.experiment, Path(args.out), run_names, args.name)
    print(written["markdown"].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def command_show_config(args: argparse.Namespace) -> int:
    from pipeline.config import dump_config, load_config  # deferred

    if args.reference:
        from pipeline.config_reference import reference_markdown  # deferred

        print(reference_markdown(), end="")
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def command_register(args: argparse.Namespace) -> int:
    from pipeline.tracking.registry import register_run_model  # deferred

    mlflow_environment()
    version = register_run_model(args.run_id, args.alias, args.name)
    print(f"models:/{version.name}@{args.alias} -> version {version.version} (run {args.run_id})")
    return 0


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


def command_sample(args: argparse.Namespace) -> int:
    import numpy as np  # deferred

    import gapm  # deferred
    from pipeline.eval import figures  # deferred
    from pipeline.tracking import registry  # deferred

    out = Path(args.out)
    if out.suffix.lower() not in PICTURE_SUFFIXES:
        raise GapmError(f"--out {args.out}: expected a picture file name ending in {', '.join(PICTURE_SUFFIXES)}, "
                        "e.g. samples.png (the samples also go to the same name with .npy)")
    mlflow_environment(args.model_uri)
    model = registry.load_generator(args.model_uri)
    samples = gapm.sample(model, args.n, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    array_path = out.with_suffix(".npy")
    np.save(array_path, samples.numpy())
    if model.shape.is_image:
        figures.save_image_grid(samples, out)
    else:
        figures.save_point_scatter(samples, out, title=f"{args.model_uri} (seed {args.seed})")
    print(f"wrote {out} and {array_path}: {args.n} samples of {args.model_uri} (seed {args.seed})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gapm", description=__doc__.split(".")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train stage 1 then stage 2 of one experiment")
    add_config_arguments(train)
    train.add_argument("--resume", default="auto",
                       help="'auto' (latest complete checkpoint of this run, default), 'never', "
                            "or a checkpoint directory")
    train.set_defaults(handler=command_train)

    shards = commands.add_parser("shards", help="convert a dataset into WebDataset shards (local dir or s3://)",
                                 description="Convert a dataset into WebDataset shards, one shard set per split "
                                             "(OUT/train, OUT/test, ...), each with a manifest.json.")
    shards.add_argument("dataset", choices=["cifar10", "celeba", "mnist", "fashion-mnist", "swissroll", "swissroll3d"])
    shards.add_argument("src", help="source directory in the dataset's original layout ('-' for the swiss rolls)")
    shards.add_argument("out", help="output directory or s3://bucket/prefix; splits go to OUT/train, OUT/test")
    shards.add_argument("--split", help="convert only this split (default: all splits)")
    shards.add_argument("--image-format", "--format", dest="format", default="png", choices=["png", "jpg", "raw"],
                        help="how images are stored: png (lossless), jpg, or raw uint8 pixels (.npy: no decode "
                             "when read; for tiny images and a CPU-bound input) (default: %(default)s)")
    shards.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality 1-100 (default: %(default)s)")
    shards.add_argument("--samples-per-shard", type=positive_int, default=10000,
                        help="samples per tar file (default: %(default)s)")
    shards.add_argument("--limit", type=positive_int,
                        help="keep only the first N samples of each split (default: every sample)")
    shards.add_argument("--celeba-crop", default="center178", choices=["center178", "authors"],
                        help="center178: CenterCrop(178)+Resize(64) (Mimicry); authors: resize 64x78, rows 7-71 "
                             "(default: %(default)s)")
    shards.add_argument("--seed", type=int, default=0, help="swiss-roll sampler seed (default: %(default)s)")
    shards.add_argument("--swissroll-samples", type=positive_int, default=SWISSROLL_SAMPLES,
                        help=f"training points of the swiss rolls; their test split has {SWISSROLL_TEST_SAMPLES} "
                             "(default: %(default)s)")
    shards.set_defaults(handler=command_shards)

    report = commands.add_parser("report", help="table + figure grid of every run of an MLflow experiment")
    report.add_argument("--experiment", required=True, help="MLflow experiment (tracking.experiment of the configs)")
    report.add_argument("--out", default=str(DEFAULT_REPORT_DIR),
                        help="directory for NAME.md, NAME.csv, NAME-figures.png (default: %(default)s, beside "
                             "the run directories and ignored by git; the committed reports are written to "
                             "docs/reports only when asked: --out docs/reports)")
    report.add_argument("--runs", default=None,
                        help="comma-separated run names to include, in this order (default: every run)")
    report.add_argument("--name", default=None, help="NAME of the written files (default: the experiment)")
    report.set_defaults(handler=command_report)

    show = commands.add_parser("config", help="print the resolved config (or the reference of every key)")
    add_config_arguments(show)
    show.add_argument("--reference", action="store_true",
                      help="print the config reference (Markdown: every key, its type, default and meaning)")
    show.set_defaults(handler=command_show_config)

    register = commands.add_parser(
        "register", help="register a run's trained model in the MLflow registry and set an alias")
    register.add_argument("run_id", help="the MLflow run id (in RUN_DIR/mlflow_run_id)")
    register.add_argument("--alias", required=True, help="alias to point at it, e.g. champion")
    register.add_argument("--name", help="registered model name (default: the run's "
                                         "tracking.registered_model_name, gapm-<experiment>)")
    register.set_defaults(handler=command_register)

    sample = commands.add_parser("sample", help="generate samples from a registered model or checkpoint")
    sample.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, "
                                          "a checkpoint (directory or s3:// URL), or a run directory "
                                          "(runs/NAME: its newest complete checkpoint)")
    sample.add_argument("-n", type=positive_int, default=64, help="number of samples (default 64)")
    sample.add_argument("--out", required=True, metavar="X.png",
                        help="picture to write (.png or .jpg): an 8-column image grid, or a scatter plot of "
                             "points; the samples also go to X.npy (the same name with .npy)")
    sample.add_argument("--seed", type=int, default=0, help="prior noise seed (default 0)")
    sample.set_defaults(handler=command_sample)

    add_evaluation_commands(commands)
    add_matrix_commands(commands)
    # Dispatched by main() before this parser runs: accelerate's own parser reads the rest.
    commands.add_parser("launch", add_help=False,
                        help="`accelerate launch` (same arguments) that keeps gapm's exit codes: 2 bad input, "
                             "75 resumable (see pipeline/launcher.py)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:
        return launcher.main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as invalid:
        if invalid.code == EXIT_BAD_INPUT:  # argparse has printed the usage and the problem
            record_exit_reason("gapm: invalid command-line arguments (the usage is printed above)")
        raise
    # A write beyond the file-size limit (`ulimit -f`) then fails with EFBIG — one line, resumable
    # — instead of killing the process (CPython ignores SIGXFSZ too; an embedding may not).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Training's stop signals are caught from here on, before the imports of torch & co. (seconds):
    # a stop during start-up also ends with the resumable status.
    stop = StopRequest().__enter__() if args.command == "train" else None
    try:
        console.configure_logging()  # GAPM_LOG_LEVEL; libraries quiet; see pipeline.console
    except GapmError as error:
        return _bad_input(f"gapm: error: {error}")
    try:
        return args.handler(args, stop) if stop is not None else args.handler(args)
    except TrainingInterrupted as stopped:
        if console.is_main_process():  # rank 0 wrote the checkpoint; the others have nothing to add
            print(redact(f"gapm {args.command}: {stopped}"), file=sys.stderr)
            record_exit_reason(redact(f"gapm {args.command}: {stopped}"))
        else:  # its message would say "nothing to save": only rank 0 saves
            record_exit_reason(f"gapm {args.command}: stopped with every rank, resumably "
                               "(rank 0's line names the checkpoint)")
        return EXIT_RESUMABLE
    except GapmError as error:
        if getattr(error, "transient", False):  # storage away for the whole retry budget: not bad input
            message = redact(f"gapm {args.command}: {error}; storage is unavailable, start again later "
                             "(exit 75, resumable)")
            if console.is_main_process():
                print(message, file=sys.stderr)
            record_exit_reason(message)
            return EXIT_RESUMABLE
        return _bad_input(f"gapm {args.command}: error: {error}")
    except FileNotFoundError as error:
        return _bad_input(f"gapm {args.command}: error: {error}")
    except OSError as error:  # a full disk or an unwritable place outside the checkpoints: one line too
        from pipeline.checkpoints import disk_failure  # deferred

        failure = disk_failure(error, Path(error.filename or "."), "files", setting="the output location")
        if failure is None:
            record_exit_reason(redact(f"{type(error).__name__}: {error}"))
            raise
        message = f"gapm {args.command}: error: {failure}"
        print(message, file=sys.stderr)
        record_exit_reason(message)
        return EXIT_RESUMABLE if isinstance(failure, TrainingInterrupted) else EXIT_BAD_INPUT
    except Exception as error:  # a bug: it keeps its traceback; a launcher names it in one line
        record_exit_reason(redact(f"{type(error).__name__}: {error}"))
        raise
    finally:
        if stop is not None:
            stop.__exit__(None, None, None)
            if launched():  # the outcome is decided: torch's agent stops a rank's peers with
                for signum in StopRequest.SIGNALS:  # SIGTERM once that rank exits; not "killed"
                    signal.signal(signum, signal.SIG_IGN)


def _bad_input(message: str) -> int:
    """One line on stderr (and for the launcher, if any) and the bad-input status."""
    message = redact(message)
    print(message, file=sys.stderr)
    record_exit_reason(message)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

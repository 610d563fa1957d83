"""The evaluation subcommands of `gapm`: FID statistics, scoring checkpoints, the scheduled
job and the domain feature extractor (the rest of the command line is pipeline/cli.py).

Building the parser must stay light (`gapm train` installs its stop handler before torch is
imported, pipeline/cli.py): this module imports at its top only what loads neither torch nor
MLflow, and each command imports the modules it runs when it runs (the imports marked
"deferred").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline import console
from pipeline.cli_arguments import (
    add_config_arguments,
    mlflow_environment,
    positive_int,
)
from pipeline.errors import GapmError
from pipeline.eval.settings import EvalConfig, EvalSettings


def command_fid_stats(args: argparse.Namespace) -> int:
    from pipeline.config import load_config  # deferred
    from pipeline.data import streaming  # deferred
    from pipeline.eval import fid, reference_stats  # deferred

    if not reference_stats.is_plain_name(args.name):
        raise GapmError(f"--name {args.name!r}: expected a plain name such as fashion-mnist-train")
    config = load_config(args.config, args.overrides) if (args.config or args.overrides) else None
    directory = stats_directory(config)
    device = torch_device(args.device)
    extractor = fid.load_extractor(args.feature_extractor, inception_weights=args.inception_weights, device=device)
    batch_size = args.batch_size or EvalSettings.batch_size
    if args.test_data:  # a wrong URL fails now, not after the (long) training statistics
        streaming.resolve_shard_urls(args.test_data)
    stats = reference_stats.compute_reference_stats(args.data, extractor, args.name, limit=args.limit,
                                                    batch_size=batch_size, kid_features=args.kid_features,
                                                    real_features=args.real_features)
    if args.test_data:
        reference_stats.compute_floor(stats, args.test_data, extractor, limit=args.test_limit, batch_size=batch_size)
    location = reference_stats.save_reference_stats(stats, directory, out=args.out)
    use = (f"--stats {args.name} in this experiment (statistics directory {directory}), --stats {location} "
           "anywhere") if location == reference_stats.stats_location(args.name, directory) else f"--stats {location}"
    console.report(f"wrote {location}",
                   f"{args.name}: {stats.count} images {stats.image_shape} of {args.data}, features "
                   f"{stats.feature_extractor_id} (dim {len(stats.mu)}), clean-fid mode {stats.mode}; use with {use}",
                   floor_line(stats.floor))
    return 0


def floor_line(floor: dict | None) -> str:
    """What a perfect sampler would score: the floor of the statistics, in one line."""
    if floor is None:
        return "no floor (pass --test-data TEST_URL for the real-vs-real FID floor and memorisation reference)"
    line = f"FID floor {floor['fid']:.4g} ({floor['samples']} images of {floor['data']} against these statistics)"
    if "precision" in floor:
        line += (f"; real vs real at {floor['prdc_samples']} each: precision {floor['precision']:.3f}, recall "
                 f"{floor['recall']:.3f}, density {floor['density']:.3f}, coverage {floor['coverage']:.3f}; median "
                 f"test-to-train distance {floor['test_train_distance']:.4g}")
    return line


def stats_directory(config) -> str:
    """The experiment's statistics directory: eval.fid_stats_dir, $GAPM_FID_STATS_DIR, OUTPUT_DIR/fid-stats."""
    from pipeline.eval import reference_stats  # deferred

    if config is None:
        return reference_stats.stats_directory()
    return reference_stats.stats_directory(config.eval.fid_stats_dir, config.output_dir)


def eval_settings(args: argparse.Namespace, config=None):
    """The scoring settings: the config's `eval` section (or its defaults), command-line flags first."""
    stats = args.stats or []  # --stats repeated: the primary feature space, then further ones
    return EvalSettings.from_config(
        config.eval if config is not None else None, stats=stats[0] if stats else None,
        extra_stats=stats[1:] if stats else None, fid_seeds=args.fid_seeds, prdc_samples=args.prdc_samples,
        samples=args.n,
        kid=True if args.kid else None, feature_extractor=args.feature_extractor,
        inception_weights=args.inception_weights, test_data=args.test_data, seed=args.seed,
        batch_size=args.batch_size, device=args.device,
        # None: `gapm eval` looks where the checkpoint's run keeps them, eval-watch in the default place
        stats_dir=stats_directory(config) if config is not None else None)


def format_metrics(metrics: dict[str, float]) -> str:
    """`key=value, ...`, every value as measured and as MLflow holds it. (KID is not scaled by
    1000 as papers print Inception KIDs: in a domain feature space its scale is another one, and
    a scaled number would differ from the metric the run and `gapm report` show.)"""
    return ", ".join(f"{key}={value:.6g}" for key, value in sorted(metrics.items()))


def print_metrics(record: dict) -> None:
    where = f"run {record['run_id']}" if record.get("run_id") else "not logged"
    console.report(f"step {record['step']}: {format_metrics(record['metrics'])} "
                   f"[{record['reference_description']}; {where}]")


def command_eval(args: argparse.Namespace) -> int:
    from pipeline.config import load_config  # deferred
    from pipeline.data import storage  # deferred
    from pipeline.eval.jobs import run_eval  # deferred

    mlflow_environment(args.target)
    config = load_config(args.config, args.overrides) if (args.config or args.overrides) else None
    record = run_eval(args.target, eval_settings(args, config), run_id=args.run_id, log_to_mlflow=not args.no_log)
    if record is not None:  # rank 0
        print_metrics(record)
        if args.json:
            storage.write_bytes(args.json, json.dumps(record, indent=1).encode())
    return 0


def command_eval_watch(args: argparse.Namespace) -> int:

    from pipeline.config import load_config  # deferred
    from pipeline.eval.scoring import EvalError  # deferred
    from pipeline.eval.watch import CLAIMS_ENV, WatchOptions, watch  # deferred
    from pipeline.tracking.mlflow_sink import EMBEDDED_DB, resolve_tracking_uri  # deferred

    config = load_config(args.config, args.overrides) if (args.config or args.overrides) else None
    experiments = args.experiment or ([config.tracking.experiment or config.name] if config is not None else None)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri and config is not None:
        if not (config.run_dir / EMBEDDED_DB).is_file():
            print(f"nothing to evaluate: no MLflow store at {config.run_dir / EMBEDDED_DB} yet "
                  "(MLFLOW_TRACKING_URI is not set and the run has not started)")
            return 0
        tracking_uri = resolve_tracking_uri(config.run_dir)[0]
    if not tracking_uri:
        raise EvalError("MLFLOW_TRACKING_URI is not set; point it at the MLflow server, or pass --config "
                        "to use the run's embedded store")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    claims = args.claims or os.environ.get(CLAIMS_ENV) or str(
        Path(config.output_dir if config is not None else "runs") / ".eval-claims")
    options = WatchOptions(
        experiments=experiments, claims=claims, tracking_uri=tracking_uri,
        run_names=[config.name] if config is not None else None,
        alias=args.alias or (config.eval if config is not None else EvalConfig()).champion_alias,
        claim_ttl_s=args.claim_ttl, max_evaluations=args.max_evaluations,
        data=config.data if config is not None else None, data_seed=config.seed if config is not None else None)

    def report(summary) -> None:
        for record in summary.evaluated:
            print_metrics(record)
        for line in summary.busy:
            print(f"skipped (another job has it): {line}")
        for name, state in sorted(summary.champions.items()):
            print(f"models:/{name}@{options.alias}: {state}")
        for line in summary.failed:
            print(f"failed: {line}", file=sys.stderr)
        if summary.did_nothing and not summary.failed:
            print("nothing new to evaluate")

    summary = watch(eval_settings(args, config), options, once=args.once, interval_s=args.interval, report=report)
    return 1 if summary.failed else 0


def command_train_feature_extractor(args: argparse.Namespace) -> int:
    from pipeline.eval import features as fe  # deferred

    images, labels = fe.labelled_images(args.data, args.limit)
    test = fe.labelled_images(args.test_data, args.test_limit) if args.test_data else None
    network, report = fe.train_domain_classifier(
        images, labels, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, feature_dim=args.feature_dim,
        architecture=args.architecture, seed=args.seed, test=test)
    extra = {"dataset": args.data, "train_samples": str(report.train_samples),
             "train_accuracy": f"{report.train_accuracy:.4f}"}
    if report.test_accuracy is not None:
        extra.update(test_dataset=args.test_data, test_accuracy=f"{report.test_accuracy:.4f}")
    digest = fe.save_domain_extractor(network, args.out, extra)
    test_text = f", test accuracy {report.test_accuracy:.4f}" if report.test_accuracy is not None else ""
    print(f"wrote {args.out} (sha256 {digest[:16]}, {args.architecture}, seed {args.seed}): {report.train_samples} "
          f"images, train accuracy "
          f"{report.train_accuracy:.4f}{test_text}, {report.seconds:.0f}s; use with --feature-extractor {args.out}")
    return 0


def torch_device(name: str | None):
    import torch  # deferred

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def feature_arguments(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument("--feature-extractor", metavar="inception|PATH",
                        help=f"'inception' (clean-fid) or a file from `gapm train-feature-extractor` "
                             f"(path or s3:// URL); {default_help}")
    parser.add_argument("--inception-weights", metavar="PATH_OR_S3",
                        help="inception-2015-12-05.pt for offline machines (default: $GAPM_INCEPTION_WEIGHTS, "
                             "then /tmp/inception-2015-12-05.pt, then one download attempt)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--batch-size", type=positive_int,
                        help=f"images per batch (default {EvalSettings.batch_size})")

def scoring_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stats", metavar="NAME_OR_URL", action="append",
                        help="reference statistics: a name from `gapm fid-stats` (NAME.npz in the experiment's "
                             "statistics directory), an .npz path or s3:// URL, or cleanfid:DATASET/SPLIT/RES "
                             "(clean-fid's published ones; needs network once). Repeat it for further feature "
                             "spaces, [LABEL=]NAME_OR_URL, scored under eval/LABEL/ (default: eval.fid_stats "
                             "and eval.extra_fid_stats)")
    parser.add_argument("-n", type=positive_int, help=f"generated samples for FID (default: eval.fid_samples, "
                                                      f"{EvalConfig.fid_samples})")
    parser.add_argument("--fid-seeds", type=positive_int,
                        help=f"sets of -n samples, seeds SEED, SEED+1, ...: eval/fid is their mean, eval/fid_std "
                             f"their spread (default: eval.fid_seeds, {EvalConfig.fid_seeds})")
    parser.add_argument("--prdc-samples", type=positive_int,
                        help=f"generated and real features for precision/recall/density/coverage and the "
                             f"memorisation ratio (default: eval.prdc_samples, {EvalConfig.prdc_samples})")
    parser.add_argument("--test-data", metavar="URL",
                        help="test shards for the reconstruction MSE (default: the run's data.test)")
    parser.add_argument("--kid", action="store_true", help="also compute KID")
    parser.add_argument("--seed", type=int, default=0, help="prior noise seed (default 0)")
    feature_arguments(parser, "default: the one the statistics were computed with")


def add_evaluation_commands(commands) -> None:
    stats = commands.add_parser("fid-stats", help="FID reference statistics (clean-fid, mode clean) of a shard set")
    stats.add_argument("data", metavar="DATA_URL", help="shard set: directory or s3:// prefix with manifest.json")
    stats.add_argument("--name", required=True,
                       help="name to use with --stats; written as NAME.npz into the experiment's statistics "
                            "directory: eval.fid_stats_dir of --config, else $GAPM_FID_STATS_DIR, else "
                            "OUTPUT_DIR/fid-stats (output_dir of --config, default runs)")
    add_config_arguments(stats)
    stats.add_argument("--out", metavar="URL", help="write there instead: an .npz path/URL, or a directory / s3:// "
                                                    "prefix that gets NAME.npz")
    stats.add_argument("--limit", type=positive_int, help="use only the first N images")
    stats.add_argument("--kid-features", type=int, default=5000,
                       help="feature vectors kept in the file for KID (default 5000; 0: none)")
    stats.add_argument("--real-features", type=int, default=10000,
                       help="a random sample of training features kept in the file, the real side of precision/"
                            "recall/density/coverage and memorisation (default 10000; 0: none)")
    stats.add_argument("--test-data", metavar="URL",
                       help="held-out images (the test shards): record the FID floor (their FID against these "
                            "statistics) and the memorisation reference")
    stats.add_argument("--test-limit", type=positive_int,
                       help="use only the first N held-out images (default: all; match the FID sample count)")
    feature_arguments(stats, "default: inception")
    stats.set_defaults(handler=command_fid_stats)

    evaluate = commands.add_parser("eval", help="score one checkpoint or model (FID, reconstruction MSE) "
                                                "and log the results to its MLflow run")
    evaluate.add_argument("target", metavar="CHECKPOINT_OR_MODEL_URI",
                          help="checkpoint directory or s3:// URL, a run directory (runs/NAME: its newest "
                               "complete checkpoint), runs:/RUN_ID/checkpoints/step-XXXXXXXX, "
                               "runs:/RUN_ID/model, models:/NAME@ALIAS, models:/NAME/VERSION")
    scoring_arguments(evaluate)
    add_config_arguments(evaluate, "experiment YAML whose eval section gives the defaults and whose "
                                   "statistics directory --stats NAME is read from (default: the checkpoint's run)")
    evaluate.add_argument("--run-id", help="MLflow run to log to (default: found from the checkpoint)")
    evaluate.add_argument("--no-log", action="store_true", help="print only, log nothing to MLflow")
    evaluate.add_argument("--json", metavar="PATH", help="also write the result as JSON (path or s3:// URL)")
    evaluate.set_defaults(handler=command_eval)

    watch = commands.add_parser("eval-watch", help="the scheduled job: score every checkpoint in MLflow not yet "
                                                   "scored, move the registry alias to the best")
    add_config_arguments(watch)
    watch.add_argument("--once", action="store_true", help="one pass, then exit (cron, CronJob, Slurm)")
    watch.add_argument("--interval", type=float, default=600.0, help="seconds between passes (default 600)")
    watch.add_argument("--experiment", action="append", metavar="NAME",
                       help="MLflow experiment to watch; repeatable (default: the config's tracking.experiment "
                            "or name, and only the config's run; else every experiment with gapm runs)")
    scoring_arguments(watch)
    watch.add_argument("--alias", help=f"registry alias for the best model (default: eval.champion_alias, "
                                       f"{EvalConfig.champion_alias})")
    watch.add_argument("--claims", metavar="URL",
                       help="where jobs claim checkpoints: a directory every job sees, or s3://bucket/prefix "
                            "(default: $GAPM_EVAL_CLAIMS, else OUTPUT_DIR/.eval-claims)")
    watch.add_argument("--claim-ttl", type=float, default=900.0,
                       help="seconds before a crashed job's claim may be taken over (default 900)")
    watch.add_argument("--max-evaluations", type=positive_int, help="at most this many checkpoints per pass")
    watch.set_defaults(handler=command_eval_watch)

    add_feature_extractor_command(commands)


def add_feature_extractor_command(commands) -> None:
    extractor = commands.add_parser("train-feature-extractor",
                                    help="train a small classifier (CNN or ResNet) on labelled shards; its features "
                                         "give FID without Inception")
    extractor.add_argument("data", metavar="DATA_URL", help="labelled training shards (e.g. fashion-mnist train)")
    extractor.add_argument("--out", required=True, help="safetensors file to write (path or s3:// URL)")
    extractor.add_argument("--test-data", metavar="URL", help="labelled test shards: report the accuracy")
    extractor.add_argument("--epochs", type=positive_int, default=5)
    extractor.add_argument("--batch-size", type=positive_int, default=128)
    extractor.add_argument("--lr", type=float, default=1e-3)
    extractor.add_argument("--feature-dim", type=positive_int, default=128, help="feature size (default 128)")
    extractor.add_argument("--limit", type=positive_int, help="train on the first N images only")
    extractor.add_argument("--test-limit", type=positive_int)
    extractor.add_argument("--architecture", choices=["cnn", "resnet"], default="cnn",
                           help="cnn: conv blocks + max-pool (default); resnet: residual blocks with BatchNorm and "
                                "global pooling. A second, independent feature space: --architecture resnet --seed 1")
    extractor.add_argument("--seed", type=int, default=0)
    extractor.set_defaults(handler=command_train_feature_extractor)

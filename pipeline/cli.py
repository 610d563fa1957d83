"""The `gapm` command line. Every failure the user can fix ends in one line on stderr
naming the problem and the fix, and a non-zero exit code."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.config import ConfigError, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (see configs/); omitted: built-in defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set stage1.steps=100 (repeatable)")


def command_train(args: argparse.Namespace) -> int:
    from pipeline.train import train

    config = load_config(args.config, args.overrides)
    result = train(config, resume=args.resume)
    if result.metrics:
        print("metrics: " + ", ".join(f"{k}={v:.5g}" for k, v in sorted(result.metrics.items())))
        print(f"run directory: {result.run_dir}")
    return 0


def command_show_config(args: argparse.Namespace) -> int:
    from pipeline.config import dump_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
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

    show = commands.add_parser("config", help="print the resolved config")
    add_config_arguments(show)
    show.set_defaults(handler=command_show_config)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'fix your input', reported without a traceback."""
    from pipeline.checkpoints import CheckpointError

    errors: list[type[BaseException]] = [ConfigError, CheckpointError, FileNotFoundError]
    try:
        from pipeline.storage import StorageError

        errors.append(StorageError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("GAPM_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from pipeline.distributed import EXIT_RESUMABLE, TrainingInterrupted

    try:
        return args.handler(args)
    except TrainingInterrupted as stopped:
        print(f"gapm {args.command}: {stopped}", file=sys.stderr)
        return EXIT_RESUMABLE
    except user_errors() as error:
        print(f"gapm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

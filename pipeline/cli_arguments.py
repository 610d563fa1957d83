"""Argument helpers shared by the `gapm` subcommands (pipeline/cli.py, pipeline/eval_commands.py)."""

from __future__ import annotations

import argparse
import os


def add_config_arguments(parser: argparse.ArgumentParser,
                         what: str = "experiment YAML (see configs/); omitted: built-in defaults") -> None:
    parser.add_argument("--config", help=what)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set stage1.steps=100 (repeatable)")


def mlflow_environment(model_uri: str | None = None) -> None:
    """Registry commands talk to MLFLOW_TRACKING_URI; without it MLflow would quietly create a
    new, empty ./mlflow.db. Short HTTP retries: a wrong or dead server fails in seconds."""
    # deferred, as every import of the command line that loads torch or MLflow (pipeline/cli.py)
    from pipeline.checkpoints import is_remote  # deferred
    from pipeline.tracking.registry import RegistryError, is_local  # deferred

    registry_uri = model_uri is None or not (is_local(model_uri) or is_remote(model_uri))
    if registry_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise RegistryError("MLFLOW_TRACKING_URI is not set; point it at the MLflow server "
                            "(http://host:5000) or at a run's embedded store "
                            "(sqlite:///runs/NAME/mlflow.db)")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)

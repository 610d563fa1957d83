"""What the `gapm` commands show on the terminal: one voice, gapm's own messages, progress.

* Ranks. Under `accelerate launch` / `torchrun` every process runs the same command; only rank 0
  (torch.distributed's rank, else the launcher's RANK variable) prints results and draws
  progress bars. The other ranks log warnings and errors only, prefixed with their rank.
* Levels. GAPM_LOG_LEVEL (default INFO) is the level of gapm's own loggers (`pipeline`,
  `gapm`). Libraries (botocore's "Found credentials ...", MLflow's notices, their deprecation
  warnings) show warnings and errors only, unless GAPM_LOG_LEVEL=DEBUG, which shows everything.
* Progress bars: tqdm on stderr with counts and rates; in batch logs (no terminal: Slurm,
  Kubernetes, CI) they redraw every 30 s instead of 10 times a second. TQDM_DISABLE=1 hides them.
* Secrets: every log record (any library's) and every line on stdout/stderr (MLflow prints its
  "View run ... at: URL" itself) is redacted: passwords in URLs, tokens, keys
  (pipeline.redaction).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

from tqdm.auto import tqdm

from pipeline.errors import GapmError
from pipeline.redaction import (
    install_log_redaction,
    install_stdout_redaction,
    redact,
)

LOG_LEVEL_ENV = "GAPM_LOG_LEVEL"
OWN_LOGGERS = ("pipeline", "gapm")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
BATCH_LOG_REDRAW_S = 30.0  # a redraw in a batch log is a new line
_HANDLER_NAME = "gapm-console"


def process_rank() -> int:
    """This process's global rank: torch.distributed's once initialised, else the launcher's
    RANK (accelerate launch and torchrun set it before the process starts), else 0."""
    return _launch_value("get_rank", "RANK", 0)


def world_size() -> int:
    return _launch_value("get_world_size", "WORLD_SIZE", 1)


def _launch_value(getter: str, variable: str, default: int) -> int:
    """torch.distributed's `getter()` once it is initialised (never importing it: the stop
    handler goes in first), else the launcher's `variable`, else `default`."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return getattr(distributed, getter)()
    try:
        return int(os.environ.get(variable, str(default)))
    except ValueError:
        return default


def is_main_process() -> bool:
    return process_rank() == 0


def report(*lines: str) -> None:
    """A command's result, printed to stdout by rank 0 only."""
    if is_main_process():
        for line in lines:
            print(redact(line), flush=True)


def log_level(value: str | None = None) -> int:
    name = (value if value is not None else os.environ.get(LOG_LEVEL_ENV, "INFO")).strip().upper() or "INFO"
    if name not in LEVELS:
        raise GapmError(f"{LOG_LEVEL_ENV}={name}: expected one of {', '.join(LEVELS)}")
    return logging.getLevelName(name)


def configure_logging(level_name: str | None = None) -> None:
    """One handler on stderr; gapm's loggers at GAPM_LOG_LEVEL on rank 0 (WARNING on the other
    ranks), every library at WARNING unless the level is DEBUG."""
    level = log_level(level_name)
    install_log_redaction()  # before any record: MLflow's and botocore's too
    install_stdout_redaction()
    rank, ranks = process_rank(), world_size()
    own = level if rank == 0 else max(level, logging.WARNING)
    libraries = logging.DEBUG if level == logging.DEBUG else logging.WARNING
    prefix = f"[rank {rank}] " if ranks > 1 else ""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    # Replace only our own handler (a second call reconfigures); leave any others in place.
    root.handlers = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(libraries)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own)
    # MLflow configures its own loggers when it is imported (MLFLOW_LOGGING_LEVEL, default INFO):
    # set the variable for a later import, and the level in case it is imported already.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(libraries))
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])
    # MLflow's own download/upload bars are not rank-aware and not ours to show.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.captureWarnings(True)  # Python warnings go through the same handler
    if level != logging.DEBUG:
        # Deprecation notices are for the developers of the libraries, not for a command's user.
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a redirected or captured stream)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def progress_bar(total: int | None = None, desc: str = "", *, unit: str = "it", enabled: bool = True,
                 initial: int = 0, **options: Any) -> tqdm:
    """A tqdm bar on stderr, drawn by rank 0 only (and only when `enabled` and TQDM_DISABLE is
    unset); `unit` names what is counted ("img", "sample"), so rates read "img/s"."""
    hidden = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                disable=hidden or not enabled or not is_main_process(),
                mininterval=0.1 if sys.stderr.isatty() else BATCH_LOG_REDRAW_S, **options)

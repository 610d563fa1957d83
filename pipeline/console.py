"""What the `gapm` commands show on the terminal: one voice, gapm's own messages, progress.

* Ranks. Under `accelerate launch` / `torchrun` every process runs the same command; only rank 0
  (torch.distributed's rank, else the launcher's RANK variable) prints results and draws
  progress bars. The other ranks log warnings and errors only, prefixed with their rank.
* Levels. GAPM_LOG_LEVEL (default INFO) is the level of gapm's own loggers (`pipeline`,
  `gapm`). Libraries (botocore's "Found credentials ...", MLflow's notices, their deprecation
  warnings) show warnings and errors only, unless GAPM_LOG_LEVEL=DEBUG, which shows everything.
* Progress bars: tqdm on stderr with counts and rates. On a terminal a bar redraws in place
  (at most 10 times a second) and a log record clears it, takes its own line and redraws it
  below. In batch logs (stderr not a terminal: Slurm, Kubernetes, CI) each drawing of a bar is
  a line of its own, at most one per bar every 30 s (and the final one): no carriage returns
  that glue the next log record to a bar, no line per logging window (`set_postfix` callers
  pass refresh=False). TQDM_DISABLE=1 hides them.
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
from tqdm.std import (
    tqdm as plain_tqdm,  # the class that holds every live bar (tqdm.auto's subclasses share it)
)

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
TERMINAL_REDRAW_S = 0.1
CURSOR_UP = "\x1b[A"  # tqdm moves between stacked bars with it
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


def stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a redirected or captured stream).
    On a terminal, a bar being drawn is cleared first and redrawn after the record, so that the
    record starts on its own line (in batch logs every bar line is already complete)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(plain_tqdm, "_instances", None) and stderr_is_terminal():
            with plain_tqdm.external_write_mode(file=sys.stderr):
                super().emit(record)
        else:
            super().emit(record)


class BatchLogLines:
    """The file a bar draws into when stderr is not a terminal. tqdm redraws in place ("\r" and
    the bar, no newline), which a log file keeps as one growing line that the next log record
    is glued to; here every drawing becomes a line of its own, and tqdm's clearing writes
    (blanks, carriage returns, cursor moves, its closing newline) are dropped."""

    @property
    def encoding(self) -> str:  # tqdm draws unicode blocks only where stderr can show them
        return getattr(sys.stderr, "encoding", None) or "ascii"

    def write(self, text: str) -> int:
        drawn = text.replace(CURSOR_UP, "").replace("\r", "\n").split("\n")
        line = next((part.rstrip() for part in reversed(drawn) if part.strip()), "")
        if line:
            sys.stderr.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def progress_bar(total: int | None = None, desc: str = "", *, unit: str = "it", enabled: bool = True,
                 initial: int = 0, **options: Any) -> tqdm:
    """A tqdm bar on stderr, drawn by rank 0 only (and only when `enabled` and TQDM_DISABLE is
    unset); `unit` names what is counted ("img", "sample"), so rates read "img/s". In batch
    logs one line per BATCH_LOG_REDRAW_S at most. miniters=1 turns off tqdm's dynamic
    miniters, and with them its monitor thread's redraws (it redraws a bar whose miniters grew
    above 1 once `maxinterval` passed without a drawing, and the next update draws again: two
    lines in the same second)."""
    hidden = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    disable = hidden or not enabled or not is_main_process()
    if stderr_is_terminal():
        where = dict(file=sys.stderr, dynamic_ncols=True, mininterval=TERMINAL_REDRAW_S)
    else:
        where = dict(file=BatchLogLines(), mininterval=BATCH_LOG_REDRAW_S, miniters=1)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, **where, **options)

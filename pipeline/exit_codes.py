"""gapm's exit-code contract, the same at every layer (gapm, `gapm launch`, the node scripts,
Slurm, Kubernetes):

    0   done
    2   bad input (a config typo, a missing file, ...): fix it; never retried
    75  resumable (EX_TEMPFAIL): checkpointed and stopped (a stop signal, an outage);
        start again and `--resume auto` carries on
    any other non-zero: a failure (a crash, a worker killed by a signal: 128 + its number)

A launcher that runs several processes (or nodes) exits with 2 if any of them exited 2, else 75
if any exited 75, else with the first failure's code; 0 only if all exited 0.

Workers tell their launcher why they stopped through one line in a file: `gapm launch` names
a directory in GAPM_EXIT_REASONS_DIR, and `gapm` writes "rank-<RANK>" there when it exits with
a code the user should read about (`record_exit_reason`). Kept free of heavy imports: the
launcher's argument parsing and every worker's start go through here.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path

from pipeline.stopping import EXIT_RESUMABLE

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1  # generic failure, when nothing more specific is known
REASONS_DIR_ENV = "GAPM_EXIT_REASONS_DIR"
_MAX_REASON_CHARS = 2000


def normalized(code: int) -> int:
    """A process's exit status as a shell reports it: death by signal N (Python's and torch's
    -N) becomes 128 + N."""
    return 128 - code if code < 0 else code


def combined(codes: Iterable[int]) -> int:
    """The launcher's exit code for its processes' codes: 2 over 75 over the first other
    failure; 0 only if every code is 0 (and for no codes at all)."""
    codes = [normalized(code) for code in codes]
    for decisive in (EXIT_BAD_INPUT, EXIT_RESUMABLE):
        if decisive in codes:
            return decisive
    return next((code for code in codes if code != EXIT_OK), EXIT_OK)


def meaning(code: int) -> str:
    """What an exit code tells the scheduler, in words."""
    code = normalized(code)
    if code == EXIT_OK:
        return "done"
    if code == EXIT_BAD_INPUT:
        return "bad input: fix it, retrying cannot help"
    if code == EXIT_RESUMABLE:
        return "resumable: start again to continue from the latest checkpoint"
    if code > 128:
        try:
            return f"failed: killed by {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return "failed"


def launched() -> bool:
    """True in a process that a launcher started: `gapm launch`, torchrun, accelerate launch."""
    return REASONS_DIR_ENV in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def _reason_path(rank: int | str, directory: str | None = None) -> Path | None:
    directory = directory if directory is not None else os.environ.get(REASONS_DIR_ENV)
    return Path(directory) / f"rank-{rank}" if directory else None


def record_exit_reason(message: str) -> None:
    """Leaves `message` (one line) for the launcher that started this process, if any. Never
    raises: a launcher's directory that is gone must not turn a clean exit into a crash."""
    path = _reason_path(os.environ.get("RANK", "0"))
    if path is None:
        return
    line = " ".join(message.split())[:_MAX_REASON_CHARS]
    try:
        path.write_text(line + "\n")
    except OSError:
        pass


def exit_reasons(directory: str) -> Mapping[int, str]:
    """{rank: line} of every process that left a reason in the launcher's `directory`."""
    reasons = {}
    for path in Path(directory).glob("rank-*"):
        rank = path.name.split("-", 1)[1]
        try:
            if rank.isdigit():
                reasons[int(rank)] = path.read_text().strip()
        except OSError:
            continue
    return reasons

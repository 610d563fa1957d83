"""What the benchmarks share: progress lines on stderr as they go, and measurements in fresh
child processes (so that no warm cache, allocator state or imported checkout carries over from
one measurement to the next), each answering its parent with one JSON line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

STARTED = time.perf_counter()


def progress(message: str) -> None:
    """One line on stderr as the benchmark goes, with the seconds since it started."""
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def answer(measurement: Any) -> None:
    """A child's answer to its parent: one JSON line, the last on stdout."""
    print(json.dumps(measurement), flush=True)


def measure_in_child(argv: list[str], *, what: str, env: dict[str, str] | None = None, cwd: Any = None,
                     timeout: float | None = None) -> Any:
    """Runs one child and returns its answer; a failed child ends the benchmark, naming `what`
    failed with the end of the child's stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    if done.returncode != 0:
        sys.exit(f"{what}: the measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def arguments_of_parent(parser: argparse.ArgumentParser, child_flag: str,
                        measure: Callable[[argparse.Namespace], Any]) -> argparse.Namespace | None:
    """The parsed command line of the parent, or None once a child has measured and answered
    (the benchmark script started again with `child_flag`, e.g. "one_run" for --one-run)."""
    args = parser.parse_args()
    if getattr(args, child_flag):
        answer(measure(args))
        return None
    return args

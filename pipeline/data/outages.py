"""What the pipeline does while object storage is unreachable, slow or throttled.

An outage is not damage: nothing is skipped, the same call (or the same byte of a stream) is
tried again until it works or the retry budget is spent, and then the caller gets
:class:`StorageUnavailable` — resumable (training checkpoints and exits 75), never "bad input".

* The budget is ``$GAPM_STORAGE_RETRY_SECONDS`` (training sets it from
  ``train.storage_retry_seconds``; DataLoader workers inherit it), else 600 s, counted from the
  first failure of an outage.
* An outage says what it does (:class:`Outage`): one WARNING line at once (what failed and why,
  how long it is retried, what happens meanwhile and after), then about once a minute (what is
  pending, for how long, what happens next), and one line when storage answers again.
* A stop request (SIGTERM / SIGUSR1, `pipeline.stopping`) ends every wait at once: waits poll
  `stop_requested()` every `POLL_S`. DataLoader workers are separate processes that the signal
  does not reach, so the training process hands its workers a shared flag
  (`worker_stop_flag`) that its stop handler sets.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pipeline import stopping
from pipeline.data.s3 import StorageError, StorageUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_BUDGET_ENV = "GAPM_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_BUDGET_S = 600.0  # an object store restarting or a network blip: minutes, not seconds
REPORT_EVERY_S = 60.0  # an ongoing outage says so about once a minute
POLL_S = 0.2  # how often a wait looks for a stop request
STALL_S = 60.0  # the longest wait for a read to answer before it counts as stalled ...
MIN_STALL_S = 2.0  # ... or the retry budget, when that is shorter, but never less than this
# What an outage message says happens meanwhile and once the budget is spent, unless the thread
# says otherwise (`consequence`): the defaults speak of a training's data reads.
DEFAULT_MEANWHILE = "training waits"
DEFAULT_THEN = "then it gives up and training checkpoints and exits 75 (resumable)"

_context: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar(
    "outage_context", default=(DEFAULT_MEANWHILE, DEFAULT_THEN))


def retry_budget_s() -> float:
    """How long transient storage errors are retried: $GAPM_STORAGE_RETRY_SECONDS (training
    sets it from train.storage_retry_seconds), else 600 s."""
    value = os.environ.get(RETRY_BUDGET_ENV, "")
    try:
        return max(0.0, float(value)) if value else DEFAULT_RETRY_BUDGET_S
    except ValueError:
        return DEFAULT_RETRY_BUDGET_S


@contextlib.contextmanager
def consequence(meanwhile: str, then: str) -> Iterator[None]:
    """What outage messages in this thread say happens meanwhile and once the budget is spent."""
    token = _context.set((meanwhile, then))
    try:
        yield
    finally:
        _context.reset(token)


# --------------------------------------------------------------------------- stop requests

# In a DataLoader worker: the flag its training process sets on a stop. A byte in shared memory,
# read and written without a lock: setting it is safe inside a signal handler.
_worker_stop_flag: Any = None
_flags_to_set: list[weakref.ref] = []  # in the training process: its workers' flags


def stop_requested() -> bool:
    """True once this process, or (in a DataLoader worker) its training process, was asked to stop."""
    flag = _worker_stop_flag
    return (flag is not None and flag.value != 0) or stopping.stop_requested()


def worker_stop_flag() -> Any:
    """A new flag for the workers of one DataLoader: set by this process's stop handler, read by
    `stop_requested()` in the workers (after `use_worker_stop_flag`)."""
    flag = multiprocessing.RawValue("b", 1 if stopping.stop_requested() else 0)
    _flags_to_set[:] = [ref for ref in _flags_to_set if ref() is not None] + [weakref.ref(flag)]
    stopping.on_stop_request(_set_worker_flags)
    return flag


def use_worker_stop_flag(flag: Any) -> None:
    """In a DataLoader worker: take stop requests from `flag` (see worker_stop_flag)."""
    global _worker_stop_flag
    _worker_stop_flag = flag


def _set_worker_flags() -> None:
    for ref in list(_flags_to_set):  # runs in the signal handler: no locks
        flag = ref()
        if flag is not None:
            flag.value = 1


def call_with_deadline(operation: Callable[[], T], seconds: float, what: str) -> T:
    """Runs `operation` on a daemon thread and waits for it at most `seconds`: a request to an
    endpoint that answers a byte at a time never times out by itself. Past the deadline it
    raises a transient StorageError (the thread is left to finish on its own); a stop request
    raises StorageUnavailable at once."""
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = operation()
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="storage-call", daemon=True).start()
    deadline = time.monotonic() + seconds
    while not done.wait(POLL_S):
        if stop_requested():
            raise StorageUnavailable(f"{what}: a stop was requested while it waited for storage")
        if time.monotonic() >= deadline:
            raise StorageError(f"{what}: no answer within {seconds:.0f} s: the request stalled", transient=True)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def wait(seconds: float) -> bool:
    """Sleeps up to `seconds`, in slices; True (at once) if a stop was requested."""
    deadline = time.monotonic() + seconds
    while not stop_requested():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(POLL_S, left))
    return True


# --------------------------------------------------------------------------- one outage


class Outage:
    """One outage of one operation, from its first failure until it ends or gives up: keeps the
    budget, the back-off between attempts and the messages."""

    def __init__(self, what: str, error: str, *, budget_s: float | None = None, started: float | None = None,
                 first_interval_s: float = 0.5, max_interval_s: float = 5.0):
        self.what = what
        self.meanwhile, self.then = _context.get()
        self.budget_s = retry_budget_s() if budget_s is None else budget_s
        self.started = time.monotonic() if started is None else started
        self.next_report = self.started + REPORT_EVERY_S
        self.interval, self.max_interval = first_interval_s, max_interval_s
        self.attempts, self.last_error = 1, error
        log.warning("%s: storage unavailable (%s); retrying for up to %.0f s, %s; %s",
                    what, error, self.budget_s, self.meanwhile, self.then)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def failed_again(self, error: str, pending: str = "") -> None:
        """Another attempt failed; says so about once a minute."""
        self.attempts += 1
        self.last_error = error
        if time.monotonic() >= self.next_report:
            self.next_report = time.monotonic() + REPORT_EVERY_S
            log.warning("%s: storage still unavailable after %.0f s (%d attempts; last: %s)%s; retrying for another "
                        "%.0f s, %s; %s", self.what, self.elapsed(), self.attempts, error,
                        f"; pending: {pending}" if pending else "", max(0.0, self.remaining()), self.meanwhile,
                        self.then)

    def back_off(self) -> None:
        """Waits before the next attempt; raises StorageUnavailable when the budget is spent or a
        stop was requested (then at once)."""
        if self.remaining() <= 0:
            raise self.giving_up()
        if wait(min(self.interval, self.remaining())):
            raise self.giving_up()
        self.interval = min(self.interval * 2, self.max_interval)

    def giving_up(self) -> StorageUnavailable:
        if stop_requested():
            reason = f"a stop was requested while it waited {self.elapsed():.0f} s for storage"
        else:
            reason = (f"storage unavailable for {self.elapsed():.0f} s, the whole retry budget "
                      f"(train.storage_retry_seconds={self.budget_s:g})")
        return StorageUnavailable(f"{self.what}: {reason}; last error: {self.last_error}")

    def ended(self, detail: str = "") -> None:
        log.warning("%s: storage reachable again after %.0f s (%d attempts)%s", self.what, self.elapsed(),
                    self.attempts, f"; {detail}" if detail else "")

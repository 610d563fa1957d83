"""Delivery to a tracking service that may be down: an outbox that never blocks the caller.

The training loop only appends to in-memory queues: metric values and calls (closures that talk
to the service). One background thread delivers them in the order they were logged. When the
service cannot be reached it warns once per outage, keeps metrics (up to `max_buffered_metrics`,
oldest dropped first) and the calls, and retries with a growing interval; when the service is
back everything queued is delivered. A call the service refuses for good (not a transient
error) is dropped with a warning; one that fails transiently while the service answers other
requests is dropped after a few tries. `close` waits for delivery up to `finish_timeout_s`
while the service is unreachable, then reports what is left.

What the service is, is the `Sink`'s business (`pipeline.tracking.mlflow_sink`).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

FAILURES_BEFORE_DROPPING = 3  # a call that fails while the service answers other calls
MetricValue = tuple[int, str, float, int, int]  # (number, key, value, milliseconds, step)


class Sink(Protocol):
    """The service side of an outbox."""

    name: str  # named in warnings, e.g. "MLflow at http://host:5000"

    def connect(self) -> None: ...  # before the first delivery (idempotent): e.g. create the run
    def send_metrics(self, values: list[MetricValue]) -> None: ...
    def answers(self) -> bool: ...  # does the service answer at all right now?
    def reconnected(self) -> None: ...  # after an outage: restart what the outage stopped
    def is_transient(self, error: BaseException) -> bool: ...  # worth retrying later?
    def describe(self, error: BaseException) -> str: ...  # one short line


@dataclass
class Call:
    what: str  # named in warnings
    run: Callable[[], None]
    after: int  # metric values numbered below this were logged before the call: send them first
    failures: int = 0


class Outbox:
    def __init__(self, sink: Sink, *, retry_interval_s: float = 5.0, max_retry_interval_s: float = 60.0,
                 max_buffered_metrics: int = 100_000, max_metrics_per_batch: int = 1000,
                 thread_name: str = "tracking-outbox"):
        self.sink = sink
        self.retry_interval_s, self.max_retry_interval_s = retry_interval_s, max_retry_interval_s
        self.max_buffered_metrics, self.max_metrics_per_batch = max_buffered_metrics, max_metrics_per_batch
        self.calls: collections.deque[Call] = collections.deque()
        self.metrics: collections.deque[MetricValue] = collections.deque()
        self.next_number = 0
        self.dropped_metrics = 0
        self.disabled = False  # a permanent error: nothing more is delivered
        self._lock = threading.Condition()
        self._closing = False
        self._outage = False
        self._next_attempt = 0.0
        self._backoff = retry_interval_s
        self._close_deadline = float("inf")
        self._thread = threading.Thread(target=self._work, name=thread_name, daemon=True)
        self._thread.start()

    # ---- the caller's side: never blocks on the service ----

    def add_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            if self._closing or self.disabled:
                return
            for key, value in metrics.items():
                if len(self.metrics) >= self.max_buffered_metrics:
                    self.metrics.popleft()
                    if self.dropped_metrics == 0:
                        log.warning("%s: more than %d metric values waiting; dropping the oldest "
                                    "(metrics.jsonl in the run directory keeps them all; the next "
                                    "start delivers them)", self.sink.name, self.max_buffered_metrics)
                    self.dropped_metrics += 1
                self.metrics.append((self.next_number, key, float(value), now, int(step)))
                self.next_number += 1
            self._lock.notify_all()

    def add_call(self, what: str, run: Callable[[], None], *, final: bool = False) -> None:
        """Queues `run`; `final` queues it even while closing (the last call, e.g. the status)."""
        with self._lock:
            if (self._closing and not final) or self.disabled:
                return
            self.calls.append(Call(what, run, after=self.next_number))
            self._lock.notify_all()

    def pending(self) -> tuple[int, int]:
        """(calls, metric values) not yet delivered."""
        with self._lock:
            return len(self.calls), len(self.metrics)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Waits until everything queued so far is delivered; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._next_attempt = 0.0
            self._lock.notify_all()
            while self.calls or self.metrics:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.disabled or not self._thread.is_alive():
                    return False
                self._lock.wait(min(remaining, 0.1))
        return True

    def close(self, timeout_s: float) -> None:
        """Stops taking work, delivers what is queued (retrying until `timeout_s` if the service
        is unreachable) and ends the thread."""
        with self._lock:
            self._closing = True
            self._close_deadline = time.monotonic() + timeout_s
            self._next_attempt = 0.0
            self._lock.notify_all()
        self._thread.join()

    # ---- the background thread ----

    def _work(self) -> None:
        while True:
            with self._lock:
                while True:
                    has_work = bool(self.calls or self.metrics)
                    if self._closing and (not has_work or self.disabled):
                        return
                    wait = self._next_attempt - time.monotonic()
                    if has_work and wait <= 0:
                        break
                    self._lock.wait(wait if has_work else None)
            if self._deliver():
                continue
            with self._lock:
                if self._closing and time.monotonic() >= self._close_deadline:
                    return
                self._next_attempt = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, self.max_retry_interval_s)
                if self._closing:
                    self._next_attempt = min(self._next_attempt, self._close_deadline)

    def _deliver(self) -> bool:
        """Sends everything queued; False when the service is unreachable (retry later)."""
        try:
            self.sink.connect()
            self._send_in_order()
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            if not self.sink.is_transient(error):
                self._disable(error)
                return True
            if not self._outage:
                log.warning("%s is unreachable (%s); training goes on, tracking calls are kept and retried "
                            "(metrics: up to %d values)", self.sink.name, self.sink.describe(error),
                            self.max_buffered_metrics)
            self._outage = True
            return False
        if self._outage:
            log.warning("%s is reachable again; delivered what was kept during the outage", self.sink.name)
            self._outage = False
            self.sink.reconnected()
        self._backoff = self.retry_interval_s
        return True

    def _send_in_order(self) -> None:
        """Calls and metric values in the order they were logged."""
        while True:
            with self._lock:
                call = self.calls[0] if self.calls else None
            self._send_metrics(before=call.after if call else None)
            if call is None:
                return
            started = time.monotonic()
            try:
                call.run()
                log.debug("%s: %s took %.2f s", self.sink.name, call.what, time.monotonic() - started)
            except Exception as error:  # noqa: BLE001
                if self.sink.is_transient(error):
                    call.failures += 1
                    if call.failures < FAILURES_BEFORE_DROPPING or not self.sink.answers():
                        raise
                log.warning("%s: could not log %s: %s", self.sink.name, call.what, self.sink.describe(error))
            with self._lock:
                self.calls.popleft()
                self._lock.notify_all()

    def _send_metrics(self, before: int | None) -> None:
        """Sends the queued metric values numbered below `before` (None: all)."""
        while True:
            with self._lock:
                batch = [m for m in itertools.islice(self.metrics, self.max_metrics_per_batch)
                         if before is None or m[0] < before]
            if not batch:
                return
            try:
                self.sink.send_metrics(batch)
            except Exception as error:  # noqa: BLE001
                if self.sink.is_transient(error):
                    raise
                log.warning("%s: dropped %d metric values it refused: %s", self.sink.name, len(batch),
                            self.sink.describe(error))
            last = batch[-1][0]
            with self._lock:
                while self.metrics and self.metrics[0][0] <= last:
                    self.metrics.popleft()
                self._lock.notify_all()

    def _disable(self, error: BaseException) -> None:
        log.warning("%s: tracking is off for this run: %s (the run directory keeps the full record)",
                    self.sink.name, self.sink.describe(error))
        with self._lock:
            self.disabled = True
            self.calls.clear()
            self.metrics.clear()
            self._lock.notify_all()

"""A forward-only reader of one S3 object that rides out outages without changing a byte.

Why: a shard is streamed for minutes, and a dropped connection, an endpoint restarting,
throttling or a read that stalls must neither end it early (skipping samples changes what is
trained) nor start it over (the tar reader has used its first part). So the reader counts the
bytes it has received, and after a failure asks for the rest: a GET with ``Range:
bytes=<offset>-`` and ``If-Match: <ETag of the first response>`` (an object replaced meanwhile
is an error, never a splice of two objects). The outage is handled as pipeline.data.outages
says: retried within the budget, reported at once and about once a minute, StorageUnavailable
when the budget is spent.

Stalls: a socket timeout cannot see an endpoint that sends one byte a second, so one daemon
thread per connection does the network I/O (the GET, then the body in 1 MiB chunks, up to
`READ_AHEAD` chunks ahead of the reader), and the reader waits for each chunk with a deadline:
`STALL_S`, or the retry budget when that is shorter. A stalled connection is abandoned (its
socket shut down where botocore exposes it) and a new one asks for the rest. The waits poll for
stop requests, so SIGTERM during a stuck read is honoured within `outages.POLL_S`.
"""

from __future__ import annotations

import contextlib
import http.client
import queue
import socket
import threading
import time
from typing import Any

import urllib3.exceptions
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.data import outages
from pipeline.data.s3 import (
    StorageError,
    StorageUnavailable,
    s3_client,
    split_s3_url,
    storage_error,
)

CHUNK = 1 << 20
READ_AHEAD = 2  # chunks a connection reads ahead of its reader
STALL_S = outages.STALL_S  # the longest wait for one chunk before the connection counts as stalled
MIN_STALL_S = outages.MIN_STALL_S  # ... however small the retry budget


class _Stalled(Exception):
    """No chunk arrived within the deadline."""


class _StopRequested(Exception):
    """A stop was requested while the reader waited."""


class _Connection:
    """One GET of the object from `offset` on, read by a daemon thread into a small queue of
    ``(kind, value)`` items: ("opened", response), ("data", bytes; b"" at the end), ("error", exc)."""

    def __init__(self, client: Any, bucket: str, key: str, offset: int, etag: str | None):
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=READ_AHEAD)
        self.cancelled = False
        self.body: Any = None
        request = {"Bucket": bucket, "Key": key}
        if offset:
            request["Range"] = f"bytes={offset}-"
        if etag:
            request["IfMatch"] = etag
        threading.Thread(target=self._run, args=(client, request), name="s3-read", daemon=True).start()

    def _run(self, client: Any, request: dict[str, Any]) -> None:
        try:
            response = client.get_object(**request)
            self.body = response["Body"]
            if not self._put(("opened", response)):
                return
            while True:
                data = self.body.read(CHUNK)
                if not self._put(("data", data)) or not data:
                    return
        except BaseException as exc:  # the reader decides what it means
            self._put(("error", exc))
        finally:
            if self.body is not None:
                with contextlib.suppress(Exception):
                    self.body.close()

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self.cancelled:
            try:
                self.items.put(item, timeout=outages.POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def next_item(self, deadline: float) -> tuple[str, Any]:
        while True:
            try:
                return self.items.get(timeout=outages.POLL_S)
            except queue.Empty:
                if outages.stop_requested():
                    raise _StopRequested() from None
                if time.monotonic() >= deadline:
                    raise _Stalled() from None

    def cancel(self) -> None:
        """Abandons the connection; a thread stuck in a read is woken by shutting its socket."""
        self.cancelled = True
        raw = getattr(self.body, "_raw_stream", None)
        sock = getattr(getattr(raw, "_connection", None), "sock", None)
        if sock is None:  # urllib3 has released the connection: the socket behind the body's file
            sock = getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _short_reason(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message') or 'no message'}"
    return f"{type(exc).__name__}: {exc}"


class ResumableObjectStream:
    """``read(size)`` over one S3 object (see the module docstring); close it when done."""

    def __init__(self, url: str, *, budget_s: float | None = None):
        self.url = url
        self._bucket, self._key = split_s3_url(url)
        self._client = s3_client()  # one client per process: creating one costs ~50 ms of CPU
        self._budget = outages.retry_budget_s() if budget_s is None else budget_s
        self._stall = min(STALL_S, max(self._budget, MIN_STALL_S))
        self._received = 0  # bytes taken from connections: handed out, or waiting in _pending
        self._pending = b""
        self._length: int | None = None
        self._etag: str | None = None
        self._outage: outages.Outage | None = None
        self._eof = False
        self._connection = self._connect()
        while self._length is None:  # the first response: fails here for a missing object
            self._next_chunk(opening=True)

    def _connect(self) -> _Connection:
        return _Connection(self._client, self._bucket, self._key, self._received, self._etag)

    # ------------------------------------------------------------------ the file-like part

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while part := self.read(CHUNK):
                parts.append(part)
            return b"".join(parts)
        if not self._pending:
            if self._eof or size == 0:
                return b""
            self._pending = self._next_chunk()
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._connection.cancel()
        self._eof, self._pending = True, b""

    def __enter__(self) -> "ResumableObjectStream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ chunks and outages

    def _next_chunk(self, opening: bool = False) -> bytes:
        """The next chunk of the object (b"" at its end), across as many connections as it takes."""
        while True:
            waited_since = time.monotonic()
            wait_s = self._stall if self._outage is None else max(0.0, min(self._stall, self._outage.remaining()))
            try:
                kind, value = self._connection.next_item(waited_since + wait_s)
                if kind == "error":
                    raise value
            except _StopRequested:
                self._connection.cancel()
                raise StorageUnavailable(f"reading {self.url}: a stop was requested while it waited for storage "
                                         f"(at byte {self._received:,})") from None
            except Exception as exc:
                self._recover(exc, waited_since)
                continue
            if kind == "opened":
                self._opened(value)
                if opening:
                    return b""
                continue
            if not value and self._length is not None and self._received < self._length:
                self._recover(http.client.IncompleteRead(b"", self._length - self._received), waited_since)
                continue
            self._received += len(value)
            if self._outage is not None:
                self._outage.ended(f"reading on from byte {self._received - len(value):,}, nothing skipped")
                self._outage = None
            self._eof = not value
            return value

    def _opened(self, response: dict[str, Any]) -> None:
        if self._etag is None:
            self._etag = str(response.get("ETag") or "") or None
        if self._length is None:  # the first response: no Range, so its length is the object's
            self._length = int(response.get("ContentLength", 0))

    def _recover(self, exc: BaseException, waited_since: float) -> None:
        """After a failed connection: a damaged or missing object raises StorageError at once; an
        outage backs off (StorageUnavailable once the budget is spent) and opens a new connection
        for the rest."""
        self._connection.cancel()
        if isinstance(exc, _Stalled):
            reason = f"no data for {time.monotonic() - waited_since:.0f} s: the read stalled"
        else:
            self._raise_if_not_transient(exc)
            reason = _short_reason(exc)
        pending = f"the rest of the object from byte {self._received:,}" + (
            f" of {self._length:,}" if self._length is not None else "")
        if self._outage is None:
            started = waited_since if isinstance(exc, _Stalled) else None
            self._outage = outages.Outage(f"reading {self.url}", reason, budget_s=self._budget, started=started)
        else:
            self._outage.failed_again(reason, pending)
        self._outage.back_off()
        if self._length is not None and self._received >= self._length:
            self._connection = _Finished()  # everything arrived; only the end went missing
        else:
            self._connection = self._connect()

    def _raise_if_not_transient(self, exc: BaseException) -> None:
        if isinstance(exc, (ClientError, BotoCoreError, StorageError)):
            error = exc if isinstance(exc, StorageError) else storage_error(self.url, exc, self._client)
            if error.transient:
                return
            code = str(exc.response.get("Error", {}).get("Code")) if isinstance(exc, ClientError) else ""
            if code in ("PreconditionFailed", "412"):
                raise StorageError(f"{self.url}: the object changed while it was read (its ETag is no longer "
                                   f"{self._etag}); it was rewritten during the read") from exc
            raise error from exc
        if not isinstance(exc, (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError)):
            raise exc  # not a transport failure: a bug, keep its traceback
        # Socket errors, a body cut short, urllib3's protocol errors: the connection broke.


class _Finished:
    """Stands in for a connection once every byte has arrived."""

    def next_item(self, deadline: float) -> tuple[str, Any]:
        return ("data", b"")

    def cancel(self) -> None:
        pass

"""Object storage and local paths behind one small API.

Every place in the pipeline that takes a location (shard directory, checkpoint, artifact) accepts
three spellings: a plain path, a ``file://`` URL, or an ``s3://bucket/key`` URL. Code above this
module never branches on the scheme; it calls these functions, which hand the call to the
backend of the URL: `LocalStorage` here, `pipeline.data.s3.S3Storage` for S3.

Every failure is a :class:`StorageError` whose message names the URL, says what went wrong
(missing bucket, rejected credentials, unreachable endpoint, missing object) and what to do.
Local writes are atomic: readers see the old content or the whole new one, never a part.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from typing import IO, TypeVar

from pipeline.data import outages
from pipeline.data.outages import (
    DEFAULT_RETRY_BUDGET_S,
    RETRY_BUDGET_ENV,
    STALL_S,
    retry_budget_s,
)
from pipeline.data.s3 import (
    S3Storage,
    StorageError,
    StorageUnavailable,
    is_s3_url,
    s3_client,
    split_s3_url,
)
from pipeline.data.s3_stream import ResumableObjectStream

__all__ = [
    "StorageError", "StorageUnavailable", "is_s3_url", "split_s3_url", "local_path", "join_url", "s3_client", "read_bytes",
    "write_bytes", "create_exclusive", "upload_file", "download_file", "list_urls", "exists", "delete",
    "check_readable", "open_read_stream", "write_file_atomically", "with_retries", "retry_budget_s",
    "RETRY_BUDGET_ENV", "DEFAULT_RETRY_BUDGET_S", "STALL_S",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_RETRY_INTERVAL_S = 30.0


def local_path(url: str) -> str:
    """Map a plain path or ``file://`` URL to a filesystem path."""
    url = os.fspath(url)
    if url.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(url).path)
    if url.startswith("file:"):
        return url[len("file:"):]
    return url


def join_url(base: str, name: str) -> str:
    """Append a relative name to a directory-like URL or path, keeping its scheme."""
    if is_s3_url(base) or base.startswith("file:"):
        return base.rstrip("/") + "/" + name.lstrip("/")
    return os.path.join(base, name)


def _local_error(url: str, exc: OSError) -> StorageError:
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{url}: no such file or directory; check the path")
    if isinstance(exc, PermissionError):
        return StorageError(f"{url}: permission denied; check file permissions")
    return StorageError(f"{url}: {exc}")


def new_file_mode() -> int:
    """The mode open() would give a new file; mkstemp's private 0600 would surprise readers."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_directory(directory: str) -> None:
    """Makes a rename or a new file in `directory` survive a crash (where the OS allows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(descriptor)


def write_file_atomically(path: str, fill: Callable[[str], None], url: str | None = None) -> None:
    """Makes `path` appear complete or not at all: `fill(temporary_path)` writes a temporary
    file in the same directory, which is flushed to disk, given the usual file mode and renamed
    over `path`; the directory entry is synced too. On any failure the temporary is removed and
    `path` keeps its old content."""
    url = url or path
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                                                 suffix=".tmp")
        os.close(descriptor)
    except OSError as exc:
        raise _local_error(url, exc) from exc
    try:
        fill(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, new_file_mode())
        os.replace(temporary, path)
        fsync_directory(directory)
    except BaseException as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise _local_error(url, exc) from exc
        raise


def _copy_file(source: str, url: str) -> Callable[[str], None]:
    def fill(temporary: str) -> None:
        try:
            with open(source, "rb") as fin, open(temporary, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    fout.write(chunk)
        except FileNotFoundError as exc:
            raise _local_error(url, exc) from exc

    return fill


class LocalStorage:
    """The storage operations on plain paths and ``file://`` URLs."""

    def read_bytes(self, url: str) -> bytes:
        try:
            with open(local_path(url), "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise _local_error(url, exc) from exc

    def write_bytes(self, url: str, data: bytes) -> None:
        def fill(temporary: str) -> None:
            with open(temporary, "wb") as handle:
                handle.write(data)

        write_file_atomically(local_path(url), fill, url)

    def create_exclusive(self, url: str, data: bytes) -> bool:
        """O_CREAT | O_EXCL: exactly one creator wins; False if the file exists."""
        path = local_path(url)
        for attempt in range(5):
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
                break
            except FileExistsError:
                return False
            except FileNotFoundError as exc:  # a concurrent cleanup removed the empty directory
                if attempt == 4:
                    raise StorageError(f"{url}: its directory keeps disappearing") from exc
            except OSError as exc:
                raise _local_error(url, exc) from exc
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def upload_file(self, local_file: str, url: str) -> None:
        write_file_atomically(local_path(url), _copy_file(local_file, url), url)

    def download_to(self, url: str, local_file: str) -> None:
        _copy_file(local_path(url), url)(local_file)

    def list_urls(self, prefix_url: str, suffix: str = "") -> list[str]:
        root = local_path(prefix_url)
        if not os.path.isdir(root):
            return []
        found = []
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                if name.endswith(suffix) and not name.endswith(".tmp"):
                    relative = os.path.relpath(os.path.join(dirpath, name), root)
                    found.append(join_url(prefix_url, relative.replace(os.sep, "/")))
        return sorted(found)

    def exists(self, url: str) -> bool:
        return os.path.exists(local_path(url))

    def version(self, url: str) -> str | None:
        try:
            status = os.stat(local_path(url))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _local_error(url, exc) from exc
        return f"{status.st_size}-{status.st_mtime_ns}"

    def delete(self, url: str) -> None:
        try:
            os.remove(local_path(url))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _local_error(url, exc) from exc

    def check_readable(self, url: str, fix: str) -> None:
        path = local_path(url)
        if not os.path.exists(path):
            raise StorageError(f"{url}: no such file or directory{fix}; check the path or write the data first")
        if not os.access(path, os.R_OK):
            raise StorageError(f"{url}: not readable by this user{fix}; check permissions")

    def open_read_stream(self, url: str) -> IO[bytes]:
        try:
            return open(local_path(url), "rb")
        except OSError as exc:
            raise _local_error(url, exc) from exc


_LOCAL, _S3 = LocalStorage(), S3Storage()


def _backend(url: str) -> LocalStorage | S3Storage:
    return _S3 if is_s3_url(url) else _LOCAL


# --------------------------------------------------------------------------- the API


def read_bytes(url: str) -> bytes:
    """Read a whole object or file into memory."""
    return _backend(url).read_bytes(url)


def write_bytes(url: str, data: bytes) -> None:
    """Write an object or file so that readers see either the old or the whole new content
    (locally: a temporary file renamed into place; an S3 PUT is already all-or-nothing)."""
    _backend(url).write_bytes(url, data)


def create_exclusive(url: str, data: bytes) -> bool:
    """Creates `url` with `data` if nothing is there; False if something already is."""
    return _backend(url).create_exclusive(url, data)


def upload_file(local_file: str, url: str) -> None:
    """Copy a local file to ``url`` (multipart on S3 for big files; atomic replace locally)."""
    if not os.path.isfile(local_file):
        raise StorageError(f"{local_file}: no such file to upload to {url}")
    _backend(url).upload_file(local_file, url)


def download_file(url: str, local_file: str) -> None:
    """Copy ``url`` to a local file; the destination appears only once it is complete."""
    write_file_atomically(local_file, lambda temporary: _backend(url).download_to(url, temporary), url)


def list_urls(prefix_url: str, suffix: str = "") -> list[str]:
    """List objects/files under a directory-like prefix (recursively), sorted, as full URLs.

    The prefix is treated as a directory: ``s3://b/data/train`` lists ``data/train/...`` but not
    ``data/train2/...``. A missing local directory or an empty prefix gives ``[]``; a missing
    bucket or an unreachable endpoint raises StorageError.
    """
    return _backend(prefix_url).list_urls(prefix_url, suffix)


def exists(url: str) -> bool:
    """True when the object/file exists. Access problems (credentials, endpoint) still raise."""
    return _backend(url).exists(url)


def version(url: str) -> str | None:
    """A tag that changes whenever the object/file is rewritten (S3: its ETag), None if it is
    missing: what a local cache of a remote object is keyed on."""
    return _backend(url).version(url)


def delete(url: str) -> None:
    """Delete one object/file; deleting something that is not there is not an error."""
    _backend(url).delete(url)


def check_readable(url: str, *, setting: str | None = None) -> None:
    """Fail early, with one clear message, if ``url`` cannot be read.

    Run before a job starts streaming so that a wrong endpoint, rejected credentials, a missing
    bucket or an empty prefix surface as one StorageError instead of a stack trace from deep
    inside a DataLoader worker. ``url`` may be a file/object or a directory-like prefix.
    ``setting`` names the config key that holds the URL, so the message can say what to fix.
    """
    _backend(url).check_readable(url, f" (fix {setting})" if setting else "")


def open_read_stream(url: str) -> IO[bytes]:
    """Open a binary, forward-only reader; S3 objects are streamed, never downloaded whole, and
    an outage mid-read is retried from the byte where it broke (pipeline.data.s3_stream): it
    returns the object's bytes or raises, never a shortened stream.

    The caller must close it (an unread S3 body holds an HTTP connection until closed).
    """
    if is_s3_url(url):
        return ResumableObjectStream(url)
    return _LOCAL.open_read_stream(url)


# --------------------------------------------------------------------------- transient outages


def with_retries(operation: Callable[[], T], what: str, budget_s: float | None = None,
                 stall_s: float | None = None) -> T:
    """Runs `operation`; a transient StorageError (unreachable endpoint, 5xx, throttling, a
    broken connection) is retried with exponential backoff (1 s doubling to 30 s) for up to
    `budget_s` (default `retry_budget_s()`), saying so at once, about once a minute and when it
    ends (pipeline.data.outages). Any other error raises at once; a spent budget, or a stop
    request while waiting, raises StorageUnavailable (resumable, not bad input).

    `stall_s` (for small requests, not transfers): an attempt that has not answered by then (or
    by the end of the budget) counts as failed, however slowly the endpoint keeps sending."""
    budget = retry_budget_s() if budget_s is None else budget_s
    outage: outages.Outage | None = None
    while True:
        started = time.monotonic()
        try:
            if stall_s is None:
                result = operation()
            else:
                left = budget if outage is None else outage.remaining()
                result = outages.call_with_deadline(operation, max(min(stall_s, left), outages.MIN_STALL_S), what)
        except StorageUnavailable:
            raise
        except StorageError as error:
            if not error.transient:
                raise
            if outage is None:
                outage = outages.Outage(what, str(error), budget_s=budget, started=started, first_interval_s=1.0,
                                        max_interval_s=MAX_RETRY_INTERVAL_S)
            else:
                outage.failed_again(str(error))
            outage.back_off()
            continue
        if outage is not None:
            outage.ended()
        return result

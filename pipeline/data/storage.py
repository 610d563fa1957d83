"""Object storage and local paths behind one small API.

Every place in the pipeline that takes a location (shard directory, checkpoint, artifact) accepts
three spellings: a plain path, a ``file://`` URL, or an ``s3://bucket/key`` URL. Code above this
module never branches on the scheme; it calls these functions. S3 goes through boto3 configured
from the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, profiles, ...), so
the same code talks to AWS, MinIO, Ceph or the moto server the tests start.

Every failure is turned into :class:`StorageError` whose message names the URL, says what went
wrong (missing bucket, rejected credentials, unreachable endpoint, missing object) and what to do.
"""

from __future__ import annotations

import os
import tempfile
import threading
import urllib.parse
from typing import IO, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from pipeline.errors import GapmError

__all__ = [
    "StorageError",
    "is_s3_url",
    "split_s3_url",
    "local_path",
    "join_url",
    "s3_client",
    "read_bytes",
    "write_bytes",
    "upload_file",
    "download_file",
    "list_urls",
    "exists",
    "delete",
    "check_readable",
    "open_read_stream",
]

# Connection refused / unroutable endpoints must fail in seconds, not hang a job for minutes.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
# Transient S3 errors (throttling, 5xx, dropped connections) are retried this many times in total.
DEFAULT_MAX_ATTEMPTS = 5
# The pre-flight check gives up sooner: it runs before training to report misconfiguration.
CHECK_MAX_ATTEMPTS = 2
# Multipart uploads for big shards/checkpoints; below the threshold one PUT is atomic and cheaper.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 64 * 1024 * 1024

_CREDENTIAL_ERROR_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidClientTokenId",
    "InvalidToken",
    "ExpiredToken",
    "AuthFailure",
    "UnrecognizedClientException",
}
_ACCESS_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}


class StorageError(GapmError):
    """A storage operation failed; the message names the URL, the problem and the fix."""


# --------------------------------------------------------------------------- URLs


def is_s3_url(url: str) -> bool:
    """True for ``s3://`` URLs; plain paths and ``file://`` URLs are local."""
    return str(url).startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/key/parts`` into ``("bucket", "key/parts")``; the key may be empty."""
    if not is_s3_url(url):
        raise ValueError(f"{url}: not an s3:// URL")
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket name; expected s3://bucket/key")
    return bucket, key


def local_path(url: str) -> str:
    """Map a plain path or ``file://`` URL to a filesystem path."""
    url = os.fspath(url)
    if url.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(url).path)
    if url.startswith("file:"):
        return url[len("file:") :]
    return url


def join_url(base: str, name: str) -> str:
    """Append a relative name to a directory-like URL or path, keeping its scheme."""
    if is_s3_url(base) or base.startswith("file:"):
        return base.rstrip("/") + "/" + name.lstrip("/")
    return os.path.join(base, name)


# --------------------------------------------------------------------------- S3 client

_client_lock = threading.Lock()
_client_cache: dict[tuple[Any, ...], Any] = {}
_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def s3_client(*, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> Any:
    """Return a boto3 S3 client configured from the standard AWS environment.

    Clients are cached per process and per AWS environment: creating one costs tens of
    milliseconds, a forked DataLoader worker must not reuse its parent's connection pool, and
    tests switch endpoints and credentials through the environment.
    """
    key = (os.getpid(), max_attempts) + tuple(os.environ.get(k) for k in _ENV_KEYS)
    with _client_lock:
        client = _client_cache.get(key)
        if client is None:
            config = Config(
                retries={"mode": "standard", "total_max_attempts": max_attempts},
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
            )
            # A fresh session: the default session is not safe to create clients from threads.
            client = boto3.session.Session().client("s3", config=config)
            _client_cache[key] = client
    return client


def _endpoint(client: Any | None = None) -> str:
    try:
        return (client or s3_client()).meta.endpoint_url
    except Exception:  # pragma: no cover - only used to decorate messages
        return os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")


def _find_client_error(exc: BaseException) -> BaseException:
    """boto3's transfer manager wraps ClientError in S3UploadFailedError; dig it back out."""
    seen = exc
    while seen is not None:
        if isinstance(seen, (ClientError, BotoCoreError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def _storage_error(url: str, exc: BaseException, client: Any | None = None) -> StorageError:
    """Translate a boto3/botocore exception into one actionable message."""
    exc = _find_client_error(exc)
    endpoint = _endpoint(client)
    bucket = split_s3_url(url)[0] if is_s3_url(url) else "?"
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError)):
        return StorageError(
            f"{url}: cannot reach the S3 endpoint {endpoint} ({type(exc).__name__}: {exc}); "
            "check AWS_ENDPOINT_URL and that the storage service is running and reachable"
        )
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{url}: no usable AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for the endpoint " + endpoint
        )
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "?"))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = error.get("Message") or code
        if code == "NoSuchBucket":
            return StorageError(
                f"{url}: bucket '{bucket}' does not exist (NoSuchBucket) at endpoint {endpoint}; "
                "create it or fix the URL"
            )
        if code in _CREDENTIAL_ERROR_CODES:
            return StorageError(
                f"{url}: the endpoint {endpoint} rejected the credentials ({code}: {detail}); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            )
        if code in _ACCESS_DENIED_CODES or status == 403:
            return StorageError(
                f"{url}: access denied ({code}) at endpoint {endpoint}; the credentials are wrong "
                "or lack permission for bucket '" + bucket + "' - check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY and the bucket policy"
            )
        if code in _NOT_FOUND_CODES or status == 404:
            return StorageError(f"{url}: no such object at endpoint {endpoint} ({code}); check the URL")
        return StorageError(f"{url}: S3 request failed at endpoint {endpoint} ({code}: {detail})")
    return StorageError(f"{url}: storage operation failed ({type(exc).__name__}: {exc})")


def _local_error(url: str, exc: OSError) -> StorageError:
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{url}: no such file or directory; check the path")
    if isinstance(exc, PermissionError):
        return StorageError(f"{url}: permission denied; check file permissions")
    return StorageError(f"{url}: {exc}")


# --------------------------------------------------------------------------- operations


def read_bytes(url: str) -> bytes:
    """Read a whole object or file into memory."""
    if is_s3_url(url):
        bucket, key = split_s3_url(url)
        client = s3_client()
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                return body.read()
            finally:
                body.close()
        except Exception as exc:
            raise _storage_error(url, exc, client) from exc
    try:
        with open(local_path(url), "rb") as f:
            return f.read()
    except OSError as exc:
        raise _local_error(url, exc) from exc


def write_bytes(url: str, data: bytes) -> None:
    """Write an object or file so that readers see either the old or the whole new content.

    Locally that means a temporary file in the same directory followed by ``os.replace`` (same
    filesystem, so the rename is atomic); an S3 PUT is already all-or-nothing.
    """
    if is_s3_url(url):
        bucket, key = split_s3_url(url)
        client = s3_client()
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:
            raise _storage_error(url, exc, client) from exc
        return
    path = local_path(url)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as exc:
        raise _local_error(url, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _local_error(url, exc) from exc
        raise


def upload_file(local_file: str, url: str) -> None:
    """Copy a local file to ``url`` (multipart on S3 for big files; atomic replace locally)."""
    if not os.path.isfile(local_file):
        raise StorageError(f"{local_file}: no such file to upload to {url}")
    if is_s3_url(url):
        bucket, key = split_s3_url(url)
        client = s3_client()
        transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE)
        try:
            client.upload_file(local_file, bucket, key, Config=transfer)
        except Exception as exc:
            raise _storage_error(url, exc, client) from exc
        return
    _copy_local_atomically(local_file, local_path(url), url)


def download_file(url: str, local_file: str) -> None:
    """Copy ``url`` to a local file; the destination appears only once it is complete."""
    directory = os.path.dirname(os.path.abspath(local_file))
    os.makedirs(directory, exist_ok=True)
    if not is_s3_url(url):
        _copy_local_atomically(local_path(url), local_file, url)
        return
    bucket, key = split_s3_url(url)
    client = s3_client()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(local_file) + ".", suffix=".tmp")
    os.close(fd)
    try:
        client.download_file(bucket, key, tmp)
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, local_file)
    except Exception as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise _storage_error(url, exc, client) from exc


def _new_file_mode() -> int:
    """The mode open() would give a new file; mkstemp's private 0600 would surprise readers."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _copy_local_atomically(src: str, dst: str, url: str) -> None:
    directory = os.path.dirname(os.path.abspath(dst))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(dst) + ".", suffix=".tmp")
    except OSError as exc:
        raise _local_error(url, exc) from exc
    try:
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, dst)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise _local_error(url, exc) from exc


def list_urls(prefix_url: str, suffix: str = "") -> list[str]:
    """List objects/files under a directory-like prefix (recursively), sorted, as full URLs.

    The prefix is treated as a directory: ``s3://b/data/train`` lists ``data/train/...`` but not
    ``data/train2/...``. A missing local directory or an empty prefix gives ``[]``; a missing
    bucket or an unreachable endpoint raises StorageError.
    """
    if is_s3_url(prefix_url):
        bucket, key = split_s3_url(prefix_url)
        prefix = key if (not key or key.endswith("/")) else key + "/"
        client = s3_client()
        found = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    if item["Key"].endswith(suffix):
                        found.append(f"s3://{bucket}/{item['Key']}")
        except Exception as exc:
            raise _storage_error(prefix_url, exc, client) from exc
        return sorted(found)
    root = local_path(prefix_url)
    if not os.path.isdir(root):
        return []
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(suffix) and not name.endswith(".tmp"):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                found.append(join_url(prefix_url, rel.replace(os.sep, "/")))
    return sorted(found)


def exists(url: str) -> bool:
    """True when the object/file exists. Access problems (credentials, endpoint) still raise."""
    if not is_s3_url(url):
        return os.path.exists(local_path(url))
    bucket, key = split_s3_url(url)
    client = s3_client()
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code"))
        if code in _NOT_FOUND_CODES or code == "NoSuchBucket":
            return False
        raise _storage_error(url, exc, client) from exc
    except Exception as exc:
        raise _storage_error(url, exc, client) from exc


def delete(url: str) -> None:
    """Delete one object/file; deleting something that is not there is not an error."""
    if is_s3_url(url):
        bucket, key = split_s3_url(url)
        client = s3_client()
        try:
            client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise _storage_error(url, exc, client) from exc
        return
    try:
        os.remove(local_path(url))
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _local_error(url, exc) from exc


def check_readable(url: str, *, setting: str | None = None) -> None:
    """Fail early, with one clear message, if ``url`` cannot be read.

    Run before a job starts streaming so that a wrong endpoint, rejected credentials, a missing
    bucket or an empty prefix surface as one StorageError instead of a stack trace from deep
    inside a DataLoader worker. ``url`` may be a file/object or a directory-like prefix.
    ``setting`` names the config key that holds the URL, so the message can say what to fix.
    """
    fix = f" (fix {setting})" if setting else ""
    if not is_s3_url(url):
        path = local_path(url)
        if not os.path.exists(path):
            raise StorageError(f"{url}: no such file or directory{fix}; check the path or write the data first")
        if not os.access(path, os.R_OK):
            raise StorageError(f"{url}: not readable by this user{fix}; check permissions")
        return
    bucket, key = split_s3_url(url)
    client = s3_client(max_attempts=CHECK_MAX_ATTEMPTS)
    try:
        # A GET (not HEAD) so that S3 returns an error code: NoSuchBucket vs InvalidAccessKeyId.
        listing = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    except Exception as exc:
        error = _storage_error(url, exc, client)
        raise StorageError(str(error) + fix) from exc
    if key and not listing.get("Contents"):
        raise StorageError(
            f"{url}: nothing stored under key prefix '{key}' in bucket '{bucket}' at endpoint "
            f"{_endpoint(client)}{fix}; check the URL or write the data there first"
        )


def open_read_stream(url: str) -> IO[bytes]:
    """Open a binary, forward-only reader; S3 objects are streamed, never downloaded whole.

    The caller must close it (an unread S3 body holds an HTTP connection until closed).
    """
    if is_s3_url(url):
        bucket, key = split_s3_url(url)
        client = s3_client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as exc:
            raise _storage_error(url, exc, client) from exc
    try:
        return open(local_path(url), "rb")
    except OSError as exc:
        raise _local_error(url, exc) from exc

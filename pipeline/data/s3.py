"""The S3 backend of `pipeline.data.storage`: boto3 configured from the standard AWS
environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, profiles, ...), so the same code talks to
AWS, MinIO, Ceph or the moto server the tests start; every boto3/botocore failure becomes one
`StorageError` naming the URL, what went wrong and what to do.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from pipeline.errors import GapmError

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
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "InvalidToken", "ExpiredToken",
    "AuthFailure", "UnrecognizedClientException",
}
_ACCESS_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_ALREADY_EXISTS_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
# The failures that say nothing about the request itself: the endpoint was unreachable or busy, or
# the connection broke (refused, reset, timed out, a body cut short).
TRANSIENT_ERRORS = (BotoConnectionError, HTTPClientError, IncompleteReadError)
# Codes that say "busy, ask again", whatever their HTTP status.
BUSY_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable")


class StorageError(GapmError):
    """A storage operation failed; the message names the URL, the problem and the fix."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        # True when the endpoint could not be reached (or answered 5xx/throttled): worth retrying.
        self.transient = transient


class StorageUnavailable(StorageError):
    """Storage stayed unreachable, slow or throttled for the whole retry budget, or a stop was
    requested while waiting for it. Not bad input: the work can go on later (exit 75)."""

    def __init__(self, message: str):
        super().__init__(message, transient=True)


def is_s3_url(url: str) -> bool:
    """True for ``s3://`` URLs; plain paths and ``file://`` URLs are local."""
    return str(url).startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/key/parts`` into ``("bucket", "key/parts")``; the key may be empty."""
    if not is_s3_url(url):
        raise ValueError(f"{url}: not an s3:// URL")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket name; expected s3://bucket/key")
    return bucket, key


# --------------------------------------------------------------------------- the client

_client_lock = threading.Lock()
_client_cache: dict[tuple[Any, ...], Any] = {}
_ENV_KEYS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
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
            config = Config(retries={"mode": "standard", "total_max_attempts": max_attempts},
                            connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S)
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
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ClientError, BotoCoreError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def storage_error(url: str, exc: BaseException, client: Any | None = None) -> StorageError:
    """Translate a boto3/botocore exception into one actionable message."""
    exc = _find_client_error(exc)
    endpoint = _endpoint(client)
    bucket = split_s3_url(url)[0] if is_s3_url(url) else "?"
    if isinstance(exc, TRANSIENT_ERRORS):
        return StorageError(
            f"{url}: cannot reach the S3 endpoint {endpoint} ({type(exc).__name__}: {exc}); "
            "check AWS_ENDPOINT_URL and that the storage service is running and reachable", transient=True)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(f"{url}: no usable AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for the endpoint " + endpoint)
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "?"))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = error.get("Message") or code
        if code == "NoSuchBucket":
            return StorageError(f"{url}: bucket '{bucket}' does not exist (NoSuchBucket) at endpoint {endpoint}; "
                                "create it or fix the URL")
        if code in _CREDENTIAL_ERROR_CODES:
            return StorageError(f"{url}: the endpoint {endpoint} rejected the credentials ({code}: {detail}); "
                                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
        if code in _ACCESS_DENIED_CODES or status == 403:
            return StorageError(f"{url}: access denied ({code}) at endpoint {endpoint}; the credentials are wrong "
                                f"or lack permission for bucket '{bucket}' - check AWS_ACCESS_KEY_ID / "
                                "AWS_SECRET_ACCESS_KEY and the bucket policy")
        if code in _NOT_FOUND_CODES or status == 404:
            return StorageError(f"{url}: no such object at endpoint {endpoint} ({code}); check the URL")
        busy = (status or 0) >= 500 or status == 429 or code in BUSY_CODES
        return StorageError(f"{url}: S3 request failed at endpoint {endpoint} ({code}: {detail})", transient=busy)
    return StorageError(f"{url}: storage operation failed ({type(exc).__name__}: {exc})")


def _calling(url: str, operation: Callable[[Any, str, str], Any], *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> Any:
    """Runs operation(client, bucket, key), translating any failure into a StorageError."""
    bucket, key = split_s3_url(url)
    client = s3_client(max_attempts=max_attempts)
    try:
        return operation(client, bucket, key)
    except StorageError:
        raise
    except Exception as exc:
        raise storage_error(url, exc, client) from exc


# --------------------------------------------------------------------------- operations


class S3Storage:
    """The storage operations on ``s3://bucket/key`` URLs (see pipeline.data.storage)."""

    def read_bytes(self, url: str) -> bytes:
        def read(client: Any, bucket: str, key: str) -> bytes:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                return body.read()
            finally:
                body.close()

        return _calling(url, read)

    def write_bytes(self, url: str, data: bytes) -> None:
        _calling(url, lambda client, bucket, key: client.put_object(Bucket=bucket, Key=key, Body=data))

    def create_exclusive(self, url: str, data: bytes) -> bool:
        """PUT with If-None-Match: * (AWS, MinIO and moto honour it); False if the key exists."""
        def put(client: Any, bucket: str, key: str) -> bool:
            try:
                client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as error:
                if str(error.response.get("Error", {}).get("Code")) in _ALREADY_EXISTS_CODES:
                    return False
                raise

        return _calling(url, put)

    def upload_file(self, local_file: str, url: str) -> None:
        transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE)
        _calling(url, lambda client, bucket, key: client.upload_file(local_file, bucket, key, Config=transfer))

    def download_to(self, url: str, local_file: str) -> None:
        """Downloads into `local_file` (the caller makes the final name appear atomically)."""
        _calling(url, lambda client, bucket, key: client.download_file(bucket, key, local_file))

    def list_urls(self, prefix_url: str, suffix: str = "") -> list[str]:
        def listing(client: Any, bucket: str, key: str) -> list[str]:
            prefix = key if (not key or key.endswith("/")) else key + "/"
            found = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                found += [f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", [])
                          if item["Key"].endswith(suffix)]
            return sorted(found)

        return _calling(prefix_url, listing)

    def exists(self, url: str) -> bool:
        def head(client: Any, bucket: str, key: str) -> bool:
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND_CODES | {"NoSuchBucket"}:
                    return False
                raise

        return _calling(url, head)

    def version(self, url: str) -> str | None:
        """The object's ETag (changes whenever the object is written), or None if it is missing."""
        def head(client: Any, bucket: str, key: str) -> str | None:
            try:
                return str(client.head_object(Bucket=bucket, Key=key)["ETag"]).strip('"')
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND_CODES:
                    return None
                raise

        return _calling(url, head)

    def delete(self, url: str) -> None:
        _calling(url, lambda client, bucket, key: client.delete_object(Bucket=bucket, Key=key))

    def check_readable(self, url: str, fix: str) -> None:
        # A GET (not HEAD) so that S3 returns an error code: NoSuchBucket vs InvalidAccessKeyId.
        def first_key(client: Any, bucket: str, key: str) -> Any:
            return client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)

        try:
            listing = _calling(url, first_key, max_attempts=CHECK_MAX_ATTEMPTS)
        except StorageError as error:
            raise StorageError(str(error) + fix, transient=error.transient) from error
        bucket, key = split_s3_url(url)
        if key and not listing.get("Contents"):
            raise StorageError(f"{url}: nothing stored under key prefix '{key}' in bucket '{bucket}' at endpoint "
                               f"{_endpoint()}{fix}; check the URL or write the data there first")

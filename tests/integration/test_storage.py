"""pipeline.data.storage: one API for local paths and S3 (against a real moto server), and its errors."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import boto3
import pytest

from pipeline.data import s3, storage
from pipeline.data.storage import StorageError


def test_url_helpers():
    assert storage.is_s3_url("s3://bucket/a/b")
    assert not storage.is_s3_url("/data/a") and not storage.is_s3_url("file:///data/a")
    assert storage.split_s3_url("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    assert storage.split_s3_url("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="no bucket"):
        storage.split_s3_url("s3:///key")
    assert storage.local_path("file:///data/x y.tar") == "/data/x y.tar"
    assert storage.local_path("relative/dir") == "relative/dir"
    assert storage.join_url("s3://b/p/", "m.json") == "s3://b/p/m.json"
    assert storage.join_url("file:///d", "m.json") == "file:///d/m.json"
    assert storage.join_url("/d", "m.json") == "/d/m.json"


@pytest.mark.parametrize("scheme", ["plain", "file"])
def test_local_roundtrip(tmp_path, scheme):
    base = str(tmp_path) if scheme == "plain" else f"file://{tmp_path}"
    url = storage.join_url(base, "sub/dir/blob.bin")
    storage.write_bytes(url, b"hello")
    assert storage.read_bytes(url) == b"hello"
    assert storage.exists(url)
    with storage.open_read_stream(url) as stream:
        assert stream.read() == b"hello"
    storage.write_bytes(storage.join_url(base, "sub/a.tar"), b"a")
    assert storage.list_urls(storage.join_url(base, "sub")) == [
        storage.join_url(base, "sub/a.tar"),
        storage.join_url(base, "sub/dir/blob.bin"),
    ]
    assert storage.list_urls(storage.join_url(base, "sub"), suffix=".tar") == [storage.join_url(base, "sub/a.tar")]
    assert storage.list_urls(storage.join_url(base, "missing")) == []
    storage.check_readable(url)
    storage.delete(url)
    storage.delete(url)  # deleting twice is fine, like S3
    assert not storage.exists(url)
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes(url)
    with pytest.raises(StorageError, match="no such file or directory"):
        storage.check_readable(url, setting="data.train")


def test_local_write_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous content and no temporary file behind."""
    target = tmp_path / "checkpoint.bin"
    storage.write_bytes(str(target), b"old content")
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode

    def crash(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(StorageError, match="disk full"):
        storage.write_bytes(str(target), b"new content that never lands")
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.bin"]

    # Nor is a partially written file ever visible under the final name.
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.path.dirname(src), open(dst, "rb").read()))
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", spy)
    storage.write_bytes(str(target), b"new")
    assert seen == [(str(tmp_path), b"old content")]  # temp file lived in the same directory
    assert target.read_bytes() == b"new"


def test_s3_roundtrip(s3_bucket, tmp_path, monkeypatch):
    base = f"s3://{s3_bucket}/run"
    storage.write_bytes(base + "/x/1.bin", b"one")
    storage.write_bytes(base + "/x/2.tar", b"two")
    storage.write_bytes(base + "2/other.tar", b"not under run/")
    assert storage.read_bytes(base + "/x/1.bin") == b"one"
    assert storage.exists(base + "/x/2.tar") and not storage.exists(base + "/x/3.tar")
    assert storage.list_urls(base) == [base + "/x/1.bin", base + "/x/2.tar"]
    assert storage.list_urls(base, suffix=".tar") == [base + "/x/2.tar"]
    stream = storage.open_read_stream(base + "/x/2.tar")
    assert stream.read() == b"two"
    stream.close()
    storage.check_readable(base)
    storage.check_readable(base + "/x/1.bin")

    # Multipart upload path: shrink the threshold instead of uploading 64 MiB.
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(s3, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    big = tmp_path / "big.bin"
    payload = os.urandom(6 * 1024 * 1024 + 123)
    big.write_bytes(payload)
    storage.upload_file(str(big), base + "/big.bin")
    head = boto3.session.Session().client("s3").head_object(Bucket=s3_bucket, Key="run/big.bin")
    assert "-" in head["ETag"], "expected a multipart ETag"
    storage.download_file(base + "/big.bin", str(tmp_path / "back" / "big.bin"))
    assert (tmp_path / "back" / "big.bin").read_bytes() == payload

    storage.delete(base + "/x/1.bin")
    assert not storage.exists(base + "/x/1.bin")


def test_s3_missing_bucket(s3_endpoint):
    with pytest.raises(StorageError) as error:
        storage.check_readable("s3://no-such-bucket/data/train", setting="data.train")
    message = str(error.value)
    assert "s3://no-such-bucket/data/train" in message
    assert "bucket 'no-such-bucket' does not exist (NoSuchBucket)" in message
    assert s3_endpoint in message and "data.train" in message
    with pytest.raises(StorageError, match="NoSuchBucket"):
        storage.read_bytes("s3://no-such-bucket/a")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        storage.write_bytes("s3://no-such-bucket/a", b"x")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        storage.list_urls("s3://no-such-bucket/a")


def test_s3_missing_prefix_and_object(s3_bucket, tmp_path):
    with pytest.raises(StorageError, match=f"nothing stored under key prefix 'nothing/here' in bucket '{s3_bucket}'"):
        storage.check_readable(f"s3://{s3_bucket}/nothing/here")
    with pytest.raises(StorageError, match="no such object"):
        storage.read_bytes(f"s3://{s3_bucket}/missing.bin")
    with pytest.raises(StorageError, match="no such object"):
        storage.download_file(f"s3://{s3_bucket}/missing.bin", str(tmp_path / "x"))
    assert not os.listdir(tmp_path)  # no partial download left behind
    with pytest.raises(StorageError, match="NoSuchBucket"):
        storage.upload_file(__file__, "s3://no-such-bucket/x.py")


def test_unreachable_endpoint(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    started = time.monotonic()
    with pytest.raises(StorageError) as error:
        storage.check_readable("s3://bucket/data")
    assert time.monotonic() - started < 15, "an unreachable endpoint must fail fast"
    message = str(error.value)
    assert "cannot reach the S3 endpoint http://127.0.0.1:1" in message
    assert "AWS_ENDPOINT_URL" in message


def _set_moto_auth(endpoint: str, initial_no_auth_actions: str) -> None:
    """Moto's server only checks signatures once told to (POST /moto-api/reset-auth)."""
    request = urllib.request.Request(
        endpoint + "/moto-api/reset-auth",
        data=initial_no_auth_actions.encode(),
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def test_wrong_credentials(s3_endpoint, s3_bucket, monkeypatch):
    iam = boto3.session.Session().client("iam")
    user = f"reader-{s3_bucket}"
    iam.create_user(UserName=user)
    iam.put_user_policy(
        UserName=user,
        PolicyName="s3",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        ),
    )
    key = iam.create_access_key(UserName=user)["AccessKey"]
    storage.write_bytes(f"s3://{s3_bucket}/data/x.tar", b"x")
    url = f"s3://{s3_bucket}/data"
    _set_moto_auth(s3_endpoint, "0")
    try:
        # Unknown access key id ("testing" is not an IAM key once auth is on).
        with pytest.raises(StorageError) as error:
            storage.check_readable(url)
        assert "rejected the credentials (InvalidAccessKeyId" in str(error.value)
        assert "AWS_ACCESS_KEY_ID" in str(error.value) and url in str(error.value)

        # A real key id with the wrong secret.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        with pytest.raises(StorageError, match="rejected the credentials \\(SignatureDoesNotMatch"):
            storage.check_readable(url)
        with pytest.raises(StorageError, match="SignatureDoesNotMatch"):
            storage.read_bytes(url + "/x.tar")

        # The right secret works, so the errors above really were about the credentials.
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        storage.check_readable(url)
        assert storage.read_bytes(url + "/x.tar") == b"x"
    finally:
        _set_moto_auth(s3_endpoint, "inf")

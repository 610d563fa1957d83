"""One redaction function for every log line, param, tag and run-directory file: hand-made
cases of what must be masked and what must stay readable."""

from __future__ import annotations

import io
import logging

import pytest

from pipeline.redaction import (
    MASK,
    RedactingStream,
    install_log_redaction,
    is_secret_name,
    redact,
    redact_mapping,
)


@pytest.mark.parametrize("text, expected", [
    # userinfo passwords: the user stays, the password goes
    ("http://alice:pw@127.0.0.1:5000", f"http://alice:{MASK}@127.0.0.1:5000"),
    ("View run x at: https://alice:s3cr3t@mlflow.example/#/experiments/1/runs/abc",
     f"View run x at: https://alice:{MASK}@mlflow.example/#/experiments/1/runs/abc"),
    ("postgresql://bob:p@ss@db:5432/mlflow", f"postgresql://bob:{MASK}@db:5432/mlflow"),  # '@' in the password
    ("'http://u:v@h' and 'http://w:x@k'", f"'http://u:{MASK}@h' and 'http://w:{MASK}@k'"),
    # secret query parameters, whatever the rest of the URL
    ("https://host/data?token=abc123&split=train", f"https://host/data?token={MASK}&split=train"),
    ("s3://b/x?access_token=t0k&X-Amz-Signature=deadbeef&X-Amz-Credential=AK%2F2024",
     f"s3://b/x?access_token={MASK}&X-Amz-Signature={MASK}&X-Amz-Credential={MASK}"),
    ("https://h/a?key=AIzaSy&sig=xyz&sv=2020&password=pw&client_secret=cs",
     f"https://h/a?key={MASK}&sig={MASK}&sv=2020&password={MASK}&client_secret={MASK}"),
    # env-style and config-style assignments
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI aws_region=us-east-1",
     f"AWS_SECRET_ACCESS_KEY={MASK} aws_region=us-east-1"),
    ("MLFLOW_TRACKING_PASSWORD=pw MLFLOW_TRACKING_TOKEN='tok' MLFLOW_TRACKING_USERNAME=alice",
     f"MLFLOW_TRACKING_PASSWORD={MASK} MLFLOW_TRACKING_TOKEN={MASK} MLFLOW_TRACKING_USERNAME=alice"),
    ("--set storage.password=hunter2", f"--set storage.password={MASK}"),
    ("{'password': 'hunter2', 'user': 'bob'}", f"{{'password': '{MASK}', 'user': 'bob'}}"),
    ('{"api_key": "k-123", "lr": 0.1}', f'{{"api_key": "{MASK}", "lr": 0.1}}'),
    # HTTP credentials and AWS access key ids
    ("headers={'Authorization': 'Bearer eyJhbGciOi.x'}", f"headers={{'Authorization': '{MASK}'}}"),
    ("Authorization: Basic YWxpY2U6cHc=", f"Authorization: Basic {MASK}"),
    ("s3://AKIAIOSFODNN7EXAMPLE@bucket/shards", f"s3://{MASK}@bucket/shards"),
])
def test_secrets_are_masked(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent: a redacted line stays as it is


@pytest.mark.parametrize("text", [
    "http://127.0.0.1:5000/api/2.0/mlflow/runs/get?run_id=abc",  # a port is no password
    "s3://bucket/prefix/step-00000010/model.safetensors",
    "https://user@host/path",  # a user without a password
    "stage1/reconstruction_mse=0.0123 step=40 tokens: 12",
    "resuming from runs/x/checkpoints/step-00000020 (stage 1, step 20)",
    "Basic authentication is not configured",
    "train.keep_last_checkpoints=3 author=alice",
])
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == text


def test_secret_names():
    for name in ("password", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN", "access_token", "X-Amz-Signature",
                 "storage.api_key", "aws_session_token", "X-Amz-Credential"):
        assert is_secret_name(name), name
    for name in ("keep_last_checkpoints", "author", "data.train", "tracking.experiment", "step"):
        assert not is_secret_name(name), name


def test_mappings_mask_secret_keys_and_redact_every_string():
    mapping = {"storage": {"aws_secret_access_key": "wJalrXUtnFEMI", "password": "p",
                           "endpoint": "https://alice:hunter2@minio:9000/x", "token": None, "api_key": ""},
               "data": {"train": "https://h/shards?token=abc", "list": ["http://u:v@h", 3]},
               "MLFLOW_TRACKING_PASSWORD": "pw", "lr": 0.1, "steps": 3}
    assert redact_mapping(mapping) == {
        "storage": {"aws_secret_access_key": MASK, "password": MASK, "endpoint": f"https://alice:{MASK}@minio:9000/x",
                    "token": None, "api_key": ""},
        "data": {"train": f"https://h/shards?token={MASK}", "list": [f"http://u:{MASK}@h", 3]},
        "MLFLOW_TRACKING_PASSWORD": MASK, "lr": 0.1, "steps": 3}
    assert mapping["storage"]["password"] == "p"  # a copy: the caller's mapping is untouched


def test_every_log_record_is_redacted_whichever_logger_and_handler(caplog):
    install_log_redaction()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # as MLflow's own handler: not gapm's
    library = logging.getLogger("some.library.module")
    library.addHandler(handler)
    try:
        with caplog.at_level(logging.INFO):
            library.warning("cannot reach %s", "http://alice:pw@127.0.0.1:5000")
            library.info("GET %s", "https://h/x?token=abc123&n=1")
            try:
                raise ConnectionError("http://bob:hunter2@host/api failed")
            except ConnectionError:
                library.exception("request failed")
    finally:
        library.removeHandler(handler)
    written = stream.getvalue() + caplog.text
    for secret in ("pw@", "abc123", "hunter2"):
        assert secret not in written, written
    assert f"http://alice:{MASK}@127.0.0.1:5000" in written and f"token={MASK}&n=1" in written
    assert "ConnectionError" in written  # the traceback is still there, redacted


def test_redacting_stream_redacts_whole_lines_written_in_pieces():
    target = io.StringIO()
    stream = RedactingStream(target)
    print("View run x at: http://alice:", end="", file=stream)
    assert target.getvalue() == ""  # held until the line is complete
    print("pw@127.0.0.1:5000/#/runs/1", file=stream)
    stream.write("progress 10%\rprogress 20% ?token=abc")
    stream.flush()
    assert target.getvalue() == (f"View run x at: http://alice:{MASK}@127.0.0.1:5000/#/runs/1\n"
                                 f"progress 10%\rprogress 20% ?token={MASK}")
    assert stream.getvalue() == target.getvalue()  # anything else is the target's

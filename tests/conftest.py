"""Shared fixtures: a real S3 endpoint (moto's server in a subprocess) on 127.0.0.1.

The storage code is exercised over real HTTP against ``moto_server`` rather than an in-process
mock of boto3, so request signing, retries, streaming bodies and error codes behave as they do
against AWS or MinIO.
"""

from __future__ import annotations

pytest_plugins = ["mlflow_fixtures", "slurm_fixtures"]  # `mlflow server`, a real Slurm cluster

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from helpers import FASHION_MNIST_DIR, PausableProxy, free_port

MOTO_START_TIMEOUT_S = 60.0




def _moto_server_command(port: int) -> list[str]:
    """Prefer the ``moto_server`` entry point next to this interpreter; fall back to -m."""
    script = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if os.path.exists(script):
        return [script, "-H", "127.0.0.1", "-p", str(port)]
    found = shutil.which("moto_server")
    if found:
        return [found, "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def _wait_until_answering(url: str, process: subprocess.Popen, log_path: str) -> None:
    deadline = time.monotonic() + MOTO_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path, errors="replace") as f:
                log = f.read()[-4000:]
            raise RuntimeError(f"moto_server exited with code {process.returncode} before answering:\n{log}")
        try:
            # The moto-api endpoint is not an S3 action, so it does not count towards auth.
            with urllib.request.urlopen(url + "/moto-api/", timeout=1) as response:
                response.read()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the server is up
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer at {url} within {MOTO_START_TIMEOUT_S:.0f}s (log: {log_path})")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``moto_server`` on a free 127.0.0.1 port and point the AWS environment at it.

    Sets AWS_ENDPOINT_URL and dummy credentials for the whole session (restored afterwards) and
    hides any AWS config/credential files of the person running the tests.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = str(tmp_path_factory.mktemp("moto") / "moto_server.log")
    env = dict(os.environ)
    # The server itself must not try to reach real AWS or inherit a test's auth settings.
    env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            _moto_server_command(port), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        _wait_until_answering(url, process, log_path)
        with pytest.MonkeyPatch.context() as patch:
            missing = str(tmp_path_factory.getbasetemp() / "no-aws-config")
            patch.setenv("AWS_ENDPOINT_URL", url)
            patch.setenv("AWS_ACCESS_KEY_ID", "testing")
            patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
            patch.setenv("AWS_CONFIG_FILE", missing)
            patch.setenv("AWS_SHARED_CREDENTIALS_FILE", missing)
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
                patch.delenv(name, raising=False)
            yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def _s3_admin_client(s3_endpoint: str):
    """One client for fixture bookkeeping, bound to the test endpoint whatever a test does to the env."""
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=s3_endpoint)


@pytest.fixture()
def s3_bucket(_s3_admin_client) -> Iterator[str]:
    """A fresh, empty bucket on the test endpoint; returns its name and empties/deletes it after."""
    client = _s3_admin_client
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=item["Key"])
        client.delete_bucket(Bucket=name)
    except Exception:
        pass  # the server is torn down at session end anyway


@pytest.fixture(autouse=True)
def storage_retry_budget_per_test(monkeypatch):
    """train() sets the storage retry budget (GAPM_STORAGE_RETRY_SECONDS) for its whole process:
    a test's tiny budget must not follow the tests after it into their S3 reads."""
    monkeypatch.delenv("GAPM_STORAGE_RETRY_SECONDS", raising=False)


@pytest.fixture()
def faulty_s3(s3_bucket, monkeypatch):
    """(proxy, bucket): a fresh bucket on the test S3 endpoint, reached through a fault-injecting
    `PausableProxy` (outages, throttling, trickles, cut connections; see tests/helpers.py)."""
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    proxy = PausableProxy(int(endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    # train() sets the retry budget for the whole process from its config; each test starts at 120 s.
    monkeypatch.setenv("GAPM_STORAGE_RETRY_SECONDS", "120")
    yield proxy, s3_bucket
    proxy.up()  # ends a trickle or throttling, so abandoned reads finish
    proxy.down()


# --------------------------------------------------------------------------- source datasets
# Small datasets written in the exact on-disk formats of the real ones, so the converters are
# tested on the real layouts without downloading anything.



@pytest.fixture()
def cifar10_source(tmp_path):
    """A CIFAR-10 python-version directory: data_batch_1..5 and test_batch, 40 and 30 images.

    Pickled as the originals (protocol 2, bytes keys, ``data`` uint8 (N, 3072) as R, G, B planes).
    Returns (directory, {"train": (images NHWC, labels), "test": (...)}).
    """
    import pickle

    import numpy as np

    rng = np.random.default_rng(1234)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    expected = {"train": ([], []), "test": ([], [])}
    for name, count, split in [(f"data_batch_{i}", 40, "train") for i in range(1, 6)] + [("test_batch", 30, "test")]:
        images = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=count)]
        planes = images.transpose(0, 3, 1, 2).reshape(count, 3072)
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": planes,
            b"filenames": [f"img_{i}.png".encode() for i in range(count)],
        }
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        expected[split][0].append(images)
        expected[split][1].extend(labels)
    return str(root), {split: (np.concatenate(images), labels) for split, (images, labels) in expected.items()}


@pytest.fixture()
def celeba_source(tmp_path):
    """An aligned-CelebA directory: img_align_celeba/NNNNNN.jpg (178x218) + list_eval_partition.txt.

    16 images: 10 train, 3 valid, 3 test. Returns (directory, {split: [file names]}).
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(99)
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    partition = [0] * 10 + [1] * 3 + [2] * 3
    names = {"train": [], "valid": [], "test": []}
    lines = []
    yy, xx = np.mgrid[0:218, 0:178]
    for number, part in enumerate(partition, 1):
        name = f"{number:06d}.jpg"
        base = np.stack([(xx * (number + 1)) % 256, (yy * 2 + number * 7) % 256, (xx + yy) % 256], axis=-1)
        noise = rng.integers(0, 40, size=base.shape)
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "img_align_celeba" / name, quality=90)
        lines.append(f"{name} {part}\n")
        names[("train", "valid", "test")[part]].append(name)
    (root / "list_eval_partition.txt").write_text("".join(lines))
    return str(root), names


@pytest.fixture()
def fashion_mnist_dir() -> str:
    """The real Fashion-MNIST IDX files from Debian's dataset-fashion-mnist package."""
    needed = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz"]
    if not all(os.path.exists(os.path.join(FASHION_MNIST_DIR, name)) for name in needed):
        pytest.skip(f"real Fashion-MNIST not installed at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST_DIR


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny networks on a small, shared CPU run many times faster on one thread than on
    several fighting over the cores. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

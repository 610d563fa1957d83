"""MLflow fixtures: a real `mlflow server` subprocess on 127.0.0.1.

The server keeps runs and the registry in a sqlite file and proxies artifacts
(`--serve-artifacts`, the default) to `s3://<bucket>/mlartifacts` on the moto S3 endpoint of
conftest's `s3_endpoint` fixture. Only the server gets S3 settings it needs
(MLFLOW_S3_ENDPOINT_URL and the test keys): clients reach artifacts through the server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import free_port

SERVER_START_TIMEOUT_S = 120.0




@dataclass
class MlflowServer:
    url: str
    port: int
    bucket: str
    database: Path
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        """Launches the server (does not wait: see `wait_until_healthy`)."""
        from pipeline.tracking.mlflow_sink import prepare_embedded_store

        # Skips ~100 schema migrations (seconds) with the same template the embedded store uses.
        prepare_embedded_store(self.database, "mlflow-artifacts:")
        script = Path(sys.executable).with_name("mlflow")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "mlflow"]
        command += ["server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{self.database}",
                    "--artifacts-destination", f"s3://{self.bucket}/mlartifacts"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_S3_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"],
                   # background job runners (several processes importing mlflow) are not needed
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        return self

    def wait_until_healthy(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited before answering:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"mlflow server at {self.url} not healthy after {timeout_s:.0f}s:\n{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stops the server and its workers (its own process group)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def mlflow_artifact_bucket(s3_endpoint: str) -> str:
    import boto3

    name = f"mlflow-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_server_factory(mlflow_artifact_bucket: str, tmp_path_factory: pytest.TempPathFactory
                          ) -> Iterator[callable]:
    """make_server() -> a not yet started MlflowServer on a free port; all killed at the end."""
    servers: list[MlflowServer] = []

    def make_server() -> MlflowServer:
        directory = tmp_path_factory.mktemp("mlflow-server")
        port = free_port()
        server = MlflowServer(url=f"http://127.0.0.1:{port}", port=port, bucket=mlflow_artifact_bucket,
                              database=directory / "mlflow.db", log_path=directory / "server.log")
        servers.append(server)
        return server

    yield make_server
    for server in servers:
        server.kill()  # nothing to save: a graceful stop only costs seconds


@pytest.fixture(scope="session")
def mlflow_server_launched(mlflow_server_factory) -> MlflowServer:
    """The session's server, launched but maybe not answering yet: a test that does not need
    it can request this to let it start (several seconds) in the background meanwhile."""
    return mlflow_server_factory().start()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_launched: MlflowServer) -> MlflowServer:
    """One running server for the session."""
    mlflow_server_launched.wait_until_healthy()
    return mlflow_server_launched

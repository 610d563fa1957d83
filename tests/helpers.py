"""What several test modules share (fixtures live in conftest.py): the tiny configs — one
definition, tuned per test through keyword arguments — the repository root, and free ports."""

from __future__ import annotations

import io
import os
import re
import socket
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


def tiny_overrides(*, stage1_steps: int = 30, stage2_steps: int = 20, batch_size: int | None = 64,
                   samples: int | None = 512, test_samples: int | None = 256, width: int = 32,
                   latent_widths: int | None = None, checkpoint_every: int = 10, log_every: int = 10,
                   eval_samples: int = 256, discriminator_steps: int = 2, tracking: bool = False,
                   kind: str = "gapm") -> list[str]:
    """`--set` overrides that shrink configs/swissroll.yaml (or any point config) to seconds:
    small networks, few steps, few samples, no progress bar; MLflow off unless `tracking`.
    Another `kind` replaces the config's GAPM settings by that method's defaults (one Adam
    setting for all its networks)."""
    latent_widths = latent_widths or width
    if kind == "gapm":
        method = [f"model.hyperparameters.discriminator_steps={discriminator_steps}"]
    else:
        method = [f"model.kind={kind}", "model.hyperparameters={}", "optimizers={default: {lr: 1.0e-3, betas: [0.5, 0.999]}}"]
    overrides = [*method, f"stage1.steps={stage1_steps}", f"stage2.steps={stage2_steps}", f"model.width={width}",
                 f"model.latent_generator_widths=[{latent_widths}]",
                 f"model.latent_discriminator_widths=[{latent_widths}]", f"train.checkpoint_every={checkpoint_every}",
                 f"train.log_every={log_every}", "train.progress_bar=false", f"eval.samples={eval_samples}"]
    if batch_size is not None:
        overrides.append(f"data.batch_size={batch_size}")
    if samples is not None:
        overrides.append(f"data.swissroll_samples={samples}")
    if test_samples is not None:
        overrides.append(f"data.swissroll_test_samples={test_samples}")
    if not tracking:
        overrides.append("tracking.enabled=false")
    return overrides


# Image models on 28x28 shards: 2 stage-1 + 2 stage-2 steps, a checkpoint every 2.
TINY_IMAGES = ["model.data_shape=[1, 28, 28]", "model.latent_dim=8", "model.prior_dim=8", "model.width=8",
               "model.latent_generator_widths=[16]", "model.latent_discriminator_widths=[16]",
               "stage1.steps=2", "stage2.steps=2", "model.hyperparameters.discriminator_steps=1", "data.batch_size=16",
               "train.checkpoint_every=2", "train.log_every=2", "train.progress_bar=false", "eval.samples=32",
               "tracking.system_metrics=false"]


def tiny_config(output_dir: Path | str, *extra: str, config: str = "configs/swissroll.yaml", **tiny: object):
    """configs/swissroll.yaml (or `config`) shrunk by `tiny_overrides(**tiny)`, writing under
    `output_dir`; `extra` overrides come last and win."""
    from pipeline.config import load_config

    return load_config(ROOT / config, [f"output_dir={output_dir}", *tiny_overrides(**tiny), *extra])


def train(config, **options):
    """Trains an experiment config as `gapm train` does: the loop runs the config's training job
    (`pipeline.config.training_job`). `options`: resume, tracker, stop."""
    from pipeline.config import training_job
    from pipeline.train.loop import train as train_job

    return train_job(training_job(config), **options)


def differing_parameters(first, second) -> list[str]:
    """Names of the tensors that differ between two checkpoints' models ([]: bit-identical)."""
    import torch

    from pipeline import checkpoints

    a, b = checkpoints.load_model(first)[0].state_dict(), checkpoints.load_model(second)[0].state_dict()
    return [name for name in a if not torch.equal(a[name], b[name])]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PausableProxy:
    """A TCP proxy on 127.0.0.1 in front of a server (the test S3 endpoint), for outages:
    `down()` closes the port and cuts open connections — clients get "connection refused",
    as when the storage service is stopped — and `up()` opens it again on the same port.

    Faults for the storage tests: `outage(seconds)` (down now, up again after `seconds`;
    None: for good), `trickle(interval)` (the server's bytes reach the client one per
    `interval` seconds, as from a stalled link, until `full_speed()`), `throttle()` (every new
    request is answered 503 SlowDown until `up()`), and `after_bytes(n, fault)`: run `fault()`
    once `n` more bytes have come from the server, before they go on to the client — mid-
    response, at a point that does not depend on the machine's speed, and felt by every byte
    after it."""

    def __init__(self, target_port: int):
        import threading

        self.target_port = target_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._connections: list = []
        self._listener = None
        self.trickle_interval: float | None = None
        self.throttling = False
        self.relayed = 0  # bytes from the server to the clients so far
        self._trigger: tuple[int, object] | None = None
        self.faults_fired = 0
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        import threading

        self.throttling = False
        self.trickle_interval = None
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            try:  # wakes the thread blocked in accept(); close() alone leaves the port listening
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        self.cut_connections()

    def cut_connections(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def outage(self, seconds: float | None) -> None:
        import threading

        self.down()
        if seconds is not None:
            timer = threading.Timer(seconds, self.up)
            timer.daemon = True
            timer.start()

    def trickle(self, interval: float) -> None:
        self.trickle_interval = interval

    def full_speed(self) -> None:
        self.trickle_interval = None

    def throttle(self) -> None:
        self.throttling = True
        self.cut_connections()

    def after_bytes(self, count: int, fault) -> None:
        with self._lock:
            self._trigger = (self.relayed + count, fault)

    def _count(self, size: int):
        """Counts bytes from the server; the fault to run now, if they complete its count."""
        with self._lock:
            self.relayed += size
            trigger = self._trigger
            if trigger is None or self.relayed < trigger[0]:
                return None
            self._trigger = None
            self.faults_fired += 1
            return trigger[1]

    def _accept(self, listener) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            if self.throttling:
                threading.Thread(target=self._answer_slow_down, args=(client,), daemon=True).start()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    @staticmethod
    def _answer_slow_down(client) -> None:
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")
        try:
            client.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                data = client.recv(65536)
                if not data:
                    break
                request += data
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        except OSError:
            pass
        finally:
            client.close()

    def _pipe(self, source, target, from_server: bool) -> None:
        import time

        try:
            while data := source.recv(65536):
                if from_server:
                    fault = self._count(len(data))
                    if fault is not None:
                        fault()  # before these bytes go on: every byte after the count meets the fault
                    while data and self.trickle_interval is not None:
                        target.sendall(data[:1])
                        data = data[1:]
                        time.sleep(self.trickle_interval)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def storage_warnings(caplog) -> list[str]:
    """The warnings about storage (outages, retries, recoveries) that `caplog` caught, in order."""
    import logging

    return [r.getMessage() for r in caplog.records if "storage" in r.getMessage() and r.levelno >= logging.WARNING]


# The variables through which a scheduler or launcher tells a process its place in a job.
SCHEDULER_VARIABLES = re.compile(r"^(SLURM_|PET_|GAPM_|ACCELERATE_)|^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|"
                                 r"MASTER_ADDR|MASTER_PORT|JOB_COMPLETION_INDEX|NODE_RANK|GROUP_RANK)$")


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any scheduler's variables, plus `extra`; launchers
    run gapm with this interpreter (GAPM_PYTHON), one torch thread per process."""
    env = {key: value for key, value in os.environ.items() if not SCHEDULER_VARIABLES.search(key)}
    env.update({"GAPM_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GAPM_LOG_LEVEL": "WARNING", **extra})
    return env


def rewrite_tar(path, change=lambda name, data: data, *, format: int = tarfile.DEFAULT_FORMAT, shift_times: int = 0) -> None:
    """Rewrite the tar at `path` in place, each member's bytes through `change(name, data)` and
    its mtime moved by `shift_times` seconds: damaged or re-packed shards for the reader's tests."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=format) as tar:
        for member, data in members:
            data = change(member.name, data)
            member.size = len(data)
            member.mtime += shift_times
            tar.addfile(member, io.BytesIO(data))

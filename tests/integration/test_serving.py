"""The registered model served by a real `mlflow models serve` (--env-manager local, outside the
repository, artifacts through a real `mlflow server`): a tiny point model (default suite) and a
tiny image model (slow). Every request form of MLflow's scoring server is answered or refused
in one line; every request docs/tracking.md shows works; and samples from a checkpoint, its
registered model (`gapm sample`, `mlflow.pyfunc`) and the server agree bit for bit."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FASHION_MNIST_DIR, ROOT, TINY_IMAGES, free_port, tiny_overrides, train

from gapm import Method
from pipeline import checkpoints
from pipeline.config import load_config
from pipeline.data.shards import convert_dataset
from pipeline.tracking import served_model
from pipeline.tracking.served_model import MAX_SAMPLES_PER_ROW

SERVE_START_TIMEOUT_S = 300  # a cold `mlflow models serve` on a small, shared CPU


@dataclass
class Served:
    """A trained, registered model (alias `serving`) and the server answering for it."""

    kind: str  # "points" | "images"
    name: str  # registered model name
    checkpoint: Path
    model: Method  # rebuilt from the checkpoint, to compute what the server must answer
    url: str = ""

    def post(self, body: object | bytes, content_type: str = "application/json") -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url, data=data, method="POST", headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def samples(self, *requests: tuple[int, int]) -> np.ndarray:
        return np.concatenate([served_model.sample(self.model, n, seed).numpy() for n, seed in requests])

    def reconstructions(self, batch: np.ndarray) -> np.ndarray:
        return served_model.reconstruct(self.model, torch.from_numpy(batch)).numpy()

    def inputs(self, count: int) -> np.ndarray:
        """A batch to reconstruct, in data space: the model's own samples (seed 99)."""
        return served_model.sample(self.model, count, 99).numpy()


def serving_environment(**extra: str) -> dict[str, str]:
    """Without this checkout on the path and without S3 settings (artifacts come through the
    tracking server); this environment's bin first, for uvicorn."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_")) and k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def trained(kind: str, mlflow_server, work: Path) -> Served:
    name = f"s{uuid.uuid4().hex[:8]}"
    overrides = [f"name={name}", f"output_dir={work / 'runs'}"]
    if kind == "points":
        overrides += [*tiny_overrides(stage1_steps=10, stage2_steps=10, tracking=True), "tracking.system_metrics=false"]
    else:
        if not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").exists():
            pytest.skip(f"real Fashion-MNIST not installed at {FASHION_MNIST_DIR}")
        convert_dataset("fashion-mnist", FASHION_MNIST_DIR, str(work / "fm"), limit=200, samples_per_shard=100)
        overrides += [f"data.train={work / 'fm/train'}", f"data.test={work / 'fm/test'}", *TINY_IMAGES]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        result = train(load_config(ROOT / "configs/swissroll.yaml", overrides), resume="never")
    model, _ = checkpoints.load_model(result.final_checkpoint)
    return Served(kind, f"gapm-{name}", Path(result.final_checkpoint), model)


def start_serving(served: Served, mlflow_server, work: Path) -> subprocess.Popen:
    from mlflow.tracking import MlflowClient

    MlflowClient(mlflow_server.url).set_registered_model_alias(served.name, "serving", "1")
    port = free_port()
    served.url = f"http://127.0.0.1:{port}/invocations"
    log_path = work / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{served.name}@serving",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            cwd=work, env=serving_environment(MLFLOW_TRACKING_URI=mlflow_server.url), start_new_session=True,
            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SERVE_START_TIMEOUT_S
    while True:
        assert server.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)


def stop_serving(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)


def _served(kind: str, mlflow_server, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"served-{kind}")
    served = trained(kind, mlflow_server, work)
    server = start_serving(served, mlflow_server, work)
    try:
        yield served
    finally:
        stop_serving(server)


@pytest.fixture(scope="module")
def served_points(mlflow_server, tmp_path_factory):
    yield from _served("points", mlflow_server, tmp_path_factory)


@pytest.fixture(scope="module")
def served_images(mlflow_server, tmp_path_factory):
    yield from _served("images", mlflow_server, tmp_path_factory)


@pytest.fixture(params=["points", pytest.param("images", marks=pytest.mark.slow)])
def served(request) -> Served:
    return request.getfixturevalue(f"served_{request.param}")


SAMPLE_FORMS = {  # name: (content type, body, the (n, seed) rows it asks for)
    "inputs, one value each": ("application/json", {"inputs": {"n": 3, "seed": 4}}, [(3, 4)]),
    "inputs, no seed": ("application/json", {"inputs": {"n": 3}}, [(3, 0)]),
    "inputs, tensor of one": ("application/json", {"inputs": {"n": [4], "seed": [0]}}, [(4, 0)]),
    "inputs, columns": ("application/json", {"inputs": {"n": [2, 3], "seed": [4, 5]}}, [(2, 4), (3, 5)]),
    "inputs, columns, one seed": ("application/json", {"inputs": {"n": [2, 3], "seed": 4}}, [(2, 4), (3, 4)]),
    "inputs, records": ("application/json", {"inputs": [{"n": 2, "seed": 4}, {"n": 3, "seed": 5}]},
                        [(2, 4), (3, 5)]),
    "instances": ("application/json", {"instances": [{"n": 2, "seed": 4}, {"n": 3, "seed": 5}]}, [(2, 4), (3, 5)]),
    "dataframe_records": ("application/json", {"dataframe_records": [{"n": 2, "seed": 4}, {"n": 3, "seed": 5}]},
                          [(2, 4), (3, 5)]),
    "dataframe_split": ("application/json", {"dataframe_split": {"columns": ["n", "seed"], "data": [[2, 4], [3, 5]]}},
                        [(2, 4), (3, 5)]),
    "csv": ("text/csv", b"n,seed\n2,4\n3,5\n", [(2, 4), (3, 5)]),
}


@pytest.mark.parametrize("form", SAMPLE_FORMS)
def test_every_request_form_samples_exactly_as_registry_sample(served, form):
    content_type, body, rows = SAMPLE_FORMS[form]
    status, answer = served.post(body, content_type)
    assert status == 200, answer
    assert np.array_equal(np.asarray(answer["predictions"], dtype=np.float32), served.samples(*rows))


def test_every_request_form_reconstructs(served):
    batch = served.inputs(3)
    expected = served.reconstructions(batch)
    item = batch[0].tolist()
    forms = {
        "inputs, a batch": {"inputs": {"data": batch.tolist()}},
        "instances": {"instances": [{"data": batch.tolist()}]},
        "dataframe_records, one batch": {"dataframe_records": [{"data": batch.tolist()}]},
        "dataframe_records, one item a row": {"dataframe_records": [{"data": row.tolist()} for row in batch]},
        "dataframe_split": {"dataframe_split": {"columns": ["data"], "data": [[batch.tolist()]]}},
    }
    for form, body in forms.items():
        status, answer = served.post(body)
        assert status == 200, (form, answer)
        assert np.allclose(answer["predictions"], expected, atol=1e-6), form
    status, answer = served.post({"inputs": {"data": item}})  # one item, no batch dimension
    assert status == 200 and np.allclose(answer["predictions"], expected[:1], atol=1e-6), answer
    # Rows of both kinds, in order: samples, then reconstructions.
    status, answer = served.post({"dataframe_records": [{"n": 2, "seed": 1}, {"data": batch.tolist()}]})
    assert status == 200, answer
    predictions = np.asarray(answer["predictions"], dtype=np.float32)
    assert np.array_equal(predictions[:2], served.samples((2, 1)))
    assert np.allclose(predictions[2:], expected, atol=1e-6)


def test_every_refusal_is_one_line(served):
    shape = list(served.model.shape.data_shape)
    dims = ", ".join(map(str, shape))
    wrong = np.full((40, *[d + 1 for d in shape]), 0.5).tolist()  # thousands of numbers, none of them echoed
    item = served.inputs(1)[0].tolist()
    refusals = [
        ({"inputs": {"data": wrong}},
         f"data must be a batch of shape (N, {dims}), got shape {(40, *[d + 1 for d in shape])}"),
        ({"dataframe_records": [{"data": wrong}]}, f"data must be a batch of shape (N, {dims}), got shape"),
        ({"inputs": [item, item]}, "unnamed inputs"),
        ({"instances": [item, item]}, "unnamed inputs"),
        ({"inputs": {"seed": 1}}, "each row needs either n"),
        ({"dataframe_records": [{"n": 2, "data": item}]}, "each row needs either n"),
        ({"inputs": {"n": 0}}, f"n must be an integer from 1 to {MAX_SAMPLES_PER_ROW}, got 0"),
        ({"inputs": {"n": MAX_SAMPLES_PER_ROW + 1}}, "n must be an integer from 1"),
        ({"inputs": {"n": 2.5}}, "n must be an integer from 1"),
        ({"inputs": {"n": 2, "seed": "x"}}, "seed must be an integer, got 'x'"),
        ({"inputs": {"n": [1, 2, 3], "seed": [0, 1]}}, "3 values of n but 2 seeds"),
    ]
    for body, expected in refusals:
        status, answer = served.post(body)
        message = answer.get("message", "")
        assert status == 400 and message.startswith(expected), (body if len(str(body)) < 200 else expected, answer)
        assert "\n" not in message and len(message) < 250, message[:500]


def documented_requests() -> list[tuple[set[str], list[str]]]:
    """(the model kinds it is for, its command lines) of each request in docs/tracking.md's
    serving block: the sampling requests are for every model, the reconstructions for the
    kind their comment names."""
    text = (ROOT / "docs/tracking.md").read_text()
    block = text[text.index("mlflow models serve -m"):]
    block = block[:block.index("```")]
    requests, kinds, pending = [], {"points", "images"}, []
    for line in block.splitlines():
        if line.startswith("# samples"):
            kinds = {"points", "images"}
        elif line.startswith("# reconstructions from a point model"):
            kinds = {"points"}
        elif line.startswith("# reconstructions from an image model"):
            kinds = {"images"}
        elif line.startswith("python "):
            pending.append(line)
        elif line.startswith("curl "):
            requests.append((kinds, [*pending, line]))
            pending = []
    return requests


def test_every_documented_request_works(served, tmp_path):
    requests = documented_requests()
    assert len(requests) >= 7 and any(kinds == {"images"} for kinds, _ in requests)
    np.save(tmp_path / "samples.npy", served.inputs(6))  # what `gapm sample --out samples.png` writes
    for kinds, lines in requests:
        if served.kind not in kinds:
            continue
        for line in lines[:-1]:  # python -c '...' > request.json
            words = shlex.split(line)
            with open(tmp_path / words[-1], "w") as out:
                subprocess.run([sys.executable, *words[1:-2]], cwd=tmp_path, stdout=out, check=True, timeout=120)
        words = shlex.split(lines[-1])
        content_type = words[words.index("-H") + 1].split(":", 1)[1].strip()
        body = words[words.index("-d") + 1]
        data = (tmp_path / body[1:]).read_bytes() if body.startswith("@") else body.encode()
        status, answer = served.post(data, content_type)
        assert status == 200, (lines[-1], answer)
        predictions = np.asarray(answer["predictions"], dtype=np.float32)
        assert predictions.shape[1:] == tuple(served.model.shape.data_shape) and len(predictions) > 0, lines[-1]


@pytest.mark.slow  # an image model trained, registered and served; two `gapm sample` processes
def test_checkpoint_registered_model_pyfunc_and_server_give_the_same_samples(served_images, mlflow_server, tmp_path,
                                                                           monkeypatch):
    """For the same seed and n, bit for bit: `gapm sample CHECKPOINT`, `gapm sample
    models:/NAME@ALIAS`, `mlflow.pyfunc.load_model(models:/NAME@ALIAS).predict` and
    `mlflow models serve` over HTTP."""
    import mlflow.pyfunc

    count, seed = 24, 11
    env = serving_environment(MLFLOW_TRACKING_URI=mlflow_server.url)
    env["PYTHONPATH"] = str(ROOT)  # `gapm` itself, from this checkout
    from_cli = {}
    for label, uri in (("checkpoint", str(served_images.checkpoint)), ("registry", f"models:/{served_images.name}@serving")):
        out = tmp_path / f"{label}.png"
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "sample", uri, "-n", str(count), "--seed", str(seed),
                               "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        from_cli[label] = np.load(out.with_suffix(".npy"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    from_pyfunc = mlflow.pyfunc.load_model(f"models:/{served_images.name}@serving").predict({"n": count, "seed": seed})
    status, answer = served_images.post({"inputs": {"n": count, "seed": seed}})
    assert status == 200, answer
    from_server = np.asarray(answer["predictions"], dtype=np.float32)

    assert from_cli["checkpoint"].shape == (count, 1, 28, 28) and from_cli["checkpoint"].dtype == np.float32
    assert len(np.unique(from_cli["checkpoint"].reshape(count, -1), axis=0)) == count  # distinct samples
    for label, samples in (("registry", from_cli["registry"]), ("pyfunc", from_pyfunc), ("server", from_server)):
        assert np.array_equal(samples, from_cli["checkpoint"]), label
    other_seed = served_images.samples((count, seed + 1))
    assert not np.array_equal(other_seed, from_cli["checkpoint"])  # the seed matters

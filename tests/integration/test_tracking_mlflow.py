"""MLflow tracking, checkpoints as artifacts and the model registry, against a real
`mlflow server` (sqlite backend, artifacts proxied to the moto S3 endpoint) and against the
embedded default (a sqlite store in the run directory)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
from helpers import ROOT, tiny_config, train
from mlflow.tracking import MlflowClient

from pipeline import checkpoints, cli
from pipeline.config import load_config
from pipeline.tracking import registry
from pipeline.tracking.mlflow_sink import RUN_ID_FILE, MlflowTracker
from pipeline.redaction import MASK, redact_mapping
from pipeline.tracking.tracker import (
    MultiTracker,
    NullTracker,
    RunDirectoryTracker,
    git_commit,
)

REPO = ROOT
# 20 stage-1 + 10 stage-2 steps, logged every 5, a checkpoint every 10 (steps 10, 20, 30).
def tracked_config(output_dir: Path, *extra: str, name: str | None = None):
    """The tiny swiss-roll config, tracked in MLflow: one experiment (and registered model) per
    test unless `name` is given."""
    name = name or f"t{uuid.uuid4().hex[:8]}"
    return tiny_config(output_dir, f"name={name}", "tracking.system_metrics=false", *extra,
                       stage1_steps=20, stage2_steps=10, log_every=5, tracking=True)


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_secrets_are_masked_in_params():
    masked = redact_mapping({"storage": {"aws_secret_access_key": "wJalrXUtnFEMI", "password": "p",
                                       "endpoint": "https://alice:hunter2@minio:9000/x", "token": None},
                           "data": {"train": "s3://AKIAIOSFODNN7EXAMPLE@bucket/shards"}, "lr": 0.1})
    assert masked == {"storage": {"aws_secret_access_key": MASK, "password": MASK,
                                  "endpoint": f"https://alice:{MASK}@minio:9000/x", "token": None},
                      "data": {"train": f"s3://{MASK}@bucket/shards"}, "lr": 0.1}


@pytest.mark.slow  # servers started and killed around a run, ~25 s
def test_training_survives_mlflow_down_then_up_then_killed(mlflow_server_factory, mlflow_server_launched, tmp_path,
                                                           caplog):
    """The server is down when training starts, comes up during stage 1, and is killed during
    stage 2: training finishes, warns once per outage, and what was kept during the first
    outage reaches the same run. (First in this file: `mlflow_server_launched` lets the
    session's server start meanwhile.)"""
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    server = mlflow_server_factory()  # not started yet: nothing listens on its port
    config = tracked_config(tmp_path)
    run_dir = config.run_dir
    mlflow = MlflowTracker(run_dir, config.name, tracking_uri=server.url, system_metrics=False,
                           retry_interval_s=0.2, max_retry_interval_s=1.0, finish_timeout_s=1.0)
    seen: dict[str, object] = {}

    class Outages(NullTracker):
        def log_metrics(self, metrics, step):
            if step == 5:  # first metrics: the server was never reachable
                seen["run_before_server"] = mlflow.run_id
                server.start().wait_until_healthy()
                seen["flushed"] = mlflow.flush(timeout_s=60)
            if step == 25:  # stage 2: deliver stage 1, then the server dies
                seen["flushed_stage1"] = mlflow.flush(timeout_s=60)
                seen["stage1_steps"] = steps(MlflowClient(server.url), mlflow.run_id, "stage1/reconstruction_mse")
                server.kill()

    tracker = MultiTracker(RunDirectoryTracker(run_dir), mlflow, Outages())
    result = train(config, resume="never", tracker=tracker)

    assert result.final_checkpoint.name == "step-00000030"
    assert seen["run_before_server"] is None and seen["flushed"] and seen["flushed_stage1"]
    assert seen["stage1_steps"] == [5, 10, 15, 20]
    assert (run_dir / RUN_ID_FILE).read_text().strip() == mlflow.run_id
    calls, metrics = mlflow.pending()
    assert calls > 0 and metrics > 0  # stage 2, pictures, model: kept, never delivered
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("pipeline.tracking")]
    assert sum("is unreachable" in m for m in messages) == 2, messages  # once per outage
    assert sum("reachable again" in m for m in messages) == 1, messages
    assert sum("unreachable at the end of training" in m for m in messages) == 1, messages
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "stage2/latent_generator_loss" in row] == [25, 30]


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, tmp_path_factory):
    """One tiny training run tracked on the server. keep_last_checkpoints=1: MLflow still gets
    every checkpoint although the run directory keeps only the last."""
    config = tracked_config(tmp_path_factory.mktemp("tracked"), "train.keep_last_checkpoints=1",
                         "tracking.system_metrics=true")
    with pytest.MonkeyPatch.context() as patch, registry_lines() as lines:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # default 10 s: longer than the run
        result = train(config, resume="never")
    name = f"gapm-{config.name}"
    assert lines == [f"MLflow: registered {name} version 1 (models:/{name}/1)"]
    run_id = (result.run_dir / RUN_ID_FILE).read_text().strip()
    return config, result, run_id, MlflowClient(mlflow_server.url)


@contextlib.contextmanager
def registry_lines():
    """The messages about registering that pipeline.tracking logs meanwhile."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage()) if "registered" in record.getMessage() else None
    logger = logging.getLogger("pipeline.tracking")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_run_has_params_tags_and_metrics_of_both_stages(tracked_run):
    config, result, run_id, client = tracked_run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == (config.tracking.experiment or config.name)
    assert run.info.run_name == config.name
    params = run.data.params
    assert params["stage1.steps"] == "20" and params["model.data_shape"] == "[2]"
    assert params["tracking.registered_model_name"] == "null"
    tags = run.data.tags
    assert tags["stage"] == "2" and tags["dataset"] == "swissroll" and tags["world_size"] == "1"
    if git_commit():
        assert tags["git_commit"] == git_commit()
        assert tags["mlflow.source.git.commit"] == git_commit().removesuffix("-dirty")
    assert steps(client, run_id, "stage1/reconstruction_mse") == [5, 10, 15, 20]
    assert steps(client, run_id, "stage2/latent_generator_loss") == [25, 30]
    for key in ("stage1/samples_per_second", "stage1/lr_autoencoder", "stage2/lr_latent_generator",
                "eval/reconstruction_mse", "eval/sample_mmd", "system/cpu_utilization_percentage"):
        assert key in run.data.metrics, key
    assert run.data.metrics["eval/sample_mmd"] == pytest.approx(result.metrics["eval/sample_mmd"])


def test_pictures_config_and_every_checkpoint_are_artifacts_in_s3(tracked_run, mlflow_artifact_bucket):
    config, result, run_id, client = tracked_run
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"figure4.png", "config.yaml", "checkpoints"} <= top
    kept = [p.name for p in checkpoints.list_checkpoints(result.run_dir / "checkpoints")]
    assert kept == ["step-00000030"]
    logged = sorted(Path(a.path).name for a in client.list_artifacts(run_id, "checkpoints"))
    assert logged == ["step-00000010", "step-00000020", "step-00000030"]
    assert {Path(a.path).name for a in client.list_artifacts(run_id, "checkpoints/step-00000010")} == {
        "model.safetensors", "training_state.pt", "meta.json"}
    # The server stored them in the S3 bucket; this client never needed S3 credentials.
    keys = [o["Key"] for page in boto3.session.Session().client("s3").get_paginator("list_objects_v2")
            .paginate(Bucket=mlflow_artifact_bucket, Prefix="mlartifacts/") for o in page.get("Contents", [])]
    assert any(k.endswith(f"{run_id}/artifacts/checkpoints/step-00000010/model.safetensors") for k in keys)
    assert any(k.endswith(f"{run_id}/artifacts/figure4.png") for k in keys)


def test_registered_model_samples_like_the_checkpoint_in_a_fresh_process(tracked_run, mlflow_server, tmp_path,
                                                                         monkeypatch):
    config, result, run_id, client = tracked_run
    name = f"gapm-{config.name}"
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    assert cli.main(["register", run_id, "--alias", "champion"]) == 0
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"  # no second version

    # A fresh process without any S3 settings: artifacts come through the tracking server.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env["MLFLOW_TRACKING_URI"] = mlflow_server.url
    out = tmp_path / "grid.png"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "sample", f"models:/{name}@champion", "-n", "64",
                           "--out", str(out), "--seed", "7"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.is_file()
    from_registry = np.load(tmp_path / "grid.npy")
    model, _ = checkpoints.load_model(result.final_checkpoint)
    assert np.array_equal(from_registry, registry.sample(model, 64, 7).numpy())


def test_rerunning_the_finished_training_registers_nothing_new_and_says_so(tracked_run, mlflow_server,
                                                                           monkeypatch):
    """`gapm train` again once finished: nothing to train, the model is logged already, and the
    line says "already registered" rather than "registered" (the fixture saw that one)."""
    config, result, run_id, client = tracked_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    with registry_lines() as lines:
        again = train(config, resume="auto")
    name = f"gapm-{config.name}"
    assert again.final_checkpoint.name == result.final_checkpoint.name
    assert lines == [f"MLflow: already registered as {name} version 1 (models:/{name}/1)"]
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]


def environment_outside_checkout(**extra: str) -> dict[str, str]:
    """A process environment without this checkout on the path and without S3 settings:
    artifacts come through the tracking server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_")) and k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # uvicorn of this env
    return {**env, **extra}


def test_registered_model_loads_where_gapm_is_not_installed(tracked_run, mlflow_server, tmp_path, monkeypatch):
    """The logged model carries its code: in an interpreter that cannot import gapm or
    pipeline (no site hooks: the editable install is invisible), `mlflow.pyfunc.load_model`
    runs it, from the model's own copy of gapm, and it has a signature and requirements."""
    import sysconfig

    import mlflow.artifacts

    config, result, run_id, client = tracked_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/gapm-{config.name}/1",
                                                     dst_path=str(tmp_path / "model")))
    requirements = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} == {"mlflow", "torch", "safetensors", "numpy", "pandas"}
    script = """
import json, sys
try:
    import gapm
    raise SystemExit("gapm is importable without the model")
except ImportError:
    pass
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
import gapm
inputs = list(model.metadata.metadata["gapm_inputs"])
print(json.dumps({"gapm": gapm.__file__, "pipeline_loaded": "pipeline" in sys.modules, "inputs": inputs,
                  "samples": model.predict({"n": 8, "seed": 2}).tolist()}))
"""
    paths = os.pathsep.join(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))
    done = subprocess.run([sys.executable, "-S", "-c", script, str(local)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180, env=environment_outside_checkout(PYTHONPATH=paths))
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["gapm"].startswith(str(local)) and not answer["pipeline_loaded"]
    assert sorted(answer["inputs"]) == ["data", "n", "seed"]  # listed in the metadata (MLmodel sorts them)
    expected = registry.sample(checkpoints.load_model(result.final_checkpoint)[0], 8, 2).numpy()
    assert np.array_equal(np.asarray(answer["samples"], dtype=np.float32), expected)


def test_params_logged_through_the_tracker_are_masked(mlflow_server, tmp_path):
    tracker = MlflowTracker(tmp_path, f"m{uuid.uuid4().hex[:8]}", tracking_uri=mlflow_server.url,
                            system_metrics=False)
    tracker.log_params({"storage": {"secret_key": "abc123", "url": "https://bob:pw@host/x"}, "seed": 3})
    tracker.finish()
    client = MlflowClient(mlflow_server.url)
    params = client.get_run(tracker.run_id).data.params
    assert params == {"storage.secret_key": MASK, "storage.url": f"https://bob:{MASK}@host/x", "seed": "3"}
    config_artifact = client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path))
    assert "abc123" not in Path(config_artifact).read_text() and "pw@" not in Path(config_artifact).read_text()


@pytest.mark.slow  # embedded store, resume, register, sample in a subprocess: ~30 s
def test_embedded_store_resume_registry_and_sample(tmp_path, monkeypatch, caplog):
    """No MLFLOW_TRACKING_URI: sqlite in the run directory, the registry on it, a resumed
    training continuing the same MLflow run, and `gapm sample models:/NAME@ALIAS`."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tracked_config(tmp_path, "stage2.steps=0")  # stage 1 only
    train(config, resume="never")
    run_dir = config.run_dir
    assert (run_dir / "mlflow.db").is_file() and (run_dir / "mlartifacts").is_dir()
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()

    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    resumed = tracked_config(tmp_path, name=config.name)  # now with stage 2
    result = train(resumed, resume="auto")
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id  # the same MLflow run
    assert any("changed config keys stage2.steps" in r.getMessage() for r in caplog.records)

    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    client = MlflowClient(uri)
    assert steps(client, run_id, "stage1/reconstruction_mse") == [5, 10, 15, 20]
    assert steps(client, run_id, "stage2/latent_generator_loss") == [25, 30]
    assert client.get_run(run_id).info.status == "FINISHED"
    name = f"gapm-{config.name}"
    versions = client.search_model_versions(f"name = '{name}'")
    assert max(versions, key=lambda v: int(v.version)).tags["gapm.checkpoint_step"] == "30"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert cli.main(["register", run_id, "--alias", "best"]) == 0  # the newest model: registered already
    assert len(client.search_model_versions(f"name = '{name}'")) == len(versions)
    assert client.get_model_version_by_alias(name, "best").tags["gapm.checkpoint_step"] == "30"
    out = tmp_path / "samples.png"
    assert cli.main(["sample", f"models:/{name}@best", "-n", "32", "--out", str(out), "--seed", "3"]) == 0
    model, _ = checkpoints.load_model(result.final_checkpoint)
    expected = registry.sample(model, 32, 3).numpy()
    assert np.array_equal(np.load(tmp_path / "samples.npy"), expected)

    # The pyfunc flavour: the model's own code (served_model.py and its copy of gapm).
    import mlflow.pyfunc

    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@best")
    assert np.array_equal(pyfunc.predict({"n": 32, "seed": 3}), expected)
    points = np.load(run_dir / "recon.npy")[:8]
    assert pyfunc.predict({"data": points}).shape == (8, 2)


def test_sample_and_register_fail_clearly(mlflow_server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["sample", "models:/nothing@here", "--out", str(tmp_path / "x.png")]) == 2
    assert "MLFLOW_TRACKING_URI is not set" in capsys.readouterr().err
    assert cli.main(["sample", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "neither a checkpoint directory" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    assert cli.main(["register", "0123456789abcdef", "--alias", "x"]) == 2
    assert "has no run 0123456789abcdef" in capsys.readouterr().err


@pytest.mark.slow  # one more tracked run, ~25 s
def test_checkpoints_in_s3_are_referenced_and_the_model_still_registered(mlflow_server, s3_bucket, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    config = tracked_config(tmp_path, f"train.checkpoint_dir=s3://{s3_bucket}/checkpoints", "stage1.steps=10")
    result = train(config, resume="never")
    run_id = (config.run_dir / RUN_ID_FILE).read_text().strip()
    client = MlflowClient(mlflow_server.url)
    assert client.get_run(run_id).data.tags["gapm.latest_checkpoint"] == f"s3://{s3_bucket}/checkpoints/step-00000020"
    assert "checkpoints" not in {a.path for a in client.list_artifacts(run_id)}  # referenced, not copied
    expected = registry.sample(checkpoints.load_model(result.final_checkpoint)[0], 16, 0).numpy()
    for uri in (f"models:/gapm-{config.name}/1", f"runs:/{run_id}/model", result.final_checkpoint):
        assert np.array_equal(registry.sample(registry.load_generator(uri), 16, 0).numpy(), expected), uri


def test_tracking_config_keys():
    config = load_config(None)
    assert (config.tracking.enabled, config.tracking.registered_model_name, config.tracking.log_checkpoints) == (
        True, None, True)
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="tracking.registered_model_name"):
        load_config(None, ["tracking.registered_model_name=a/b"])
    with pytest.raises(ConfigError, match="unknown config key 'tracking.uri'"):
        load_config(None, ["tracking.uri=http://x"])

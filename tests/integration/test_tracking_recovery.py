"""MLflow loses nothing when the trainer dies with deliveries pending, and no secret reaches a log,
a param, a tag or a run-directory file — against a real `mlflow server` (tests/mlflow_fixtures.py)
and real `gapm train` processes killed with SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from helpers import ROOT, clean_environment, tiny_overrides, train
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.tracking.mlflow_sink import RUN_ID_FILE, MlflowTracker
from pipeline.tracking.reconcile import UPLOAD_STAGING
from pipeline.tracking.tracker import MultiTracker, RunDirectoryTracker

CONFIG = ROOT / "configs/swissroll.yaml"


def recorded(run_dir: Path) -> dict[str, Counter]:
    """{key: Counter of (step, value)} of every value in the run directory's metrics.jsonl."""
    values: dict[str, Counter] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key not in ("step", "time"):
                values.setdefault(key, Counter())[(row["step"], value)] += 1
    return values


def held(client: MlflowClient, run_id: str, keys) -> dict[str, Counter]:
    return {key: Counter((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def checkpoint_artifacts(client: MlflowClient, run_id: str) -> dict[str, set[str]]:
    """{step-N: the names of its files} among the run's artifacts."""
    return {Path(d.path).name: {Path(f.path).name for f in client.list_artifacts(run_id, d.path)}
            for d in client.list_artifacts(run_id, "checkpoints")}


CHECKPOINT_FILES = {"model.safetensors", "training_state.pt", "meta.json"}


def fake_checkpoint(directory: Path, size: int = 64) -> Path:
    directory.mkdir(parents=True)
    for name in sorted(CHECKPOINT_FILES):
        (directory / name).write_bytes(os.urandom(size) if name != "meta.json" else b"{}")
    return directory


def test_reconcile_sends_only_what_the_run_lacks(mlflow_server, tmp_path, caplog):
    """A record some of which reached the run (an acknowledgement lost in between), a torn
    last line, a step recorded twice, checkpoints local, staged, half-staged and half-uploaded:
    two starts later the run holds each recorded value exactly once per record line and every
    whole checkpoint, and nothing was sent twice."""
    client = MlflowClient(mlflow_server.url)
    experiment = f"r{uuid.uuid4().hex[:8]}"
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_ID_FILE).write_text(run_id + "\n")
    rows = [{"step": s, "time": 1000.0 + s, "stage1/loss": 1.0 / s, "stage1/lr": 0.001} for s in (5, 10, 15, 20)]
    rows.append({"step": 15, "time": 2000.0, "stage1/loss": 1.0 / 15, "stage1/lr": 0.001})  # re-trained after a resume
    rows.append({"step": 20, "time": 2001.0, "stage1/diverged": float("nan"), "stage1/huge": float("inf")})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 25, "ti')
    # Delivered before the trainer died, its acknowledgement lost: must not be sent again. The
    # outbox stamps a value with its own clock, a little after the record's (with the very same
    # timestamp MLflow's SQL store would drop the copy itself).
    client.log_batch(run_id, metrics=[Metric("stage1/loss", 1.0 / s, int((1000.0 + s) * 1000) + 3, s)
                                      for s in (5, 10)])
    fake_checkpoint(run_dir / "checkpoints" / "step-00000020")
    fake_checkpoint(run_dir / UPLOAD_STAGING / "step-00000010-17")  # pruned before its upload
    fake_checkpoint(run_dir / UPLOAD_STAGING / ".step-00000015-18.partial")  # linking cut short
    half = fake_checkpoint(tmp_path / "half")  # an upload cut short: meta.json only
    client.log_artifact(run_id, str(half / "meta.json"), "checkpoints/step-00000020")

    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    for _ in range(2):  # the second start finds nothing to send
        tracker = MlflowTracker(run_dir, experiment, tracking_uri=mlflow_server.url, system_metrics=False)
        assert tracker.flush(timeout_s=60)
        tracker.finish()
        assert tracker.run_id == run_id
    sent = [r.getMessage() for r in caplog.records if "earlier processes could not" in r.getMessage()]
    assert len(sent) == 1 and "10 metric values, 2 checkpoints" in sent[0], sent

    assert held(client, run_id, ["stage1/loss", "stage1/lr"]) == {
        "stage1/loss": Counter({(5, 1 / 5): 1, (10, 1 / 10): 1, (15, 1 / 15): 2, (20, 1 / 20): 1}),
        "stage1/lr": Counter({(5, 0.001): 1, (10, 0.001): 1, (15, 0.001): 2, (20, 0.001): 1})}
    assert [m.step for m in client.get_metric_history(run_id, "stage1/diverged")] == [20]  # NaN: sent once
    assert [m.value for m in client.get_metric_history(run_id, "stage1/huge")] == [sys.float_info.max]
    assert checkpoint_artifacts(client, run_id) == {"step-00000010": CHECKPOINT_FILES,
                                                    "step-00000020": CHECKPOINT_FILES}
    assert not list((run_dir / UPLOAD_STAGING).iterdir())  # delivered: nothing left staged
    timestamps = {m.step: m.timestamp for m in client.get_metric_history(run_id, "stage1/lr")}
    assert timestamps[20] == 1_020_000  # the record's own time, not the time of the delivery


def test_a_line_torn_by_a_crash_does_not_swallow_the_next_row(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "time": 1.0, "a": 1.0}\n{"step": 10, "ti')
    tracker = RunDirectoryTracker(tmp_path)
    tracker.log_metrics({"a": 2.0}, 15)
    tracker.finish()
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3 and json.loads(rows[-1])["a"] == 2.0


def trainer(config_overrides: list[str], env: dict[str, str]) -> subprocess.Popen:
    arguments = [a for o in config_overrides for a in ("--set", o)]
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", "--config", str(CONFIG), *arguments],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, timeout_s: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the trainer ended ({process.returncode}) before {what}:\n"
                                 f"{process.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:.0f} s"
        time.sleep(0.05)


@pytest.mark.slow  # two trainings in subprocesses, a server killed and restarted: ~90 s
def test_kill_9_while_mlflow_is_down_then_relaunch_delivers_every_value_and_checkpoint(
        mlflow_server_factory, tmp_path):
    """Issue 24 item 5: MLflow up at the start, down from mid stage 1; the trainer is killed
    with SIGKILL after a checkpoint written during the outage; the relaunch, with MLflow up
    again, continues the same MLflow run, which then holds every value of metrics.jsonl (same
    count per key, same steps, same values) and every checkpoint, pruned ones included."""
    server = mlflow_server_factory().start()
    server.wait_until_healthy()
    name = f"k{uuid.uuid4().hex[:8]}"
    overrides = [f"name={name}", f"output_dir={tmp_path}", "train.keep_last_checkpoints=1",
                 # long enough that MLflow's first deliveries, which race the training, come well before its end
                 *tiny_overrides(stage1_steps=2000, stage2_steps=100, checkpoint_every=100, log_every=20,
                                 tracking=True),
                 "tracking.system_metrics=false"]
    env = clean_environment(MLFLOW_TRACKING_URI=server.url, GAPM_LOG_LEVEL="INFO")
    run_dir = tmp_path / name
    client = MlflowClient(server.url)

    process = trainer(overrides, env)
    try:
        def some_values_delivered() -> bool:
            if not (run_dir / RUN_ID_FILE).is_file():
                return False
            return len(client.get_metric_history((run_dir / RUN_ID_FILE).read_text().strip(),
                                                 "stage1/reconstruction_mse")) >= 2
        wait_for(some_values_delivered, 180, "metric values in MLflow", process)
        process.send_signal(signal.SIGSTOP)  # MLflow goes down between two steps
        server.kill()
        outage_from = len((run_dir / "metrics.jsonl").read_text().splitlines())
        outage_step = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        process.send_signal(signal.SIGCONT)

        def newest_checkpoint_step() -> int:
            return max((int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")), default=0)
        wait_for(lambda: newest_checkpoint_step() >= outage_step + 200, 180, "two checkpoints during the outage",
                 process)
        process.kill()  # SIGKILL: no atexit, no finish, the outbox dies with it
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    logged_before = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert logged_before > outage_from  # values were logged while MLflow was down
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()

    server.start().wait_until_healthy()  # the same store, the same port
    relaunched = trainer(overrides, env)
    output, _ = relaunched.communicate(timeout=600)
    assert relaunched.returncode == 0, output[-3000:]
    assert "delivered to run" in output and "earlier processes could not" in output, output[-3000:]

    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id  # the same MLflow run, continued
    record = recorded(run_dir)
    assert held(client, run_id, record) == record
    assert sum(record["stage1/reconstruction_mse"].values()) >= 100  # every 20 steps, some logged twice
    artifacts = checkpoint_artifacts(client, run_id)
    assert sorted(artifacts) == [f"step-{s:08d}" for s in range(100, 2101, 100)]
    assert all(files == CHECKPOINT_FILES for files in artifacts.values()), artifacts
    assert not list((run_dir / UPLOAD_STAGING).glob("*"))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["gapm.registered_model_version"] == "1"


@pytest.mark.slow  # two in-process trainings, a server started between them: ~40 s
def test_mlflow_back_only_after_training_ended_is_completed_by_a_rerun(mlflow_server_factory, tmp_path,
                                                                      monkeypatch):
    """MLflow is unreachable for the whole training; once it is back, running the same training
    again (resume auto) completes the record: every loss value, every checkpoint artifact
    (pruned ones too), the pictures and the registered model."""
    server = mlflow_server_factory()  # nothing listens on its port yet
    name = f"b{uuid.uuid4().hex[:8]}"
    config = load_config(CONFIG, [f"name={name}", f"output_dir={tmp_path}", "train.keep_last_checkpoints=1",
                                  *tiny_overrides(stage1_steps=30, stage2_steps=20, checkpoint_every=10, log_every=5,
                                                  tracking=True), "tracking.system_metrics=false"])
    run_dir = config.run_dir
    unreachable = MlflowTracker(run_dir, config.tracking.experiment or name, run_name=name, tracking_uri=server.url,
                                system_metrics=False, retry_interval_s=0.2, max_retry_interval_s=0.2,
                                finish_timeout_s=1.0)
    train(config, resume="never", tracker=MultiTracker(RunDirectoryTracker(run_dir), unreachable))
    assert unreachable.run_id is None and sum(unreachable.pending()) > 0
    assert len(list((run_dir / UPLOAD_STAGING).glob("step-*"))) == 5  # kept for the next start

    server.start().wait_until_healthy()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    train(config, resume="auto")

    client = MlflowClient(server.url)
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    record = recorded(run_dir)
    assert held(client, run_id, record) == record
    assert [s for s, _ in sorted(record["stage1/reconstruction_mse"])] == [5, 10, 15, 20, 25, 30]
    assert [s for s, _ in sorted(record["stage2/latent_generator_loss"])] == [35, 40, 45, 50]
    artifacts = checkpoint_artifacts(client, run_id)
    assert sorted(artifacts) == [f"step-{s:08d}" for s in (10, 20, 30, 40, 50)]
    assert all(files == CHECKPOINT_FILES for files in artifacts.values()), artifacts
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"figure4.png", "config.yaml", "checkpoints"} <= top
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["gapm.registered_model_version"] == "1"
    assert [str(v.version) for v in client.search_model_versions(f"name = 'gapm-{name}'")] == ["1"]

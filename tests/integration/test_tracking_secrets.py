"""No password or token reaches a log line, an MLflow param or tag, the config.yaml artifact or a
run-directory file: a real `gapm train` against a real `mlflow server` reached through a URL
with a password, on shards whose location carries a ?token=, with every library logging."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from helpers import ROOT, clean_environment, tiny_overrides
from mlflow.tracking import MlflowClient

from pipeline.data.shards import convert_dataset
from pipeline.tracking.mlflow_sink import RUN_ID_FILE
from pipeline.redaction import MASK

PASSWORD, TOKEN, SIGNATURE, CREDENTIAL = "pw-7f3a9c", "tok-51d2e8", "sig-9b0c4f", "cred-2e7a61"
SECRETS = (PASSWORD, TOKEN, SIGNATURE, CREDENTIAL)


def test_no_secret_reaches_logs_params_tags_or_the_run_directory(mlflow_server, tmp_path):
    shards = tmp_path / f"shards?token={TOKEN}"  # a data location that carries a token
    convert_dataset("swissroll", "-", str(shards), samples_per_shard=256, swissroll_samples=512)
    url_with_password = mlflow_server.url.replace("http://", f"http://alice:{PASSWORD}@")
    name = f"s{uuid.uuid4().hex[:8]}"
    overrides = [f"name={name}", f"output_dir={tmp_path / 'runs'}", f"data.train={shards}/train",
                 f"data.test={shards}/test",
                 f"eval.inception_weights=s3://weights/inception.pt?X-Amz-Signature={SIGNATURE}"
                 f"&X-Amz-Credential={CREDENTIAL}&X-Amz-Expires=3600",
                 *tiny_overrides(stage1_steps=10, stage2_steps=10, checkpoint_every=10, log_every=5, tracking=True),
                 "tracking.system_metrics=false"]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--config", str(ROOT / "configs/swissroll.yaml"),
         *[a for o in overrides for a in ("--set", o)]],
        cwd=ROOT, env=clean_environment(MLFLOW_TRACKING_URI=url_with_password, GAPM_LOG_LEVEL="DEBUG"),
        capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    for secret in SECRETS:
        assert secret not in output, [line for line in output.splitlines() if secret in line][:5]
    # The lines are there, redacted, on stderr: gapm's own, and the run's URL in place of MLflow's
    # "View run ... at: URL" lines, which went to stdout. stdout holds the results alone.
    assert f"alice:{MASK}@127.0.0.1" in done.stderr
    assert any("view run" in line and f"alice:{MASK}@127.0.0.1" in line and "/runs/" in line
               for line in done.stderr.splitlines()), done.stderr[-3000:]
    results = done.stdout.splitlines()
    assert len(results) == 2 and results[0].startswith("metrics: ") and results[1] == (
        f"run directory: {tmp_path / 'runs' / name}"), done.stdout

    client = MlflowClient(mlflow_server.url)  # the server itself ignores the userinfo
    run_dir = tmp_path / "runs" / name
    run = client.get_run((run_dir / RUN_ID_FILE).read_text().strip())
    recorded = [*run.data.params.values(), *run.data.tags.values()]
    for secret in SECRETS:
        assert not [value for value in recorded if secret in value], secret
    assert run.data.params["data.train"] == f"{tmp_path}/shards?token={MASK}"  # a query value runs to &
    assert run.data.tags["dataset"] == run.data.params["data.train"]
    assert f"X-Amz-Signature={MASK}&X-Amz-Credential={MASK}&X-Amz-Expires=3600" in run.data.params[
        "eval.inception_weights"]
    config_artifact = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert f"token={MASK}" in config_artifact.read_text()

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"config.yaml", "params.json", "tags.json", "metrics.jsonl"} <= {p.name for p in files}
    for path in files:
        content = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in content, (path, secret)
    assert f"token={MASK}" in (run_dir / "config.yaml").read_text()
    assert f"token={MASK}" in (run_dir / "tags.json").read_text()

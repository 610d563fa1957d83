"""`gapm report`: the comparison table and figure grid come from the runs tracked in MLflow."""

import csv
import subprocess
import sys

import pytest
from helpers import ROOT, tiny_overrides

from pipeline.config import load_config
from pipeline.train.loop import train

TINY = tiny_overrides(stage1_steps=4, stage2_steps=2, batch_size=32, samples=256, test_samples=64, width=8,
                      checkpoint_every=100, log_every=2, eval_samples=64, discriminator_steps=1, tracking=True) + [
    "tracking.experiment=comparison", "tracking.register_model=false", "tracking.system_metrics=false",
    "tracking.log_checkpoints=false"]


@pytest.mark.slow  # two tracked trainings and two CLI processes: about a minute
def test_report_tables_every_method_of_an_experiment(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    for kind in ("gapm", "vae"):
        train(load_config(ROOT / "configs/swissroll.yaml", [f"output_dir={tmp_path}", f"name=roll-{kind}",
                                                            f"model.kind={kind}", *TINY]), resume="never")
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", "--experiment", "comparison",
                             "--out", str(tmp_path / "reports")], capture_output=True, text=True, cwd=ROOT,
                            env={**__import__("os").environ, "MLFLOW_TRACKING_URI": store}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.reader((tmp_path / "reports/comparison.csv").read_text().splitlines()))
    assert rows[0][:4] == ["run", "method", "steps", "reconstruction MSE"]
    assert [(r[0], r[1], r[2]) for r in rows[1:]] == [("roll-gapm", "gapm", "6"), ("roll-vae", "vae", "4")]
    assert all(float(r[3]) >= 0 for r in rows[1:])
    assert (tmp_path / "reports/comparison-figures.png").stat().st_size > 0
    assert "| roll-gapm | gapm |" in result.stdout

    missing = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", "--experiment", "nope"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120,
                             env={**__import__("os").environ, "MLFLOW_TRACKING_URI": store})
    assert missing.returncode == 2 and "no experiment 'nope'" in missing.stderr.strip().splitlines()[-1]

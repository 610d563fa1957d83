"""What the commands write and show, run as a user runs them (real processes, a real sqlite
MLflow store): `gapm report` writes into an ignored runs folder by default and never into the
repository's tracked files, refuses in one line without MLFLOW_TRACKING_URI before touching
anything, and training's progress bars in a batch log are whole lines, a few per stage."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, tiny_overrides
from mlflow.tracking import MlflowClient

from pipeline import cli

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


def gapm(arguments: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("MLFLOW_TRACKING_URI", "TQDM_DISABLE")}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *arguments], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**environment, **env})


def git(checkout: Path, *arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=checkout, capture_output=True, text=True, check=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}).stdout


def checkout_with_committed_reports(path: Path) -> Path:
    """A git checkout with the repository's .gitignore and committed reports of the experiment
    in both places reports ever lived (reports/ and docs/reports/)."""
    path.mkdir()
    shutil.copy(ROOT / ".gitignore", path / ".gitignore")
    for folder in ("reports", "docs/reports"):
        (path / folder).mkdir(parents=True)
        (path / folder / "comparison.md").write_text("# the committed table: 7 rows\n")
        (path / folder / "comparison.csv").write_text("run\nroll-gapm\n")
    git(path, "init", "-q")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "committed reports")
    return path


def finished_run_store(path: Path) -> str:
    """A sqlite MLflow store with one finished run of experiment `comparison`."""
    store = f"sqlite:///{path / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.create_experiment("comparison", artifact_location=str(path / "artifacts"))
    run = client.create_run(experiment, run_name="roll-gapm", tags={"world_size": "1"})
    for key, value in {"model.kind": "gapm", "stage1.steps": "8", "stage2.steps": "4",
                       "data.batch_size": "32"}.items():
        client.log_param(run.info.run_id, key, value)
    client.log_metric(run.info.run_id, "eval/sample_mmd", 0.0123)
    client.set_terminated(run.info.run_id, "FINISHED")
    return store


def test_report_writes_to_the_runs_folder_by_default_never_into_tracked_files(tmp_path, monkeypatch, capsys):
    checkout = checkout_with_committed_reports(tmp_path / "checkout")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", finished_run_store(tmp_path))
    monkeypatch.chdir(checkout)
    assert cli.main(["report", "--experiment", "comparison"]) == 0
    written = checkout / "runs/reports"
    assert sorted(p.name for p in written.iterdir()) == ["comparison.csv", "comparison.md"]
    assert "| roll-gapm | gapm | 1 | 32 | 12 | 0.0123 |" in (written / "comparison.md").read_text()
    assert f"wrote {Path('runs/reports/comparison.md')}, {Path('runs/reports/comparison.csv')}" in capsys.readouterr().out
    # nothing tracked changed, nothing new that git would pick up: runs/ is ignored
    assert git(checkout, "status", "--porcelain", "--untracked-files=all") == ""
    assert (checkout / "docs/reports/comparison.md").read_text() == "# the committed table: 7 rows\n"

    # the committed reports are written only when asked
    assert cli.main(["report", "--experiment", "comparison", "--out", "docs/reports"]) == 0
    assert git(checkout, "status", "--porcelain").split() == ["M", "docs/reports/comparison.csv",
                                                              "M", "docs/reports/comparison.md"]


def test_report_without_a_tracking_uri_refuses_in_one_line_before_touching_anything(tmp_path):
    checkout = checkout_with_committed_reports(tmp_path / "checkout")
    result = gapm(["report", "--experiment", "comparison"], checkout)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == ("gapm report: error: MLFLOW_TRACKING_URI is not set; point it at the MLflow "
                                     "server (http://host:5000) or at a run's embedded store "
                                     "(sqlite:///runs/NAME/mlflow.db)")
    assert result.stdout == ""
    assert not (checkout / "mlflow.db").exists() and not (checkout / "mlruns").exists()
    assert not (checkout / "runs").exists()
    assert git(checkout, "status", "--porcelain", "--untracked-files=all", "--ignored") == ""


def test_training_in_a_batch_log_draws_whole_bar_lines_a_few_per_stage(tmp_path):
    """stderr is a pipe, as under Slurm or Kubernetes: each stage's bar is a line when it starts
    and one when it ends (plus at most one per 30 s, which tests/unit/test_console.py checks on a
    simulated clock), not one per logging window (here 20 and 10 windows); log records start
    their own lines; stdout holds the result only."""
    overrides = tiny_overrides(stage1_steps=40, stage2_steps=20, log_every=2, checkpoint_every=20,
                               samples=256, test_samples=128, width=16, eval_samples=128)
    overrides = [o for o in overrides if o != "train.progress_bar=false"] + [f"output_dir={tmp_path}", "name=batch"]
    result = gapm(["train", "--config", str(ROOT / "configs/swissroll.yaml"), "--resume", "never",
                   *[f"--set={o}" for o in overrides]], ROOT, GAPM_LOG_LEVEL="INFO", OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    for stage, steps in ((1, 40), (2, 20)):
        bar = [line for line in lines if line.startswith(f"stage {stage}:")]
        assert 2 <= len(bar) < steps // 2, bar  # fewer lines than logging windows (log_every=2)
        assert f" 0/{steps} " in bar[0] and f" {steps}/{steps} " in bar[-1] and "_loss=" in bar[-1]
    assert all(line.startswith(("stage 1:", "stage 2:")) or LOG_LINE.match(line) for line in lines), lines
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == ["metrics", "run directory"]

"""`gapm report`: the comparison table and figure grid come from the runs tracked in MLflow."""

import csv
import subprocess
import sys
from types import SimpleNamespace

import pytest
from helpers import ROOT, tiny_overrides, train

from pipeline.config import load_config
from pipeline.eval.report import ReportError, column_legend, experiment_runs, table_rows


def tiny(kind):
    return tiny_overrides(stage1_steps=4, stage2_steps=2, batch_size=32, samples=256, test_samples=64, width=8,
                          checkpoint_every=100, log_every=2, eval_samples=64, discriminator_steps=1, tracking=True,
                          kind=kind) + [
        "tracking.experiment=comparison", "tracking.register_model=false", "tracking.system_metrics=false",
        "tracking.log_checkpoints=false"]


@pytest.mark.slow  # two tracked trainings and two CLI processes: about a minute
def test_report_tables_every_method_of_an_experiment(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    for kind in ("gapm", "vae"):
        train(load_config(ROOT / "configs/swissroll.yaml", [f"output_dir={tmp_path}", f"name=roll-{kind}",
                                                            *tiny(kind)]), resume="never")
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", "--experiment", "comparison",
                             "--out", str(tmp_path / "reports")], capture_output=True, text=True, cwd=ROOT,
                            env={**__import__("os").environ, "MLFLOW_TRACKING_URI": store}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.reader((tmp_path / "reports/comparison.csv").read_text().splitlines()))
    assert rows[0][:6] == ["run", "method", "world size", "batch", "steps", "reconstruction MSE"]
    assert [r[:5] for r in rows[1:]] == [["roll-gapm", "gapm", "1", "32", "6"], ["roll-vae", "vae", "1", "32", "4"]]
    assert all(float(r[5]) >= 0 for r in rows[1:])
    assert (tmp_path / "reports/comparison-figures.png").stat().st_size > 0
    assert "| roll-gapm | gapm | 1 | 32 | 6 |" in result.stdout
    assert "- **world size**: processes that trained the run" in result.stdout  # the columns explained

    picked = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", "--experiment", "comparison",
                             "--runs", "roll-vae,roll-gapm", "--name", "picked", "--out", str(tmp_path / "reports")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**__import__("os").environ, "MLFLOW_TRACKING_URI": store})
    assert picked.returncode == 0, picked.stderr[-2000:]
    rows = list(csv.reader((tmp_path / "reports/picked.csv").read_text().splitlines()))
    assert [r[0] for r in rows[1:]] == ["roll-vae", "roll-gapm"]
    assert (tmp_path / "reports/picked-figures.png").stat().st_size > 0

    missing = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", "--experiment", "nope"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120,
                             env={**__import__("os").environ, "MLFLOW_TRACKING_URI": store})
    assert missing.returncode == 2 and "no experiment 'nope'" in missing.stderr.strip().splitlines()[-1]


def run_record(name: str, kind: str, world: str, metrics: dict) -> SimpleNamespace:
    return SimpleNamespace(info=SimpleNamespace(run_name=name),
                           data=SimpleNamespace(params={"model.kind": kind, "stage1.steps": "100", "stage2.steps": "50",
                                                        "data.batch_size": "64"},
                                                tags={"world_size": world}, metrics=metrics))


def test_report_table_shows_world_size_kid_as_measured_and_explains_every_column():
    """KID is shown as measured, in Inception's scale (0.04567) and in a domain feature space's
    (430.121, where the ×1000 of papers gave the confusing 430121): the value MLflow holds."""
    runs = [run_record("celeba-gapm", "gapm", "8", {"eval/fid": 61.94, "eval/kid": 0.04567,
                                                    "eval/test_reconstruction_mse": 0.0165}),
            run_record("celeba-vae", "vae", "4", {"eval/fid": 80.0}),
            run_record("fm-gapm", "gapm", "1", {"eval/kid": 430.121})]
    header, rows = table_rows(runs)
    assert header == ["run", "method", "world size", "batch", "steps", "FID", "KID", "test reconstruction MSE"]
    assert rows == [["celeba-gapm", "gapm", "8", "64", "150", "61.9", "0.04567", "0.0165"],
                    ["celeba-vae", "vae", "4", "64", "100", "80.0", "", ""],
                    ["fm-gapm", "gapm", "1", "64", "150", "", "430.1", ""]]
    legend = column_legend(runs)
    for name in header:
        assert f"- **{name}**" in legend, name
    assert "- **KID** (`eval/kid`): KID of the same samples (clean-fid), as measured" in legend
    assert "`eval/kid` ×" not in legend and "sample MMD" not in legend  # no scaled column; only the columns shown


def test_report_picks_named_runs_in_the_given_order_and_names_a_missing_one():
    def finished(name: str, kind: str) -> SimpleNamespace:
        return SimpleNamespace(info=SimpleNamespace(run_name=name, run_id=name), data=SimpleNamespace(params={"model.kind": kind}))

    newest_first = [finished("roll-vae", "vae"), finished("roll-gapm", "gapm"), finished("roll-vae", "vae")]
    client = SimpleNamespace(get_experiment_by_name=lambda name: SimpleNamespace(experiment_id="1"),
                             search_runs=lambda *args, **kwargs: newest_first)
    assert [r.info.run_name for r in experiment_runs(client, "e")] == ["roll-gapm", "roll-vae"]  # GAPM first
    assert [r.info.run_name for r in experiment_runs(client, "e", ["roll-vae", "roll-gapm"])] == ["roll-vae", "roll-gapm"]
    assert experiment_runs(client, "e", ["roll-vae"])[0] is newest_first[0]  # the newest run of that name
    with pytest.raises(ReportError, match="no finished run named roll-aae; its runs: roll-gapm, roll-vae"):
        experiment_runs(client, "e", ["roll-aae"])


def test_report_shows_fid_with_its_spread_and_floor_the_failure_mode_metrics_and_each_feature_space(
        tmp_path, monkeypatch):
    from pipeline.eval import report

    spaces = {"eval/fid": 20.0, "eval/fid_std": 0.25, "eval/fid_floor": 2.5, "eval/precision": 0.71,
              "eval/recall": 0.42, "eval/density": 0.9, "eval/coverage": 0.66, "eval/memorisation_ratio": 1.02}
    runs = [run_record("fm-gapm", "gapm", "1", {**spaces, "eval/resnet/fid": 9.0, "eval/resnet/fid_std": 0.5,
                                                "eval/resnet/fid_floor": 1.0, "eval/resnet/precision": 0.8}),
            run_record("fm-vae", "vae", "1", {**spaces, "eval/fid": 30.0, "eval/fid_std": 1.5, "eval/recall": 0.9,
                                              "eval/resnet/fid": 7.0, "eval/resnet/fid_floor": 1.0})]
    header, rows = table_rows(runs)
    assert header[5:] == ["FID", "FID floor", "precision", "recall", "density", "coverage", "memorisation"]
    assert rows[0][5:] == ["20.0 ± 0.2", "2.50", "0.710", "0.420", "0.900", "0.660", "1.02"]
    assert rows[1][5:7] == ["30.0 ± 1.5", "2.50"] and rows[1][8] == "0.900"
    legend = column_legend(runs)
    assert "- **recall** (`eval/recall`): fraction of real samples" in legend and "higher is better" in legend
    assert "about 1 is healthy; well below 1: copies" in legend and "[LABEL]** (`eval/LABEL/…`)" in legend
    assert "| fm-gapm | 9.0 ± 0.5 | 1.00 | 0.800 |" in report.space_table(runs, "resnet")
    assert "| fm-vae | 7.0 | 1.00 |  |" in report.space_table(runs, "resnet")  # no std: one seed
    # the two spaces rank the runs differently: the report says so
    assert report.ranking_note(runs) == ("- The FID rankings disagree between the feature spaces: by FID fm-gapm < "
                                         "fm-vae; by FID [resnet] fm-vae < fm-gapm.\n")
    runs[1].data.metrics["eval/resnet/fid"] = 12.0
    assert report.ranking_note(runs) == "- FID and FID [resnet] rank the runs alike: fm-gapm < fm-vae.\n"

    # write_report: the space's own table in the Markdown, every column in the CSV
    client = SimpleNamespace(list_artifacts=lambda run_id: [])
    for run in runs:
        run.info.run_id = run.info.run_name
    monkeypatch.setattr(report, "MlflowClient", lambda: client)
    monkeypatch.setattr(report, "experiment_runs", lambda client, experiment, names: runs)
    written = report.write_report("fm", tmp_path)
    markdown = written["markdown"].read_text()
    assert "## Feature space resnet\n\n| run | FID [resnet] | FID floor [resnet] | precision [resnet] |" in markdown
    assert "rank the runs alike" in markdown
    rows = list(csv.reader(written["csv"].read_text().splitlines()))
    assert rows[0][-3:] == ["FID [resnet]", "FID floor [resnet]", "precision [resnet]"]
    assert rows[1][-3:] == ["9.0 ± 0.5", "1.00", "0.800"]

"""Evaluation jobs against a real `mlflow server` (artifacts on the moto S3 endpoint): a tiny
image training logs three checkpoints (stage 1's last at step 2, stage 2's at steps 4 and 6);
`gapm eval-watch` scores each one that can generate (stage 2's) exactly once — also with two
jobs at once — logs the scores to the run at the checkpoint's step and moves the registry
alias `champion` to the best; a later pass does nothing and keeps the alias. Claims are tested on a
local directory and on S3 (conditional PUT). FID here uses a small domain feature extractor:
no Inception download ever."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (  # 2 + 2 steps, checkpoints at steps 2 and 4
    FASHION_MNIST_DIR,
    ROOT,
    TINY_IMAGES,
    free_port,
    train,
)
from mlflow.tracking import MlflowClient

from pipeline import checkpoints, cli
from pipeline.config import load_config
from pipeline.data.shards import convert_dataset
from pipeline.data.storage import create_exclusive
from pipeline.eval import fid, neighbours, reference_stats
from pipeline.eval.claims import ClaimStore
from pipeline.eval.features import (
    DomainClassifier,
    DomainNetShape,
    save_domain_extractor,
)
from pipeline.eval.mlflow_runs import parse_result_tag
from pipeline.eval.settings import EvalSettings
from pipeline.eval.watch import WatchOptions, watch
from pipeline.tracking import registry

SAMPLES = "120"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def trained(mlflow_server, tmp_path_factory):
    """One tiny Fashion-MNIST training tracked on the server, reference statistics and the
    feature extractor they were made with."""
    if not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real Fashion-MNIST not installed at {FASHION_MNIST_DIR}")
    work = tmp_path_factory.mktemp("eval-jobs")
    convert_dataset("fashion-mnist", FASHION_MNIST_DIR, str(work / "fm"), limit=200, samples_per_shard=100)
    torch.manual_seed(0)
    extractor_file = work / "extractor.safetensors"
    save_domain_extractor(DomainClassifier(DomainNetShape(widths=[4, 8], feature_dim=16)), str(extractor_file))
    extractor = fid.load_extractor(str(extractor_file), device=torch.device("cpu"))
    stats = reference_stats.compute_reference_stats(str(work / "fm/train"), extractor, "fm-train", kid_features=200)
    stats_file = work / "fm-train.npz"
    stats_file.write_bytes(stats.to_npz_bytes())
    name = f"e{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        config = load_config(ROOT / "configs/swissroll.yaml", [
            f"name={name}", f"tracking.experiment={name}", f"output_dir={work / 'runs'}", f"data.train={work / 'fm/train'}",
            f"data.test={work / 'fm/test'}", *TINY_IMAGES, "stage2.steps=4"])  # checkpoints at 2 | 4, 6
        result = train(config, resume="never")
        run_id = (result.run_dir / "mlflow_run_id").read_text().strip()
        yield {"name": name, "run_id": run_id, "stats": str(stats_file), "work": work, "server": mlflow_server,
               "run_dir": result.run_dir, "model_name": registry.default_model_name(name)}


def eval_history(client: MlflowClient, run_id: str, key: str = "eval/fid") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def scores(client: MlflowClient, run_id: str) -> dict[tuple[str, int], float]:
    found = {}
    for key, value in client.get_run(run_id).data.tags.items():
        if key.startswith("gapm.eval.") and key.rsplit(".", 1)[-1].startswith("step-"):
            record = json.loads(value)
            found[(record["reference"], record["step"])] = record["score"]
    return found


def test_two_eval_watch_jobs_at_once_score_each_checkpoint_once_and_crown_the_best(trained, tmp_path):
    client = MlflowClient(trained["server"].url)
    run_id = trained["run_id"]
    assert eval_history(client, run_id) == []
    command = [sys.executable, "-m", "pipeline.cli", "eval-watch", "--once", "--experiment", trained["name"],
               "--stats", trained["stats"], "-n", SAMPLES, "--claims", str(tmp_path / "claims"), "--device", "cpu"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained["server"].url, "GAPM_LOG_LEVEL": "WARNING",
           "OMP_NUM_THREADS": "1"}  # two jobs on a small CPU: no oversubscription
    jobs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
            for _ in range(2)]
    outputs = [job.communicate(timeout=300) for job in jobs]
    for job, (out, err) in zip(jobs, outputs):
        assert job.returncode == 0, out + err
    scored_lines = [line for out, _ in outputs for line in out.splitlines() if line.startswith("step ")]
    # no double work, and not stage 1's checkpoint (step 2): its latent generator is untrained
    assert sorted(line.split(":")[0] for line in scored_lines) == ["step 4", "step 6"], outputs
    assert any("FID samples: 100%" in err and f"{SAMPLES}/{SAMPLES}" in err for _, err in outputs)  # progress
    assert eval_history(client, run_id) == [4, 6]  # one FID per checkpoint, at its training step
    assert eval_history(client, run_id, "eval/test_reconstruction_mse") == [4, 6]
    results = scores(client, run_id)
    assert {step for _, step in results} == {4, 6}
    (reference,) = {key for key, _ in results}
    best_step = min((6, 4), key=lambda step: results[(reference, step)])
    states = [line.split(": ", 1)[1] for out, _ in outputs for line in out.splitlines()
              if line.startswith(f"models:/{trained['model_name']}@champion: ")]
    assert len(states) == 2 and any(state.endswith("(moved)") for state in states), outputs  # no alias before
    champion = client.get_model_version_by_alias(trained["model_name"], "champion")
    assert champion.run_id == run_id and champion.tags[registry.CHECKPOINT_STEP_TAG] == str(best_step)
    assert float(champion.tags["gapm.eval.score"]) == pytest.approx(results[(reference, best_step)])
    assert not list((tmp_path / "claims").rglob("claim-*.json"))  # all released

    # the next scheduled pass finds nothing to do
    summary = watch(EvalSettings.from_config(stats=trained["stats"], samples=int(SAMPLES), device="cpu"),
                    WatchOptions(experiments=[trained["name"]], claims=str(tmp_path / "claims"),
                                 tracking_uri=trained["server"].url), once=True, interval_s=0)
    assert summary.did_nothing and not summary.failed and not summary.busy
    assert summary.champions == {trained["model_name"]: f"version {champion.version} (kept)"}
    assert eval_history(client, run_id) == [4, 6]


def test_eval_scores_one_checkpoint_from_run_artifacts_and_logs_it_at_its_step(trained, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["server"].url)
    run_id = trained["run_id"]
    out = tmp_path / "result.json"
    assert cli.main(["eval", f"runs:/{run_id}/checkpoints/step-00000002", "--stats", trained["stats"], "-n", "60",
                     "--kid", "--device", "cpu", "--json", str(out)]) == 0
    assert f"run {run_id}" in capsys.readouterr().out
    record = json.loads(out.read_text())
    client = MlflowClient(trained["server"].url)
    assert record["step"] == 2 and record["samples"] == 60 and record["metrics"]["eval/fid_samples"] == 60
    assert [m.step for m in client.get_metric_history(run_id, "eval/kid")] == [2]
    assert 0 < record["metrics"]["eval/test_reconstruction_mse"] < 1  # pixels in [0, 1], whole test split
    assert record["metrics"]["eval/test_images"] == 200
    tags = client.get_run(run_id).data.tags
    assert parse_result_tag(next(k for k in tags if record["reference"] in k), record["reference"]) == 2
    # a local checkpoint directory finds its run through <run dir>/mlflow_run_id
    local = trained["run_dir"] / "checkpoints" / "step-00000004"
    assert cli.main(["eval", str(local), "--stats", trained["stats"], "-n", "60", "--device", "cpu"]) == 0
    assert 4 in [m.step for m in client.get_metric_history(run_id, "eval/fid")]
    # statistics of other images than the model makes: one clear error
    wrong = reference_stats.ReferenceStats.from_npz_bytes(Path(trained["stats"]).read_bytes(), "x")
    wrong.image_shape = [3, 32, 32]
    (tmp_path / "wrong.npz").write_bytes(wrong.to_npz_bytes())
    assert cli.main(["eval", str(local), "--stats", str(tmp_path / "wrong.npz"), "-n", "8", "--no-log",
                     "--device", "cpu"]) == 2
    assert "[3, 32, 32] images" in capsys.readouterr().err


def test_eval_reads_named_statistics_next_to_the_run_and_records_where_they_were(trained, tmp_path, monkeypatch,
                                                                                capsys):
    """`--stats NAME` of a run's checkpoint means OUTPUT_DIR/fid-stats/NAME.npz of that run's
    experiment (no user-global cache); the score on the MLflow run names the file and its
    identity. The command shows its progress and prints KID as measured."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["server"].url)
    monkeypatch.delenv("GAPM_FID_STATS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stats_dir = trained["run_dir"].parent / "fid-stats"
    stats_dir.mkdir(exist_ok=True)
    (stats_dir / "fm-named.npz").write_bytes(Path(trained["stats"]).read_bytes())
    local = trained["run_dir"] / "checkpoints" / "step-00000004"
    out = tmp_path / "result.json"
    assert cli.main(["eval", str(local), "--stats", "fm-named", "-n", "30", "--kid", "--device", "cpu",
                     "--json", str(out)]) == 0
    captured = capsys.readouterr()
    record = json.loads(out.read_text())
    expected = reference_stats.load_reference_stats(str(stats_dir / "fm-named.npz"))
    assert (record["stats"], record["stats_name"], record["stats_id"]) == (str(stats_dir / "fm-named.npz"),
                                                                         "fm-train", expected.id)
    tag = MlflowClient(trained["server"].url).get_run(trained["run_id"]).data.tags[
        f"gapm.eval.{record['reference']}.step-00000004"]
    assert json.loads(tag)["stats"] == str(stats_dir / "fm-named.npz")  # recorded in MLflow
    assert not (tmp_path / "cache").exists()
    assert "FID samples" in captured.err and "30/30" in captured.err  # progress, with counts
    assert "reconstructions of" in captured.err and "200/200" in captured.err
    kid = record["metrics"]["eval/kid"]  # printed as measured, the value MLflow holds
    assert f"eval/kid={kid:.6g}," in captured.out and "x1000" not in captured.out
    logged = MlflowClient(trained["server"].url).get_metric_history(trained["run_id"], "eval/kid")
    assert [m.value for m in logged if m.step == 4] == [kid]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_claims_are_exclusive_expire_after_a_crash_and_are_taken_over(where, tmp_path, s3_bucket):
    location = str(tmp_path / "claims") if where == "local" else f"s3://{s3_bucket}/claims"
    first, second = ClaimStore(location, ttl_s=0.6, owner="a"), ClaimStore(location, ttl_s=0.6, owner="b")
    key = "run/ref/step-00000002"
    held = first.try_acquire(key)
    assert held is not None and held.generation == 0
    assert second.try_acquire(key) is None
    assert not create_exclusive(held.url, b"{}")
    assert second.holder(key).owner == "a"
    time.sleep(0.8)  # "a" crashed: no heartbeat, the claim expires
    taken = second.try_acquire(key)
    assert taken is not None and taken.generation == 1
    assert not held.refresh() and held.lost
    assert first.try_acquire(key) is None
    taken.release()
    patient_first, patient_second = ClaimStore(location, ttl_s=1.2, owner="a"), ClaimStore(location, ttl_s=1.2)
    with patient_first.try_acquire(key) as alive:  # a live claim's heartbeat (every ttl/4) keeps it
        time.sleep(1.6)
        assert patient_second.try_acquire(key) is None and alive.refresh()
    assert first.holder(key) is None


def test_many_simultaneous_claimers_get_one_claim(tmp_path):
    store = ClaimStore(str(tmp_path / "claims"), ttl_s=60)
    winners: list[object] = []
    barrier = threading.Barrier(8)

    def claim() -> None:
        barrier.wait()
        got = store.try_acquire("run/ref/step-00000004")
        if got is not None:
            winners.append(got)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1


def test_point_model_checkpoints_are_scored_from_the_launchers_config_with_the_embedded_store(
        tmp_path, monkeypatch, capsys):
    """What launch/ runs: `gapm eval-watch --once --config CONFIG --set output_dir=...` with no
    MLflow server (the run's sqlite store); swiss-roll models are ranked by sample MMD. Only the
    checkpoint of stage 2 is scored (stage 1's at step 10 has an untrained latent generator), and
    an alias that already points at the best version is kept, not "moved"."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [f"output_dir={tmp_path}", f"name=r{uuid.uuid4().hex[:6]}", "stage1.steps=10", "stage2.steps=10",
                 "data.batch_size=64", "data.swissroll_samples=256", "data.swissroll_test_samples=128",
                 "model.width=16", "model.latent_dim=8", "model.prior_dim=8", "model.latent_generator_widths=[16]",
                 "model.latent_discriminator_widths=[16]", "train.checkpoint_every=10", "train.log_every=10",
                 "train.progress_bar=false", "eval.samples=128", "model.hyperparameters.discriminator_steps=1",
                 "tracking.system_metrics=false"]
    arguments = ["eval-watch", "--once", "--config", str(ROOT / "configs/swissroll.yaml"),
                 *[f"--set={o}" for o in overrides], "-n", "256"]
    assert cli.main(arguments) == 0  # before training: nothing there yet, not an error
    assert "nothing to evaluate" in capsys.readouterr().out
    config = load_config(ROOT / "configs/swissroll.yaml", overrides)
    train(config, resume="never")
    store = f"sqlite:///{config.run_dir / 'mlflow.db'}"
    run_id = (config.run_dir / "mlflow_run_id").read_text().strip()
    model_name = registry.default_model_name(config.name)
    with monkeypatch.context() as registering:  # the end-of-training model (step 20) gets the alias by hand
        registering.setenv("MLFLOW_TRACKING_URI", store)
        assert cli.main(["register", run_id, "--alias", "champion"]) == 0
    client = MlflowClient(store)
    registered = client.get_model_version_by_alias(model_name, "champion")
    assert registered.tags[registry.CHECKPOINT_STEP_TAG] == "20"
    capsys.readouterr()

    assert cli.main(arguments) == 0
    printed = capsys.readouterr().out
    assert printed.count("eval/test_sample_mmd=") == 1 and printed.startswith("step 20: ")
    assert f"models:/{model_name}@champion: version {registered.version} (kept)" in printed, printed
    mmd = {m.step: m.value for m in client.get_metric_history(run_id, "eval/test_sample_mmd")}
    assert sorted(mmd) == [20]  # stage 1's checkpoint (step 10) is not scored
    champion = client.get_model_version_by_alias(model_name, "champion")
    assert champion.version == registered.version and champion.tags["gapm.eval.score"] == repr(mmd[20])

    # A stage-1 score (here: stage 2's result, relabelled step 10 and made the best), as `gapm eval`
    # of that checkpoint would publish, does not compete for the alias.
    tags = client.get_run(run_id).data.tags
    (tag,) = [key for key in tags if key.startswith("gapm.eval.") and key.endswith(".step-00000020")]
    record = {**json.loads(tags[tag]), "step": 10, "score": mmd[20] / 2}
    client.set_tag(run_id, tag.replace("step-00000020", "step-00000010"), json.dumps(record))
    assert cli.main(arguments) == 0
    printed = capsys.readouterr().out
    assert "nothing new to evaluate" in printed and f"version {registered.version} (kept)" in printed
    assert client.get_model_version_by_alias(model_name, "champion").version == registered.version
    assert checkpoints.list_checkpoints(config.run_dir / "checkpoints")


def random_image_checkpoint(directory: Path, step: int = 7) -> Path:
    """A GAPM checkpoint with random weights (no training needed to test the plumbing)."""
    import dataclasses

    from gapm import GAPM, ModelShape

    torch.manual_seed(step)
    shape = ModelShape(data_shape=[1, 28, 28], latent_dim=8, prior_dim=8, width=8, latent_generator_widths=[16],
                       latent_discriminator_widths=[16])
    meta = checkpoints.CheckpointMeta(stage=2, step=step, stage_step=step, data_epoch=0, data_batch_in_epoch=0,
                                      model_shape=dataclasses.asdict(shape), experiment="random")
    return Path(checkpoints.Checkpointer.at(directory).save(GAPM(shape).eval(), {}, {}, meta))


@pytest.mark.slow  # two processes over gloo: ~20 s on a small CPU
def test_eval_with_two_processes_splits_the_samples_and_reduces_the_features(tmp_path):
    from pipeline.eval.scoring import (
        Ranks,
        image_generator,
        rank_seed,
        split_reconstruction_mse,
    )

    convert_dataset("fashion-mnist", FASHION_MNIST_DIR, str(tmp_path / "fm"), limit=100, samples_per_shard=50)
    checkpoint = random_image_checkpoint(tmp_path / "checkpoints")
    torch.manual_seed(0)
    save_domain_extractor(DomainClassifier(DomainNetShape(widths=[4, 8], feature_dim=8)), str(tmp_path / "fx.st"))
    extractor = fid.load_extractor(str(tmp_path / "fx.st"), device=torch.device("cpu"))
    stats = reference_stats.compute_reference_stats(str(tmp_path / "fm/train"), extractor, "fm")
    (tmp_path / "fm.npz").write_bytes(stats.to_npz_bytes())
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()),
         "-m", "pipeline.cli", "eval", str(checkpoint), "--stats", str(tmp_path / "fm.npz"), "-n", "41",
         "--test-data", str(tmp_path / "fm/test"), "--no-log", "--json", str(out), "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT, timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1", "GAPM_LOG_LEVEL": "WARNING"})
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads(out.read_text())
    # the same numbers from one process: rank r draws its share of 41 of set i with seed (i, r);
    # eval/fid is the mean over the 3 sets (eval.fid_seeds), precision/recall come from set 0
    model, _ = checkpoints.load_model(checkpoint)
    fids, first_set = [], None
    for seed_index in range(3):
        moments, features = fid.FeatureMoments(), []
        for rank, share in ((0, 21), (1, 20)):
            seed = rank_seed(seed_index, rank)
            features.append(fid.generated_features(image_generator(model, torch.device("cpu"), seed), 1, share,
                                                   extractor, seed=seed))
            moments.add(features[-1])
        fids.append(reference_stats.fid_against(stats, moments))
        first_set = first_set if first_set is not None else np.concatenate(features)
    assert record["metrics"]["eval/fid_samples"] == 41
    assert record["metrics"]["eval/fid"] == pytest.approx(np.mean(fids), rel=1e-3, abs=1e-9)
    assert record["metrics"]["eval/fid_std"] == pytest.approx(np.std(fids, ddof=1), rel=1e-3, abs=1e-9)
    expected = neighbours.precision_recall_density_coverage(stats.real_features[:41], first_set)
    assert {key: record["metrics"][f"eval/{key}"] for key in expected} == pytest.approx(expected)
    mse, images = split_reconstruction_mse(model, str(tmp_path / "fm/test"), Ranks(), 250)
    assert record["metrics"]["eval/test_reconstruction_mse"] == pytest.approx(mse, rel=1e-6)
    assert record["metrics"]["eval/test_images"] == images == 100


def test_eval_watch_names_missing_statistics_and_an_unreachable_server(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["server"].url)
    arguments = ["eval-watch", "--once", "--experiment", trained["name"], "--claims", str(tmp_path / "claims"),
                 "--device", "cpu"]
    assert cli.main(arguments) == 2  # image runs, no --stats / eval.fid_stats
    assert "gapm fid-stats" in capsys.readouterr().err
    assert cli.main([*arguments, "--stats", str(tmp_path / "nope.npz")]) == 2
    assert "nope.npz" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert cli.main([*arguments, "--stats", trained["stats"]]) == 2
    assert "cannot list runs in MLflow" in capsys.readouterr().err


def test_eval_logs_the_failure_mode_metrics_in_two_feature_spaces_and_report_shows_them(trained, tmp_path,
                                                                                       monkeypatch, capsys):
    """Statistics with a floor in two feature spaces (the fixture's CNN and an independent
    ResNet): `gapm eval` logs FID ± its spread over seeds, the floor, precision, recall, density,
    coverage and the memorisation ratio of each space to the run, and `gapm report` shows them."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["server"].url)
    work, run_id = trained["work"], trained["run_id"]
    torch.manual_seed(1)
    resnet_file = tmp_path / "resnet.safetensors"
    save_domain_extractor(DomainClassifier(DomainNetShape(widths=[4, 8], feature_dim=12, architecture="resnet")),
                          str(resnet_file))
    for name, extractor in (("fm-cnn", work / "extractor.safetensors"), ("fm-resnet", resnet_file)):
        assert cli.main(["fid-stats", str(work / "fm/train"), "--name", name, "--test-data", str(work / "fm/test"),
                         "--feature-extractor", str(extractor), "--out", str(tmp_path), "--device", "cpu"]) == 0
    capsys.readouterr()
    out = tmp_path / "result.json"
    assert cli.main(["eval", f"runs:/{run_id}/checkpoints/step-00000004", "--stats", str(tmp_path / "fm-cnn.npz"),
                     "--stats", f"resnet={tmp_path / 'fm-resnet.npz'}", "-n", "30", "--fid-seeds", "2",
                     "--prdc-samples", "30", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())["metrics"]
    floors = {label: reference_stats.load_reference_stats(str(tmp_path / f"{name}.npz")).floor
              for label, name in (("", "fm-cnn"), ("resnet/", "fm-resnet"))}
    for prefix in ("eval/", "eval/resnet/"):
        assert metrics[f"{prefix}fid_floor"] == pytest.approx(floors[prefix[5:]]["fid"])
        assert metrics[f"{prefix}fid_std"] >= 0 and metrics[f"{prefix}fid"] > metrics[f"{prefix}fid_floor"]
        for key in ("precision", "recall", "density", "coverage"):
            assert 0 <= metrics[prefix + key] <= (10 if key == "density" else 1), key
        assert metrics[f"{prefix}test_train_distance"] == pytest.approx(floors[prefix[5:]]["test_train_distance"])
        assert metrics[f"{prefix}memorisation_ratio"] == pytest.approx(
            metrics[f"{prefix}generated_train_distance"] / metrics[f"{prefix}test_train_distance"])
    assert metrics["eval/fid"] != metrics["eval/resnet/fid"]  # two spaces, two numbers
    assert "eval/resnet/precision=" in printed and "eval/memorisation_ratio=" in printed
    client = MlflowClient(trained["server"].url)
    for key in ("eval/fid_std", "eval/fid_floor", "eval/precision", "eval/recall", "eval/density", "eval/coverage",
                "eval/memorisation_ratio", "eval/resnet/fid", "eval/resnet/fid_floor", "eval/resnet/recall"):
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)][-1] == (
            4, pytest.approx(metrics[key])), key

    assert cli.main(["report", "--experiment", trained["name"], "--out", str(tmp_path / "reports")]) == 0
    shown = capsys.readouterr().out
    header = next(line for line in shown.splitlines() if line.startswith("| run |"))
    for column in ("FID", "FID floor", "precision", "recall", "density", "coverage", "memorisation"):
        assert f"| {column} |" in header, column
    row = next(line for line in shown.splitlines() if line.startswith(f"| {trained['name']} |"))
    assert f"{metrics['eval/fid']:.1f} ± {metrics['eval/fid_std']:.1f}" in row
    assert f"| {metrics['eval/recall']:.3f} |" in row and f"| {metrics['eval/memorisation_ratio']:.2f} |" in row
    assert "## Feature space resnet" in shown and f"| {metrics['eval/resnet/fid_floor']:.2f} |" in shown

"""Training fed by shard streams, with checkpoints in object storage (moto S3 server)."""

import io
import json
import subprocess
import sys
import tarfile

import pytest
from helpers import ROOT, tiny_overrides, train

from pipeline import checkpoints
from pipeline.config import load_config
from pipeline.data import storage
from pipeline.data.shards import convert_dataset

TINY = tiny_overrides(stage1_steps=12, stage2_steps=6, batch_size=32, samples=None, test_samples=None, width=16,
                      latent_widths=32, checkpoint_every=6, log_every=6, eval_samples=64, discriminator_steps=1)


def test_swissroll_from_s3_shards_with_s3_checkpoints_and_resume(s3_bucket, tmp_path):
    shards = f"s3://{s3_bucket}/swissroll"
    convert_dataset("swissroll", "-", shards, samples_per_shard=500, swissroll_samples=1000)
    ckpt = f"s3://{s3_bucket}/runs/swissroll/checkpoints"
    overrides = [f"output_dir={tmp_path}", f"data.train={shards}/train", f"data.test={shards}/test",
                 f"train.checkpoint_dir={ckpt}", *TINY]
    config = load_config(ROOT / "configs/swissroll.yaml", overrides)
    result = train(config, resume="never")
    assert result.final_checkpoint == f"{ckpt}/step-00000018"
    assert [checkpoints.checkpoint_basename(c) for c in checkpoints.list_checkpoints(ckpt)] == [
        "step-00000006", "step-00000012", "step-00000018"]
    assert result.metrics["eval/reconstruction_mse"] >= 0
    # A half-uploaded checkpoint (no meta.json) is never picked; resume continues from the real one.
    storage.write_bytes(f"{ckpt}/step-00000099/model.safetensors", b"partial")
    assert checkpoints.latest_checkpoint(ckpt) == f"{ckpt}/step-00000018"
    longer = load_config(ROOT / "configs/swissroll.yaml", [*overrides, "stage2.steps=12"])
    resumed = train(longer, resume="auto")
    assert checkpoints.read_meta(resumed.final_checkpoint).step == 24
    model, meta = checkpoints.load_model(resumed.final_checkpoint)
    assert meta.stage == 2 and model.sample(4).shape == (4, 2)


def test_fashion_mnist_images_train_from_local_shards(fashion_mnist_dir, tmp_path):
    convert_dataset("fashion-mnist", fashion_mnist_dir, str(tmp_path / "fm"), limit=256, samples_per_shard=128)
    config = load_config(ROOT / "configs/swissroll.yaml", [
        f"output_dir={tmp_path}", f"data.train={tmp_path}/fm/train", f"data.test={tmp_path}/fm/test",
        "model.data_shape=[1, 28, 28]", "model.latent_dim=16", "model.prior_dim=16", *TINY, "model.width=8"])
    result = train(config, resume="never")
    for name in ("samples.png", "reconstructions.png", "recon.npy", "samples.npy"):
        assert (result.run_dir / name).is_file()
    assert 0 < result.metrics["eval/reconstruction_mse"] < 0.5  # pixels in [0, 1]


def test_corrupt_sample_is_skipped_counted_and_reported(fashion_mnist_dir, tmp_path, caplog):
    convert_dataset("fashion-mnist", fashion_mnist_dir, str(tmp_path / "fm"), limit=256, samples_per_shard=128)
    shard = tmp_path / "fm/train/shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = data[:40] if member.name == "00000003.png" else data  # truncated PNG
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    config = load_config(ROOT / "configs/swissroll.yaml", [
        f"output_dir={tmp_path}", f"data.train={tmp_path}/fm/train", f"data.test={tmp_path}/fm/test",
        "model.data_shape=[1, 28, 28]", "model.latent_dim=16", "model.prior_dim=16", *TINY, "model.width=8"])
    result = train(config, resume="never")
    assert result.metrics["data/corrupt_samples"] >= 1
    assert "corrupt samples skipped during training" in caplog.text
    assert json.loads((result.run_dir / "metrics.json").read_text())["data/corrupt_samples"] >= 1


def gapm(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("problem, spec, expected", [
    ("missing bucket", "s3://no-such-bucket-gapm/train", "does not exist"),
    ("missing prefix", "s3://{bucket}/nothing/here", "nothing/here"),
])
def test_bad_data_location_fails_before_training_with_one_clear_line(s3_bucket, tmp_path, problem, spec, expected):
    result = gapm("train", "--config", "configs/swissroll.yaml", "--set", f"output_dir={tmp_path}",
                  "--set", f"data.train={spec.format(bucket=s3_bucket)}", "--set", "tracking.enabled=false")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gapm train: error:") and expected in last, last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "swissroll/checkpoints").exists()


def test_unreachable_storage_at_launch_is_retried_then_resumable(s3_bucket, tmp_path):
    convert_dataset("swissroll", "-", f"s3://{s3_bucket}/sr", samples_per_shard=500, swissroll_samples=1000)
    # An endpoint nobody answers at (wrong credentials are covered in test_storage): an outage,
    # not bad input (issue 24): waited for train.storage_retry_seconds, then exit 75, one line.
    result = gapm("train", "--config", "configs/swissroll.yaml", "--set", f"output_dir={tmp_path}",
                  "--set", f"data.train=s3://{s3_bucket}/sr/train", "--set", "tracking.enabled=false",
                  "--set", "train.storage_retry_seconds=2", env_extra={"AWS_ENDPOINT_URL": "http://127.0.0.1:1"})
    assert result.returncode == 75, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "127.0.0.1:1" in last and "the whole retry budget" in last and "exit 75" in last, last
    assert "Traceback" not in result.stderr


def test_gapm_shards_cli_and_bad_source(tmp_path):
    ok = gapm("shards", "swissroll", "-", str(tmp_path / "sr"), "--samples-per-shard", "2000")
    assert ok.returncode == 0, ok.stderr
    assert "train: 5000 samples in 3 shards" in ok.stdout
    bad = gapm("shards", "cifar10", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert bad.returncode == 2
    assert "nowhere" in bad.stderr.strip().splitlines()[-1] and "Traceback" not in bad.stderr

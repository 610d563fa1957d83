"""Faults injected into training — a kill between checkpoints, a damaged checkpoint, a storage
outage, a full disk, bad input — and what must hold: nothing lost, exact resume, one clear line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, PausableProxy, differing_parameters, rewrite_tar, tiny_overrides, train

from pipeline import checkpoints
from pipeline.checkpoints.meta import file_record
from pipeline.config import load_config
from pipeline.data.shards import convert_dataset
from pipeline.errors import DataError, GapmError
from pipeline.stopping import TrainingInterrupted
from pipeline.tracking.tracker import RunDirectoryTracker

IMAGES = ["model.data_shape=[1, 28, 28]", "model.latent_dim=16", "model.prior_dim=16",
          *tiny_overrides(stage1_steps=30, stage2_steps=6, batch_size=32, samples=None, test_samples=None,
                          width=8, latent_widths=16, checkpoint_every=7, log_every=7, eval_samples=32,
                          discriminator_steps=1)]


@pytest.fixture()
def image_shards(tmp_path, fashion_mnist_dir):
    out = tmp_path / "fm"
    # 640 images in 5 shards: 20 batches of 32 per epoch, so step 21 is inside the second epoch.
    convert_dataset("fashion-mnist", fashion_mnist_dir, str(out), limit=640, samples_per_shard=128)
    return out


def image_config(output_dir, shards, *extra):
    return load_config(ROOT / "configs/swissroll.yaml", [
        f"output_dir={output_dir}", f"data.train={shards}/train", f"data.test={shards}/test", *IMAGES, *extra])


def test_resume_on_shards_matches_an_uninterrupted_run(image_shards, tmp_path):
    uninterrupted = train(image_config(tmp_path / "a", image_shards), resume="never")
    partial = image_config(tmp_path / "b", image_shards, "train.keep_last_checkpoints=10")
    train(partial, resume="never")
    for later in checkpoints.list_checkpoints(partial.run_dir / "checkpoints"):
        if checkpoints.read_meta(later).step > 21:
            shutil.rmtree(later)  # as if killed right after the checkpoint at step 21
    resumed = train(image_config(tmp_path / "b", image_shards), resume="auto")
    assert checkpoints.read_meta(resumed.final_checkpoint).step == checkpoints.read_meta(uninterrupted.final_checkpoint).step == 36
    assert differing_parameters(uninterrupted.final_checkpoint, resumed.final_checkpoint) == []


class OutageAt(RunDirectoryTracker):
    """The run-directory record, plus a storage outage that begins when step `at` is logged
    (mid-training, whatever the machine's speed) and ends `lasting` seconds later (None: not
    during this run). Records which steps were logged while storage was down."""

    def __init__(self, run_dir, proxy: PausableProxy, at: int, lasting: float | None):
        super().__init__(run_dir)
        self.proxy, self.at, self.lasting = proxy, at, lasting
        self.started = False
        self.steps_during_outage: list[int] = []

    def log_metrics(self, metrics, step):
        super().log_metrics(metrics, step)
        if step >= self.at and not self.started:
            self.started = True
            self.proxy.down()
            if self.lasting is not None:
                threading.Timer(self.lasting, self.proxy.up).start()
        elif self.started and self._listener_down():
            self.steps_during_outage.append(step)

    def _listener_down(self) -> bool:
        return self.proxy._listener is None


@pytest.fixture()
def s3_behind_proxy(s3_bucket, monkeypatch):
    """The test S3 endpoint reached through a proxy that can be taken down."""
    proxy = PausableProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy, s3_bucket
    proxy.down()


def s3_run(tmp_path, bucket, *extra):
    return load_config(ROOT / "configs/swissroll.yaml", [
        f"output_dir={tmp_path}", f"train.checkpoint_dir=s3://{bucket}/runs/outage",
        *tiny_overrides(stage1_steps=40, stage2_steps=20, checkpoint_every=10, log_every=5),
        "train.keep_last_checkpoints=10", *extra])


def test_a_storage_outage_during_training_is_waited_out(s3_behind_proxy, tmp_path):
    """The endpoint goes away for 15 s mid-training: training goes on, the checkpoints written
    meanwhile are uploaded once it is back, and the run ends normally."""
    proxy, bucket = s3_behind_proxy
    config = s3_run(tmp_path, bucket, "train.storage_retry_seconds=120")
    tracker = OutageAt(config.run_dir, proxy, at=15, lasting=15.0)
    result = train(config, resume="never", tracker=tracker)
    assert tracker.steps_during_outage, "training must go on while the upload waits"
    found = [checkpoints.checkpoint_basename(c) for c in checkpoints.list_checkpoints(config.train.checkpoint_dir)]
    assert found == [f"step-{s:08d}" for s in (10, 20, 30, 40, 50, 60)]
    assert checkpoints.checkpoint_basename(result.final_checkpoint) == "step-00000060"
    assert not list((config.run_dir / ".checkpoint-uploads").glob("step-*"))  # nothing left behind


def test_a_longer_outage_stops_resumably_and_loses_nothing(s3_behind_proxy, tmp_path):
    """Storage stays away beyond train.storage_retry_seconds: the run stops with the resumable
    status (never as an input error), the checkpoints it could not upload wait on local disk,
    and the next launch uploads them and finishes exactly as an uninterrupted run."""
    proxy, bucket = s3_behind_proxy
    uninterrupted = train(s3_run(tmp_path / "a", bucket, "train.checkpoint_dir=" + f"s3://{bucket}/runs/a"),
                          resume="never")
    config = s3_run(tmp_path / "b", bucket, "train.storage_retry_seconds=2")
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, resume="never", tracker=OutageAt(config.run_dir, proxy, at=25, lasting=None))
    assert "could not be uploaded" in str(stopped.value) and ".checkpoint-uploads" in str(stopped.value)
    assert not isinstance(stopped.value, GapmError)  # exit 75 (resumable), not 2
    assert list((config.run_dir / ".checkpoint-uploads").glob("step-*"))
    proxy.up()
    resumed = train(s3_run(tmp_path / "b", bucket), resume="auto")
    assert differing_parameters(uninterrupted.final_checkpoint, resumed.final_checkpoint) == []


# --------------------------------------------------------------------------- damaged checkpoints


def swissroll_run(output_dir, *extra):
    return load_config(ROOT / "configs/swissroll.yaml", [
        f"output_dir={output_dir}", *tiny_overrides(stage1_steps=30, stage2_steps=20, checkpoint_every=10), *extra])


def truncate(path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize("damaged_file", [checkpoints.STATE_FILE, checkpoints.MODEL_FILE])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, damaged_file):
    uninterrupted = train(swissroll_run(tmp_path / "a"), resume="never")
    partial = swissroll_run(tmp_path / "b", "stage2.steps=10")  # stops at step 40
    train(partial, resume="never")
    latest = checkpoints.latest_checkpoint(partial.run_dir / "checkpoints")
    assert latest.name == "step-00000040"
    truncate(latest / damaged_file)
    resumed = train(swissroll_run(tmp_path / "b"), resume="auto")
    assert any("not resuming from" in r.message and "step-00000040" in r.message and damaged_file in r.message
               for r in caplog.records)
    assert differing_parameters(uninterrupted.final_checkpoint, resumed.final_checkpoint) == []


def test_a_malicious_training_state_is_refused_in_one_line(tmp_path, capsys):
    config = swissroll_run(tmp_path, "stage2.steps=0", "stage1.steps=10")
    train(config, resume="never")
    checkpoint = checkpoints.latest_checkpoint(config.run_dir / "checkpoints")

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"optimizers": {}, "payload": RunsCode()}, checkpoint / checkpoints.STATE_FILE)
    from pipeline import cli

    arguments = ["train", "--config", str(ROOT / "configs/swissroll.yaml"), "--resume", str(checkpoint),
                 *[a for o in [f"output_dir={tmp_path}", *tiny_overrides(stage1_steps=20)] for a in ("--set", o)]]
    assert cli.main(arguments) == 2  # the file no longer matches the size and digest meta.json records
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "training_state.pt is truncated or replaced" in err, err
    # Whoever swapped the file also rewrote meta.json's record of it: weights_only still refuses it.
    meta = json.loads((checkpoint / checkpoints.META_FILE).read_text())
    meta["files"][checkpoints.STATE_FILE] = file_record((checkpoint / checkpoints.STATE_FILE).read_bytes())
    (checkpoint / checkpoints.META_FILE).write_text(json.dumps(meta))
    status = cli.main(arguments)
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0, err
    assert "refused" in err and "could run code" in err and "weights_only" not in err
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- crash safety


def test_checkpoint_files_are_synced_before_the_rename_and_share_one_mode(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def spy_fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        return real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b))[1])
    config = swissroll_run(tmp_path, "stage1.steps=10", "stage2.steps=0")
    result = train(config, resume="never")
    final = result.final_checkpoint
    renamed = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final))
    staging = events[renamed][1]
    synced_before = {e[1] for e in events[:renamed] if e[0] == "fsync"}
    for name in (checkpoints.MODEL_FILE, checkpoints.STATE_FILE, checkpoints.META_FILE):
        assert f"{staging}/{name}" in synced_before, name
    assert staging in synced_before  # the directory's entries
    assert ("fsync", str(final.parent)) in events[renamed:]  # and the rename itself
    modes = {(final / name).stat().st_mode & 0o777 for name in os.listdir(final)}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {0o666 & ~umask}


def test_a_checkpoint_is_never_deleted_before_its_replacement_is_complete(tmp_path, monkeypatch):
    config = swissroll_run(tmp_path, "stage1.steps=10", "stage2.steps=0")
    result = train(config, resume="never")
    directory = result.final_checkpoint.parent
    before = (result.final_checkpoint / checkpoints.MODEL_FILE).read_bytes()
    model, meta = checkpoints.load_model(result.final_checkpoint)
    real_rename = os.rename

    def crash_on_the_way_in(source, target):
        if ".tmp-step" in str(source):
            raise KeyboardInterrupt("killed between the two renames")
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", crash_on_the_way_in)
    monkeypatch.setattr(type(result.final_checkpoint), "rename",
                        lambda self, target: crash_on_the_way_in(self, target))
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_local(directory, model, {}, {}, meta)  # the same step again
    monkeypatch.undo()
    checkpoints.Checkpointer.at(directory).prune()  # what the next save does first (keeps 3)
    assert checkpoints.latest_checkpoint(directory).name == result.final_checkpoint.name
    assert (result.final_checkpoint / checkpoints.MODEL_FILE).read_bytes() == before


# A full disk, `ulimit -f`, read-only and blocked directories: tests/integration/test_disk_faults.py


# --------------------------------------------------------------------------- bad input, start-up


def test_a_negative_learning_rate_names_the_key_and_creates_no_run_directory(tmp_path, capsys):
    from pipeline import cli

    status = cli.main(["train", "--config", str(ROOT / "configs/swissroll.yaml"), "--set", f"output_dir={tmp_path}",
                       "--set", "optimizers.latent_generator.lr=-0.001"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0 and "optimizers.latent_generator.lr" in err
    assert not (tmp_path / "swissroll").exists()


def test_shards_where_nothing_decodes_stop_training_in_one_line(image_shards, tmp_path, capsys):
    from pipeline import cli

    for shard in sorted((image_shards / "train").glob("*.tar")):  # every image replaced by junk
        rewrite_tar(shard, lambda name, data: b"not a png" if name.endswith(".png") else data)
    arguments = [f"output_dir={tmp_path}", f"data.train={image_shards}/train", f"data.test={image_shards}/test",
                 *IMAGES, "data.num_workers=1"]
    status = cli.main(["train", "--config", str(ROOT / "configs/swissroll.yaml"),
                       *[a for o in arguments for a in ("--set", o)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2, err
    assert "no readable samples" in err[-1] and "failed to decode" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_a_stop_signal_during_start_up_ends_resumably(tmp_path):
    """SIGTERM a second after launch — while torch and friends are still being imported."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "train", "--config", str(ROOT / "configs/swissroll.yaml"),
         "--set", f"output_dir={tmp_path}", *[a for o in tiny_overrides() for a in ("--set", o)]],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 75, err[-2000:]
    assert "stopped by SIGTERM" in err


def test_a_failed_conversion_leaves_no_empty_output_directory(tmp_path, celeba_source):
    src, _ = celeba_source
    images = sorted((Path(src) / "img_align_celeba").iterdir())
    images[1].write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="cannot read image"):
        convert_dataset("celeba", src, str(out))
    assert not out.exists()

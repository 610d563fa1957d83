"""Checkpoint faults (issue 24 items 4 and 9): a partial staged upload never replaces or
deletes a complete remote checkpoint; a meta.json that fails its schema, or a file that is not
the one meta.json records, counts as damaged — `--resume auto` falls back, an explicit
--resume is one line and exit 2."""

import json
import logging
import os
import shutil
import signal

import pytest
from helpers import ROOT, differing_parameters, tiny_overrides, train

from pipeline import checkpoints, cli
from pipeline.checkpoints.remote import upload_checkpoint
from pipeline.checkpoints.uploads import upload_staged
from pipeline.config import load_config
from pipeline.data import storage
from pipeline.stopping import TrainingInterrupted
from pipeline.tracking.tracker import RunDirectoryTracker

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def overrides(output_dir, *extra) -> list[str]:
    return [f"output_dir={output_dir}", *tiny_overrides(stage1_steps=30, stage2_steps=20, checkpoint_every=10),
            "train.keep_last_checkpoints=10", *extra]


def run_config(output_dir, *extra):
    return load_config(ROOT / "configs/swissroll.yaml", overrides(output_dir, *extra))


def gapm_train(output_dir, *extra, resume: str | None = None) -> int:
    arguments = [a for o in overrides(output_dir, *extra) for a in ("--set", o)]
    return cli.main(["train", "--config", str(ROOT / "configs/swissroll.yaml"), *arguments,
                     *(["--resume", resume] if resume else [])])


# --------------------------------------------------------------------------- item 4: staged uploads


class SigtermAt(RunDirectoryTracker):
    """The run-directory record, plus SIGTERM to this process once step `at` is logged — as a
    Kubernetes eviction or a Slurm time limit would send it."""

    def __init__(self, run_dir, at: int):
        super().__init__(run_dir)
        self.at, self.sent = at, False

    def log_metrics(self, metrics, step):
        super().log_metrics(metrics, step)
        if step >= self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_partial_staged_checkpoint_never_replaces_the_uploaded_one(s3_bucket, tmp_path, capsys):
    """A SIGTERM'd S3 run uploads its last checkpoint (step 25) and stops; what a kill during
    the staged copy's removal leaves — `.checkpoint-uploads/step-00000025/` with meta.json
    alone — is set aside at the relaunch, which keeps the remote step 25, resumes from it and
    ends exactly as an uninterrupted run."""
    remote = f"s3://{s3_bucket}/runs/stopped"
    uninterrupted = train(run_config(tmp_path / "a", f"train.checkpoint_dir=s3://{s3_bucket}/runs/whole"),
                          resume="never")
    config = run_config(tmp_path / "b", f"train.checkpoint_dir={remote}", "train.log_every=5")
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM"):
        train(config, resume="never", tracker=SigtermAt(config.run_dir, at=25))
    uploaded = checkpoints.latest_checkpoint(remote)
    assert checkpoints.checkpoint_basename(uploaded) == "step-00000025"
    meta_before = storage.read_bytes(checkpoints.child(uploaded, checkpoints.META_FILE))
    staged = config.run_dir / checkpoints.STAGING / "step-00000025"
    staged.mkdir(parents=True)
    (staged / checkpoints.META_FILE).write_bytes(meta_before)

    assert gapm_train(tmp_path / "b", f"train.checkpoint_dir={remote}", "train.log_every=5") == 0
    capsys.readouterr()
    assert storage.read_bytes(checkpoints.child(uploaded, checkpoints.META_FILE)) == meta_before
    assert not staged.exists()
    aside = list((config.run_dir / checkpoints.STAGING).glob(".incomplete-step-00000025-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == [checkpoints.META_FILE]
    final = checkpoints.latest_checkpoint(remote)
    assert checkpoints.read_meta(final).step == 50
    assert differing_parameters(uninterrupted.final_checkpoint, final) == []


def staged_copy(source, staging, damage) -> None:
    target = staging / source.name
    shutil.copytree(source, target)
    damage(target)


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


@pytest.mark.parametrize("damage", [
    lambda d: (d / checkpoints.MODEL_FILE).unlink(),
    lambda d: truncate(d / checkpoints.STATE_FILE),
    lambda d: (d / checkpoints.META_FILE).unlink(),
    lambda d: (d / checkpoints.MODEL_FILE).write_bytes(b"\0" * (d / checkpoints.MODEL_FILE).stat().st_size),
], ids=["a file missing", "a file truncated", "no meta.json", "a file's bytes replaced"])
def test_a_partial_staged_checkpoint_is_set_aside_and_the_remote_one_stays(s3_bucket, tmp_path, damage):
    local = train(run_config(tmp_path / "run", "stage1.steps=10", "stage2.steps=0"), resume="never").final_checkpoint
    remote = f"s3://{s3_bucket}/checkpoints"
    uploaded = upload_checkpoint(local, remote)
    objects_before = {url: storage.read_bytes(url) for url in storage.list_urls(uploaded)}
    staging = tmp_path / "staging"
    staged_copy(local, staging, damage)
    upload_staged(staging, remote, keep_last=3)
    assert {url: storage.read_bytes(url) for url in storage.list_urls(uploaded)} == objects_before
    assert not (staging / local.name).exists()
    assert len(list(staging.glob(f".incomplete-{local.name}-*"))) == 1
    assert checkpoints.load_model(uploaded)[1].step == 10


def test_a_complete_staged_checkpoint_already_uploaded_is_not_uploaded_again(s3_bucket, tmp_path):
    """Killed after the upload but before the staged copy was removed: the relaunch finds the
    same meta.json remotely, keeps it and removes the staged copy."""
    local = train(run_config(tmp_path / "run", "stage1.steps=10", "stage2.steps=0"), resume="never").final_checkpoint
    remote = f"s3://{s3_bucket}/checkpoints"
    uploaded = upload_checkpoint(local, remote)
    versions = {url: storage.version(url) for url in storage.list_urls(uploaded)}
    staging = tmp_path / "staging"
    shutil.copytree(local, staging / local.name)
    upload_staged(staging, remote, keep_last=3)
    assert {url: storage.version(url) for url in storage.list_urls(uploaded)} == versions
    assert not list(staging.iterdir())


# --------------------------------------------------------------------------- item 9: meta.json


def edit_meta(checkpoint, **changes) -> None:
    path = checkpoint / checkpoints.META_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes", [{"step": 1e9}, {"stage_step": 10**9, "step": 10**9 + 30}, {"step": "40"},
                                     {"model_kind": "nonexistent"}, {"format_version": 99}],
                         ids=["step 1e9", "a stage step beyond the stage", "step as text", "an unknown kind",
                              "an unknown format"])
def test_an_invalid_meta_json_falls_back_to_the_checkpoint_before_it(tmp_path, caplog, changes):
    """The newest checkpoint's meta.json is edited into nonsense: `--resume auto` warns once and
    resumes from the one before, ending exactly as an uninterrupted run; never does it take the
    nonsense for a finished run."""
    caplog.set_level(logging.INFO, logger="pipeline")
    uninterrupted = train(run_config(tmp_path / "a"), resume="never")
    partial = run_config(tmp_path / "b", "stage2.steps=10")  # stops at step 40
    train(partial, resume="never")
    latest = checkpoints.latest_checkpoint(partial.run_dir / "checkpoints")
    assert latest.name == "step-00000040"
    edit_meta(latest, **changes)
    resumed = train(run_config(tmp_path / "b"), resume="auto")
    warnings = [r.message for r in caplog.records if "not resuming from" in r.message]
    assert len(warnings) == 1 and "step-00000040" in warnings[0], warnings
    assert "resuming from" in caplog.text and "step-00000030" in caplog.text
    assert checkpoints.read_meta(resumed.final_checkpoint).step == 50
    assert differing_parameters(uninterrupted.final_checkpoint, resumed.final_checkpoint) == []


def test_an_invalid_meta_json_named_explicitly_is_one_line_and_exit_2(tmp_path, capsys):
    config = run_config(tmp_path, "stage2.steps=10")
    train(config, resume="never")
    latest = checkpoints.latest_checkpoint(config.run_dir / "checkpoints")
    edit_meta(latest, step=1e9)
    assert gapm_train(tmp_path, resume=str(latest)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "step is 1000000000.0, not an integer" in err and "Traceback" not in err
    assert checkpoints.latest_checkpoint(config.run_dir / "checkpoints") == latest  # nothing trained or saved
    for command in (["sample", str(latest), "--out", str(tmp_path / "x.png")], ["eval", str(latest), "--no-log"]):
        assert cli.main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "not an integer" in err, err


def test_a_weights_file_swapped_for_another_checkpoints_is_found_by_its_digest(tmp_path, caplog):
    """model.safetensors of step 30 copied over step 40's — the same size, a valid file: only
    the sha256 meta.json records tells. `--resume auto` falls back to step 30."""
    uninterrupted = train(run_config(tmp_path / "a"), resume="never")
    partial = run_config(tmp_path / "b", "stage2.steps=10")
    train(partial, resume="never")
    directory = partial.run_dir / "checkpoints"
    shutil.copyfile(directory / "step-00000030" / checkpoints.MODEL_FILE, directory / "step-00000040" /
                    checkpoints.MODEL_FILE)
    with pytest.raises(checkpoints.DamagedCheckpoint, match="sha256 differs"):
        checkpoints.load_model(directory / "step-00000040")
    resumed = train(run_config(tmp_path / "b"), resume="auto")
    assert any("not resuming from" in r.message and "step-00000040" in r.message for r in caplog.records)
    assert differing_parameters(uninterrupted.final_checkpoint, resumed.final_checkpoint) == []


def test_a_checkpoint_written_before_file_records_still_loads_and_resumes(tmp_path, caplog):
    """Format 1 (no sizes or digests in meta.json) is read as before: nothing to check the
    files against, and nothing refused for lacking it."""
    caplog.set_level(logging.INFO, logger="pipeline")
    uninterrupted = train(run_config(tmp_path / "a"), resume="never")
    partial = run_config(tmp_path / "b", "stage2.steps=0")  # stage 2's length sets its learning rates
    train(partial, resume="never")
    latest = checkpoints.latest_checkpoint(partial.run_dir / "checkpoints")
    assert latest.name == "step-00000030"
    values = json.loads((latest / checkpoints.META_FILE).read_text())
    del values["files"]
    values["format_version"] = 1
    (latest / checkpoints.META_FILE).write_text(json.dumps(values))
    assert checkpoints.read_meta(latest).files == {}
    resumed = train(run_config(tmp_path / "b"), resume="auto")
    assert "not resuming from" not in caplog.text and f"resuming from {latest}" in caplog.text
    assert differing_parameters(uninterrupted.final_checkpoint, resumed.final_checkpoint) == []

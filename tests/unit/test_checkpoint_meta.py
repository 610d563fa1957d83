"""meta.json's schema: what a checkpoint must say about itself before anything trusts it."""

import dataclasses
import errno
import json
import math

import pytest

from gapm import GAPMHyperparameters, ModelShape
from pipeline.checkpoints import (
    MODEL_FILE,
    STATE_FILE,
    CheckpointMeta,
    DamagedCheckpoint,
    NoSpaceLeft,
    UnwritableLocation,
    check_plan,
    disk_failure,
    parse_meta,
)
from pipeline.checkpoints.meta import file_record
from pipeline.errors import GapmError
from pipeline.stopping import TrainingInterrupted

SHAPE = ModelShape(data_shape=[2], latent_dim=2, prior_dim=2, width=8, latent_generator_widths=[8],
                   latent_discriminator_widths=[8])


def valid_meta() -> dict:
    meta = CheckpointMeta(stage=2, step=30, stage_step=10, data_epoch=1, data_batch_in_epoch=3,
                          model_shape=dataclasses.asdict(SHAPE), experiment="roll",
                          hyperparameters=dataclasses.asdict(GAPMHyperparameters()), created=1.5e9,
                          files={MODEL_FILE: file_record(b"weights"), STATE_FILE: file_record(b"state")})
    return json.loads(meta.to_json())


def parsed(values) -> CheckpointMeta:
    return parse_meta(json.dumps(values).encode(), "step-00000030/meta.json")


def test_a_meta_json_gapm_writes_reads_back_as_it_was_written():
    assert dataclasses.asdict(parsed(valid_meta())) == valid_meta()


def test_a_format_1_meta_json_without_file_records_still_reads():
    values = valid_meta()
    del values["files"], values["format_version"]
    assert parsed(values).format_version == 1


def changed(**changes):
    def change(values):
        for key, value in changes.items():
            if "." in key:
                section, field = key.split(".")
                values[section][field] = value
            else:
                values[key] = value
    return change


def removed(key):
    return lambda values: values.pop(key)


def without_file(name):
    return lambda values: values["files"].pop(name)


INVALID = [
    ("step given as 1e9", changed(step=1e9), "step is 1000000000.0, not an integer"),
    ("step as text", changed(step="30"), "step is '30', not an integer"),
    ("step as a bool", changed(step=True), "not an integer"),
    ("negative data position", changed(data_epoch=-1), "data_epoch is negative"),
    ("a newer format", changed(format_version=3), "format_version 3 is not one this gapm reads"),
    ("an unknown method", changed(model_kind="diffusion"), "model_kind 'diffusion' is not a known method"),
    ("a stage gapm does not have", changed(stage=3), "stage 3 does not exist: gapm has stages 1..2"),
    ("a stage a baseline does not have", changed(model_kind="vae", hyperparameters={}), "vae has stages 1..1"),
    ("stage 1 whose steps differ", changed(stage=1), "do not add up"),
    ("a stage step beyond the step", changed(stage_step=31), "do not add up"),
    ("a missing field", removed("stage_step"), "missing field(s) stage_step"),
    ("an unknown field", changed(resume_here=True), "unknown field(s) resume_here"),
    ("not an object", lambda values: values.clear() or values.update(x=1), "unknown field(s) x"),
    ("an empty data shape", changed(**{"model_shape.data_shape": []}), "neither [D] nor [C, S, S]"),
    ("a zero width", changed(**{"model_shape.width": 0}), "model_shape.width is 0"),
    ("an unknown shape field", changed(**{"model_shape.depth": 3}), "unknown field 'depth'"),
    ("a shape option out of its choices", changed(**{"model_shape.latent_discriminator_activation": "gelu"}),
     "not one of 'relu', 'leaky_relu'"),
    ("an unknown hyper-parameter", changed(**{"hyperparameters.temperature": 1.0}), "'temperature', which gapm"),
    ("a hyper-parameter of the wrong type", changed(**{"hyperparameters.critic_steps": 1.5}), "not an integer"),
    ("a non-finite number", changed(created=math.nan), "created is nan, not a finite number"),
    ("no record of a file", without_file(STATE_FILE), f"files.{STATE_FILE} is missing"),
    ("a record that is no digest", changed(files={MODEL_FILE: {"bytes": 7, "sha256": "x"}, STATE_FILE:
                                                  file_record(b"state")}), "not a sha256 digest"),
]


@pytest.mark.parametrize(("what", "damage", "message"), INVALID, ids=[case[0] for case in INVALID])
def test_an_invalid_meta_json_is_a_damaged_checkpoint_naming_the_problem(what, damage, message):
    values = valid_meta()
    damage(values)
    with pytest.raises(DamagedCheckpoint) as raised:
        parsed(values)
    text = str(raised.value)
    assert message in text and "step-00000030/meta.json" in text and "\n" not in text


def test_a_meta_json_that_is_not_json_is_damaged():
    with pytest.raises(DamagedCheckpoint, match="unreadable"):
        parse_meta(b"\x80{not json", "meta.json")
    with pytest.raises(DamagedCheckpoint, match="not a JSON object"):
        parse_meta(b"[1, 2]", "meta.json")


@pytest.mark.parametrize(("stage_steps", "message"), [
    ([20, 20], None),  # stage 2 step 10 after 20 stage-1 steps: fits
    ([40, 20], None),  # stage 1 lengthened since: still fits (its 20 steps were done)
    ([20, 5], "stage 2 step 10, beyond that stage's configured 5 steps"),
    ([10, 20], "more than the configured stages before stage 2 (10 steps)"),
    ([20], "stage 2, but this run has 1 stage(s)"),
])
def test_a_checkpoint_to_resume_from_must_fit_the_runs_stages(stage_steps, message):
    meta = parsed({**valid_meta(), "step": 30, "stage_step": 10})
    if message is None:
        check_plan(meta, stage_steps, "ckpt")
        return
    with pytest.raises(DamagedCheckpoint, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_plan(meta, stage_steps, "ckpt")


@pytest.mark.parametrize(("code", "kind", "words"), [
    (errno.ENOSPC, NoSpaceLeft, "no space left"),
    (errno.EDQUOT, NoSpaceLeft, "no space left"),
    (errno.EFBIG, NoSpaceLeft, "ulimit -f"),
    (errno.EROFS, UnwritableLocation, "read-only"),
    (errno.ENOTDIR, UnwritableLocation, "regular file"),
    (errno.EACCES, UnwritableLocation, "permission"),
])
def test_disk_failures_are_told_apart_resumable_or_bad_input(tmp_path, code, kind, words):
    failure = disk_failure(OSError(code, "boom", str(tmp_path / "x")), tmp_path, "checkpoint step-00000010",
                           setting="train.checkpoint_dir")
    assert isinstance(failure, kind) and words in str(failure) and "\n" not in str(failure)
    assert "train.checkpoint_dir" in str(failure)
    # the CLI: a GapmError exits 2, a TrainingInterrupted 75
    assert isinstance(failure, GapmError) != isinstance(failure, TrainingInterrupted)


def test_an_io_error_that_is_no_disk_failure_keeps_its_traceback(tmp_path):
    assert disk_failure(OSError(errno.EIO, "I/O error"), tmp_path, "x") is None

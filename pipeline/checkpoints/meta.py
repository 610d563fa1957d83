"""meta.json, the record that makes a directory a checkpoint, and its schema.

It says what was saved (stage, step, stage step, data position), what model (kind, shape,
hyper-parameters) and — since format 2 — the size and sha256 of each file beside it, so that a
truncated or swapped file is found before it is loaded. Every reader validates it: wrong
types, impossible values, an unknown format version or model kind, a stage that the method
does not have, or a step that does not add up make it a `DamagedCheckpoint`. Format 1 (no
file records) is still read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gapm import METHODS, ModelShape
from pipeline.checkpoints.errors import CheckpointError, DamagedCheckpoint
from pipeline.checkpoints.locations import PAYLOAD_FILES, Checkpoint

FORMAT_VERSION = 2  # 2: meta.json records each file's size and sha256
KNOWN_FORMAT_VERSIONS = (1, 2)


@dataclass
class CheckpointMeta:
    stage: int  # the stage in progress when saved (the last stage with stage_step == its steps: finished)
    step: int  # iterations completed over every stage
    stage_step: int  # iterations completed in `stage`
    data_epoch: int
    data_batch_in_epoch: int
    model_shape: dict[str, Any]
    experiment: str
    model_kind: str = "gapm"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created: float = 0.0
    # file name -> {"bytes": size, "sha256": hex digest}, for every file in PAYLOAD_FILES
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def file_record(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def parse_meta(raw: bytes, where: Checkpoint) -> CheckpointMeta:
    """The validated CheckpointMeta of meta.json's bytes; DamagedCheckpoint naming the first
    problem otherwise."""
    try:
        values = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedCheckpoint(f"{where} is unreadable ({error}); delete this checkpoint") from None
    try:
        return _validated(values)
    except _Invalid as problem:
        raise DamagedCheckpoint(f"{where} is invalid: {problem}; delete this checkpoint (gapm never writes "
                                "such a meta.json: it was edited, damaged or written by another program)") from None


class _Invalid(Exception):
    """One schema violation, said in a few words."""


def _validated(values: Any) -> CheckpointMeta:
    if not isinstance(values, dict):
        raise _Invalid("not a JSON object")
    version = values.get("format_version", 1)
    if type(version) is not int or version not in KNOWN_FORMAT_VERSIONS:
        raise _Invalid(f"format_version {version!r} is not one this gapm reads "
                       f"({', '.join(map(str, KNOWN_FORMAT_VERSIONS))}; a newer gapm wrote it?)")
    hints = typing.get_type_hints(CheckpointMeta)
    known = {f.name for f in dataclasses.fields(CheckpointMeta)}
    required = {f.name for f in dataclasses.fields(CheckpointMeta)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if unknown := sorted(set(values) - known):
        raise _Invalid(f"unknown field(s) {', '.join(unknown)}")
    if missing := sorted(required - set(values)):
        raise _Invalid(f"missing field(s) {', '.join(missing)}")
    for key, value in values.items():
        check_type(value, hints[key], key)
    meta = CheckpointMeta(**{**values, "format_version": version})
    for key in ("step", "stage_step", "data_epoch", "data_batch_in_epoch"):
        if getattr(meta, key) < 0:
            raise _Invalid(f"{key} is negative ({getattr(meta, key)})")
    if meta.model_kind not in METHODS:
        raise _Invalid(f"model_kind {meta.model_kind!r} is not a known method ({', '.join(sorted(METHODS))})")
    method = METHODS[meta.model_kind]
    if not 1 <= meta.stage <= len(method.stages):
        raise _Invalid(f"stage {meta.stage} does not exist: {meta.model_kind} has stages 1..{len(method.stages)}")
    if meta.stage_step > meta.step or (meta.stage == 1 and meta.stage_step != meta.step):
        raise _Invalid(f"step {meta.step} and stage {meta.stage} step {meta.stage_step} do not add up")
    _check_shape(meta.model_shape)
    _check_hyperparameters(method, meta.hyperparameters)
    _check_files(meta)
    return meta


def check_type(value: Any, expected: Any, key: str) -> None:
    """`value` (read from JSON) is of the annotation `expected`, exactly: no bools for numbers,
    no floats for integers, only finite floats."""
    origin, arguments = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        problems = []
        for option in arguments:
            try:
                return check_type(value, option, key)
            except _Invalid as problem:
                problems.append(str(problem))
        raise _Invalid(problems[0])
    if origin is Literal:
        if value not in arguments:
            raise _Invalid(f"{key} is {value!r}, not one of {', '.join(map(repr, arguments))}")
        return None
    if origin in (list, Sequence, tuple):
        if not isinstance(value, list):
            raise _Invalid(f"{key} is {value!r}, not a list")
        for index, item in enumerate(value):
            check_type(item, arguments[0] if arguments else Any, f"{key}[{index}]")
        return None
    if origin in (dict, Mapping):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Invalid(f"{key} is {value!r}, not a mapping of names")
        return None
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    fits = {bool: lambda v: type(v) is bool, int: lambda v: type(v) is int,
            float: lambda v: type(v) in (int, float) and math.isfinite(v), str: lambda v: isinstance(v, str),
            type(None): lambda v: v is None}
    if expected in fits and not fits[expected](value):
        raise _Invalid(f"{key} is {value!r}, not {names.get(expected, 'null')}")
    return None


def _check_shape(values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(ModelShape)
    for key, value in values.items():
        if key not in hints:
            raise _Invalid(f"model_shape has an unknown field {key!r}")
        check_type(value, hints[key], f"model_shape.{key}")
    shape = ModelShape.from_dict(values)
    data_shape = shape.data_shape
    if len(data_shape) not in (1, 3) or not all(size >= 1 for size in data_shape):
        raise _Invalid(f"model_shape.data_shape {data_shape} is neither [D] nor [C, S, S]")
    for key in ("latent_dim", "prior_dim", "width"):
        if getattr(shape, key) < 1:
            raise _Invalid(f"model_shape.{key} is {getattr(shape, key)}, not positive")
    for key in ("latent_generator_widths", "latent_discriminator_widths"):
        if not all(width >= 1 for width in getattr(shape, key)):
            raise _Invalid(f"model_shape.{key} {getattr(shape, key)} lists a width below 1")


def _check_hyperparameters(method: Any, values: dict[str, Any]) -> None:
    settings = method.Hyperparameters
    hints = typing.get_type_hints(settings)
    for key, value in values.items():
        if key not in hints:
            raise _Invalid(f"hyperparameters has {key!r}, which {method.kind} does not have")
        check_type(value, hints[key], f"hyperparameters.{key}")
    try:
        settings(**values)
    except (TypeError, ValueError) as error:
        raise _Invalid(f"hyperparameters are not valid for {method.kind} ({error})") from None


def _check_files(meta: CheckpointMeta) -> None:
    if meta.format_version < 2:
        return  # written before file records existed
    for name in PAYLOAD_FILES:
        record = meta.files.get(name)
        if not isinstance(record, dict) or set(record) != {"bytes", "sha256"}:
            raise _Invalid(f"files.{name} is missing or not {{bytes, sha256}}")
        if type(record["bytes"]) is not int or record["bytes"] < 0:
            raise _Invalid(f"files.{name}.bytes is {record['bytes']!r}, not a size")
        digest = record["sha256"]
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise _Invalid(f"files.{name}.sha256 is {digest!r}, not a sha256 digest")


def check_plan(meta: CheckpointMeta, stage_steps: Sequence[int], where: Checkpoint) -> None:
    """A checkpoint to resume from lies within this run's stages (`stage_steps`, the configured
    length of each): else it was damaged, or written under other stage lengths, and resuming
    from it would skip training."""
    problem = None
    if meta.stage > len(stage_steps):
        problem = f"stage {meta.stage}, but this run has {len(stage_steps)} stage(s)"
    elif meta.stage_step > stage_steps[meta.stage - 1]:
        problem = (f"stage {meta.stage} step {meta.stage_step}, beyond that stage's configured "
                   f"{stage_steps[meta.stage - 1]} steps")
    elif meta.step - meta.stage_step > sum(stage_steps[: meta.stage - 1]):
        problem = (f"step {meta.step}, more than the configured stages before stage {meta.stage} "
                   f"({sum(stage_steps[: meta.stage - 1])} steps) plus its {meta.stage_step}")
    if problem:
        raise DamagedCheckpoint(f"{where} records {problem}; it does not fit this run (delete it, or restore "
                                "the stage lengths it was written with)")


def check_compatible(meta: CheckpointMeta, shape: ModelShape, checkpoint: Checkpoint, kind: str = "gapm") -> None:
    """The checkpoint holds the model this run builds (kind and shape)."""
    if meta.model_kind != kind:
        raise CheckpointError(f"checkpoint {checkpoint} holds a '{meta.model_kind}' model, not '{kind}'; "
                              "use a new experiment name or pass --resume never")
    expected = dataclasses.asdict(shape)
    saved = dataclasses.asdict(ModelShape.from_dict(meta.model_shape))
    if saved != expected:
        differing = sorted(k for k in expected if saved.get(k) != expected[k])
        raise CheckpointError(
            f"checkpoint {checkpoint} was written for a different model "
            f"(differs in: {', '.join(differing) or 'keys'}); use a new experiment name, "
            "pass --resume never, or restore the original config")

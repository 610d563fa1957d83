"""The config reference is generated from the typed configs: the committed page is exactly what
the generator writes now, and it names every key with its meaning."""

import dataclasses
import typing

from helpers import ROOT

from gapm import METHODS
from pipeline.config import ExperimentConfig, OptimizerConfig
from pipeline.config_reference import field_help, reference_markdown, type_name

PAGE = ROOT / "docs/reference/config.md"


def config_keys(cls=ExperimentConfig, prefix=""):
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            keys += config_keys(hints[field.name], f"{prefix}{field.name}.")
        elif not field.name.isupper():
            keys.append(prefix + field.name)
    return keys


def test_the_committed_reference_is_what_the_generator_writes():
    assert PAGE.read_text() == reference_markdown(), (
        "docs/reference/config.md is out of date: run `gapm config --reference > docs/reference/config.md`")


def test_every_key_has_a_row_with_a_meaning():
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[4].strip()
            for line in reference_markdown().splitlines() if line.startswith("| `")}
    keys = config_keys() + [f"optimizers.<network>.{f.name}" for f in dataclasses.fields(OptimizerConfig)]
    keys += [f"model.hyperparameters.{f.name}" for kind in METHODS for f in dataclasses.fields(METHODS[kind].Hyperparameters)]
    assert [key for key in keys if key not in rows] == []
    assert [key for key, meaning in rows.items() if not meaning] == []


def test_help_is_read_from_the_comments_beside_and_above_a_field():
    @dataclasses.dataclass
    class Example:
        # first line
        # second line
        above: int = 1
        beside: str = "x"  # the comment beside
        bare: float = 0.5

    assert field_help(Example) == {"above": "first line second line", "beside": "the comment beside", "bare": ""}
    assert type_name(int | None) == "integer or null" and type_name(list[float]) == "list of float"
    assert type_name(typing.Literal["a", "b"]) == "`a` \\| `b`"

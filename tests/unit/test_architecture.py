"""The layers of ARCHITECTURE.md hold: the import-linter contracts of pyproject.toml pass (and
fail when an import points up), ARCHITECTURE.md states the same layers, reading a config loads
no component's runtime, and every project import inside a function is a documented deferral."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter depends on tomli
    import tomli as tomllib

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the packages under `root`, with `root`'s pyproject.toml."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(root)})


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_the_import_contracts_hold():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"Contracts: {len(contracts())} kept, 0 broken." in done.stdout


def test_an_upward_import_or_a_component_reading_the_config_breaks_them(tmp_path):
    for package in ("gapm", "pipeline"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "pipeline/data/storage.py").open("a") as storage:
        storage.write("\n\ndef _upward():\n    from pipeline.train import loop  # noqa\n")
    with (tmp_path / "pipeline/eval/quality.py").open("a") as quality:
        quality.write("\nfrom pipeline.config import ExperimentConfig  # noqa\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "pipeline.data.storage -> pipeline.train.loop" in done.stdout
    assert "no component imports the experiment config: each takes its own section BROKEN" in done.stdout


def test_architecture_md_states_the_contracts():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    (layers,) = [c["layers"] for c in contracts() if c["type"] == "layers"]
    stated = re.search(r"```text\nlayers \(import-linter\)\n(.*?)```", text, re.S)
    assert stated, "ARCHITECTURE.md has no ```text block starting 'layers (import-linter)'"
    rows = [line.split("#")[0].strip() for line in stated.group(1).splitlines() if line.split("#")[0].strip()]
    assert [set(re.split(r"\s*[:|]\s*", row)) for row in rows] == [set(re.split(r"\s*[:|]\s*", layer)) for layer in layers]
    for contract in contracts():
        assert contract["name"] in text, f"ARCHITECTURE.md does not state the contract {contract['name']!r}"


def test_reading_a_config_loads_no_component_runtime():
    runtime = ["mlflow", "accelerate", "webdataset", "pipeline.train.loop", "pipeline.tracking.tracker",
               "pipeline.tracking.mlflow_sink", "pipeline.data.sources", "pipeline.data.streaming",
               "pipeline.eval.scoring"]
    probe = f"import sys, pipeline.config; print([m for m in {runtime!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_project_imports_inside_functions_are_marked_deferred():
    """The dependencies show at the top of each module; the exceptions (the command line, which
    must not load torch before the stop handler, and MLflow for untracked runs) say so."""
    unmarked = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "gapm").rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            project = any(name.split(".")[0] in ("gapm", "pipeline") for name in names) or getattr(node, "level", 0)
            if project and node.col_offset > 0 and "# deferred" not in lines[node.end_lineno - 1]:
                unmarked.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unmarked, "project imports inside functions without a '# deferred' reason: " + ", ".join(unmarked)

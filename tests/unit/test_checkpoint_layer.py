"""The checkpoint component sits below train/ and tracking/: it imports gapm, the storage layer
and the foundations only, at module top; its users reach checkpoints through it alone."""

import ast
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "pipeline" / "checkpoints"
ALLOWED = ("gapm", "pipeline.checkpoints", "pipeline.data.storage", "pipeline.data.outages", "pipeline.errors",
           "pipeline.stopping")


def project_imports(path: Path) -> list[tuple[str, bool]]:
    """(what is imported, at module top?) for every import from gapm or pipeline in `path`:
    `from pipeline.data import storage` is pipeline.data.storage."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("gapm", "pipeline")):
            found += [(f"{node.module}.{alias.name}", id(node) in top) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names if alias.name.startswith(("gapm", "pipeline"))]
    return found


def test_the_checkpoint_component_imports_only_what_lies_below_it_at_module_top():
    for path in sorted(PACKAGE.glob("*.py")):
        for module, at_top in project_imports(path):
            assert module.startswith(ALLOWED), f"{path.name} imports {module}"
            assert at_top, f"{path.name} imports {module} inside a function"


def test_checkpoint_users_reach_it_through_the_component_and_tracking_never_up_into_train():
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for module, _ in project_imports(path):
            assert not module.startswith("pipeline.train.checkpoint"), path
            if path.parent.name == "tracking":  # the registry once imported train/checkpoints
                assert not module.startswith("pipeline.train"), f"{path} imports {module}"


def test_the_component_keeps_to_the_house_sizes():
    for path in sorted(PACKAGE.glob("*.py")):
        source = path.read_text()
        assert source.count("\n") <= 450, path.name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 90, f"{path.name}: {node.name}"

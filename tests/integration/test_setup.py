"""A fresh machine: `make demo` and `make test` bring what they need (.ci/prerequisites checks
Python and the Debian packages the tests use, installing them as root), the demo installs no
extra it does not use, and what cannot be installed is named before the tests run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, tiny_overrides

PREREQUISITES = ROOT / ".ci" / "prerequisites"


def make_dry_run(target: str, tmp_path: Path) -> list[str]:
    """The commands `make TARGET` runs on a machine without the environment yet."""
    done = subprocess.run(["make", "-n", target, f"VENV={tmp_path / '.venv'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def index_of(lines: list[str], fragment: str) -> int:
    return next(i for i, line in enumerate(lines) if fragment in line)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_installs_extras_only_where_they_are_used(tmp_path):
    demo = make_dry_run("demo", tmp_path)
    assert index_of(demo, ".ci/prerequisites python") < index_of(demo, "-m venv")
    assert index_of(demo, "torch==2.14.1 torchvision==0.29.1") < index_of(demo, "pip install -q -e .")
    assert index_of(demo, "pip install -q -e .") < index_of(demo, "gapm train --config configs/swissroll.yaml")
    assert not [line for line in demo if "deepspeed" in line or "[dev" in line]

    test = make_dry_run("test", tmp_path)
    assert index_of(test, "-e '.[dev]'") < index_of(test, ".ci/prerequisites test") < index_of(test, "-m pytest -q")
    assert not [line for line in test if "deepspeed" in line]

    slow = make_dry_run("test-slow", tmp_path)
    assert index_of(slow, "-e '.[dev,deepspeed]'") < index_of(slow, "-m pytest -q -m slow")


def test_the_demo_trains_without_deepspeed_or_transformers(tmp_path):
    """The demo's code path (training, MLflow's embedded store, the logged and registered model)
    with DeepSpeed and transformers made unimportable."""
    sets = [a for o in [f"output_dir={tmp_path}", *tiny_overrides(stage1_steps=10, stage2_steps=10, tracking=True),
                        "tracking.system_metrics=false"] for a in ("--set", o)]
    script = ("import sys; sys.modules['deepspeed'] = sys.modules['transformers'] = None; "
              "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", script, "train", "--config", "configs/swissroll.yaml", *sets],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "swissroll" / "mlflow.db").is_file() and "run directory:" in done.stdout


def prerequisites(*arguments: str, **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("bash") or "/bin/bash", str(PREREQUISITES), *arguments], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PREREQUISITES_INSTALL": "0", **variables})


def fake_python(tmp_path: Path, *, version: str, has_venv: bool) -> str:
    """A stand-in interpreter answering the three questions the script asks."""
    path = tmp_path / "python"
    old = "1" if tuple(map(int, version.split("."))) < (3, 10) else "0"
    path.write_text(f"""#!/bin/sh
case "$*" in
  --version) echo "Python {version}.0" ;;
  *version_info\\ \\<*) exit {old} ;;
  *ensurepip*) exit {0 if has_venv else 1} ;;
  *) echo "{version}" ;;
esac
""")
    path.chmod(0o755)
    return str(path)


def test_prerequisites_accept_this_python():
    done = prerequisites("python", PYTHON=sys.executable)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("version, has_venv, message", [
    ("3.8", True, "is Python 3.8.0; gapm needs Python >= 3.10"),
    ("3.12", False, "cannot create virtual environments (no ensurepip); install python3.12-venv"),
])
def test_prerequisites_name_an_unusable_python(tmp_path, version, has_venv, message):
    done = prerequisites("python", PYTHON=fake_python(tmp_path, version=version, has_venv=has_venv))
    assert done.returncode == 1 and message in done.stderr, done.stderr
    missing = prerequisites("python", PYTHON=str(tmp_path / "no-such-python"))
    assert missing.returncode == 1 and "install Python >= 3.10 with venv" in missing.stderr


def test_prerequisites_name_what_the_tests_miss_before_they_run(tmp_path):
    tools = tmp_path / "bin"  # a PATH without shellcheck
    tools.mkdir()
    (tools / "id").symlink_to(shutil.which("id"))
    done = prerequisites("test", PATH=str(tools))
    assert done.returncode == 0  # the rest of the suite still runs
    assert ("missing shellcheck (as root: apt-get install shellcheck); the lint of the launcher scripts will be "
            "skipped") in done.stderr
    strict = prerequisites("test", PATH=str(tools), STRICT="1")
    assert strict.returncode == 1 and "error: missing shellcheck" in strict.stderr


def test_prerequisites_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; `make test` installs it as root)")
    done = subprocess.run([shellcheck, str(PREREQUISITES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    assert os.access(PREREQUISITES, os.X_OK)

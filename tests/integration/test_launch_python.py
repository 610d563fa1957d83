"""The launchers find the interpreter with gapm by themselves (launch/gapm_python.sh): GAPM_PYTHON,
else the active virtualenv, else the checkout's .venv, else python3 — and say how to fix it, in one
line with exit 2, when that interpreter lacks gapm (before: the system python3 and "No module
named 'accelerate'" from deep inside accelerate's launcher)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from helpers import ROOT, clean_environment

LAUNCH = ROOT / "launch"


def environment(**extra: str) -> dict[str, str]:
    """A shell that activated nothing: no GAPM_PYTHON, no VIRTUAL_ENV."""
    env = clean_environment(**extra)
    for name in ("GAPM_PYTHON", "VIRTUAL_ENV"):
        if name not in extra:
            env.pop(name, None)
    return env


def interpreter(path: Path) -> Path:
    """An executable at `path` that is this test's Python (which has gapm), as a venv's would be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    path.chmod(0o755)
    return path


def checkout(tmp_path: Path, with_venv: bool) -> Path:
    """A copy of launch/ in a checkout of its own, with or without a .venv."""
    root = tmp_path / "checkout"
    shutil.copytree(LAUNCH, root / "launch", ignore=shutil.ignore_patterns("logs"))
    if with_venv:
        interpreter(root / ".venv/bin/python")
    return root


def found(root: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(root / "launch/gapm_python.sh")], env=environment(**env), cwd=root,
                          capture_output=True, text=True, timeout=60)


def test_the_checkouts_venv_is_found_without_activation(tmp_path):
    root = checkout(tmp_path, with_venv=True)
    result = found(root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(root / ".venv/bin/python")


def test_gapm_python_then_an_active_virtualenv_come_first(tmp_path):
    root = checkout(tmp_path, with_venv=True)
    active = interpreter(tmp_path / "active/bin/python")
    assert found(root, VIRTUAL_ENV=str(tmp_path / "active")).stdout.strip() == str(active)
    chosen = interpreter(tmp_path / "chosen/python")
    assert found(root, GAPM_PYTHON=str(chosen), VIRTUAL_ENV=str(tmp_path / "active")).stdout.strip() == str(chosen)


def test_an_interpreter_without_gapm_is_refused_in_one_line(tmp_path):
    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(bare)  # a Python without accelerate and torch
    root = checkout(tmp_path, with_venv=False)
    path = f"{bare / 'bin'}:{os.environ['PATH']}"  # its python3 comes first on PATH
    result = found(root, PATH=path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert "python3 (from python3 on PATH" in result.stderr and "lacks gapm's modules: accelerate torch" in result.stderr
    assert "make install" in result.stderr and "GAPM_PYTHON" in result.stderr
    missing = found(root, GAPM_PYTHON=str(tmp_path / "nope"))
    assert missing.returncode == 2 and "is not an executable Python" in missing.stderr
    # the node script stops on it before anything starts
    node = subprocess.run([str(root / "launch/start_node.sh"), "--config", "configs/swissroll.yaml"],
                          env=environment(PATH=path, GAPM_CPU="1"), capture_output=True, text=True, timeout=60)
    assert node.returncode == 2 and "lacks gapm's modules" in node.stderr and "pipeline.launcher" not in node.stdout


@pytest.mark.skipif(not (ROOT / ".venv/bin/python").is_file(), reason="this checkout has no .venv (make install)")
@pytest.mark.parametrize("script, variables", [
    ("start_node.sh", dict(GAPM_CPU="1")),
    ("k8s/entrypoint.sh", dict(JOB_COMPLETION_INDEX="1", GAPM_NNODES="2", GAPM_MASTER_ADDR="pod-0", GAPM_CPU="1")),
    ("slurm/launch_node.sh", dict(SLURM_NNODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="n[1-2]", GAPM_CPU="1")),
    ("matrix_element.sh", dict(SLURM_ARRAY_TASK_ID="2")),
])
def test_every_launcher_runs_the_checkouts_venv(script, variables):
    arguments = ["configs/matrices/fashion-mnist-table1.yaml"] if script == "matrix_element.sh" else \
        ["--config", "configs/swissroll.yaml"]
    result = subprocess.run([str(LAUNCH / script), *arguments], env=environment(GAPM_DRY_RUN="1", **variables),
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout)[0] == str(ROOT / ".venv/bin/python")


@pytest.mark.skipif(not (ROOT / ".venv/bin/python").is_file(), reason="this checkout has no .venv (make install)")
def test_the_evaluation_batch_script_runs_the_checkouts_venv(tmp_path):
    (tmp_path / "srun").write_text('#!/bin/sh\necho "$@"\n')  # prints the command instead of running it
    (tmp_path / "srun").chmod(0o755)
    result = subprocess.run([str(LAUNCH / "slurm/eval.sbatch"), "configs/swissroll.yaml"],
                            env=environment(PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(ROOT)),
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[1:5] == [str(ROOT / ".venv/bin/python"), "-m", "pipeline.cli", "eval-watch"]

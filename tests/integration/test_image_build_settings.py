"""launch/docker/build_image.sh hands this machine's pip settings to the image build (dry runs):
as a build secret, never a build argument or a file of the repository, with the local paths they
name bind-mounted for podman, and the commit as GAPM_GIT_COMMIT. The real build:
tests/integration/test_container_image.py (slow)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from helpers import ROOT, clean_environment

SCRIPT = ROOT / "launch/docker/build_image.sh"


def local_index(tmp_path: Path) -> dict[str, str]:
    """pip settings naming a password-protected mirror, a local PEP 503 index, a wheel folder and
    a constraint file (the last two through PIP_* variables, which beat the files)."""
    for folder in ("pypi/simple", "pypi/files", "wheels"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "constraints.txt").write_text("torch<=9\n")
    (tmp_path / "pip.conf").write_text(f"[global]\nindex-url = https://builder:s3cret@mirror.invalid/simple\n"
                                       f"extra-index-url = file://{tmp_path}/pypi/simple\nfind-links = /nowhere\n")
    return clean_environment(PIP_CONFIG_FILE=str(tmp_path / "pip.conf"), PIP_FIND_LINKS=str(tmp_path / "wheels"),
                             PIP_CONSTRAINT=str(tmp_path / "constraints.txt"), GAPM_DRY_RUN="1")


def dry_run(env: dict[str, str], *args: str) -> tuple[list[str], str]:
    result = subprocess.run([str(SCRIPT), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout), result.stderr


def head_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return head + ("-dirty" if dirty else "")


def test_pip_settings_go_in_as_a_secret_with_their_local_paths_mounted(tmp_path):
    command, pip_conf = dry_run(local_index(tmp_path), "--isolation", "chroot")
    assert command[:2] == ["podman", "build"]
    secret = command[command.index("--secret") + 1]
    assert secret.startswith("id=pip.conf,src=")
    assert not Path(secret.split("src=")[1]).exists()  # a private temporary file, removed after the build
    # the merged settings (the PIP_* variables win over the files)
    assert "index-url = https://builder:s3cret@mirror.invalid/simple" in pip_conf
    assert f"find-links = {tmp_path}/wheels" in pip_conf and "/nowhere" not in pip_conf
    assert f"constraint = {tmp_path}/constraints.txt" in pip_conf
    volumes = {command[i + 1] for i, arg in enumerate(command) if arg == "--volume"}
    for path in (tmp_path / "pypi", tmp_path / "wheels", tmp_path / "constraints.txt"):  # pypi/: simple/ and files/
        assert f"{path}:{path}:ro" in volumes
    assert not any("mirror.invalid" in arg or "s3cret" in arg for arg in command)  # not a build argument
    assert f"GAPM_GIT_COMMIT={head_commit()}" in command
    assert command[command.index("--tag") + 1] == "gapm:latest"
    assert command[-4:] == ["chroot", "--file", str(ROOT / "Dockerfile"), str(ROOT)]


def test_given_options_win_and_docker_gets_no_mounts(tmp_path):
    env = local_index(tmp_path)
    command, _ = dry_run(env, "-t", "mine:1", "--build-arg", "GAPM_GIT_COMMIT=abc")
    assert "--tag" not in command and command.count("-t") == 1
    assert [arg for arg in command if arg.startswith("GAPM_GIT_COMMIT=")] == ["GAPM_GIT_COMMIT=abc"]
    command, stderr = dry_run({**env, "GAPM_CONTAINER_ENGINE": "docker"})
    assert command[:2] == ["docker", "build"] and "--secret" in command and "--volume" not in command
    assert "docker build cannot mount" in stderr and str(tmp_path / "wheels") in stderr


def test_no_pip_settings_are_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not [name for name in tracked if os.path.basename(name) in ("pip.conf", "pip.ini")]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--mount=type=secret,id=pip.conf" in dockerfile  # read from the secret, in no layer
    assert "index-url" not in dockerfile and "ARG PIP" not in dockerfile

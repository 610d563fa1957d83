"""The container image, built from the Dockerfile and run for real with podman (slow).

The base is Debian bookworm made here with mmdebstrap (python3, python3-venv, pip) and imported
into podman, so nothing is pulled from a container registry; torch and torchvision are the
versions this test runs with, from this machine's package indexes, which
launch/docker/build_image.sh passes into the build (its pip settings as a build secret, the
local paths they name as read-only bind mounts). podman runs rootful with runc, cgroupfs and
the host network, given a containers.conf without default ulimits. Then:

- the image runs gapm as its user (uid 1000) from its venv, which the launchers find by
  themselves, and knows the commit it was built from (GAPM_GIT_COMMIT);
- a bind-mounted run folder: a root-owned one (what `docker run -v` creates) is refused in one
  line with exit 2; with podman's `:U` the image's user trains into it; with `--user UID:GID`
  any user does, into a folder of its own;
- two containers of the image are two nodes of an Indexed Job: each runs
  launch/k8s/entrypoint.sh with what the Job gives its pods (JOB_COMPLETION_INDEX, GAPM_NNODES,
  GAPM_MASTER_ADDR, ...) on the host network, and together they train the swiss roll with
  world size 2, the ranks agreeing.

Skips, saying why, where podman cannot run: not root, or podman/mmdebstrap/runc missing and not
installable with apt-get.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from importlib import metadata
from pathlib import Path

import pytest
from helpers import ROOT, free_port, tiny_overrides

pytestmark = pytest.mark.slow  # building the image takes minutes (seconds once its layers are cached)

IMAGE = "localhost/gapm-test:latest"
BASE_IMAGE = "localhost/gapm-test-base:bookworm"
PACKAGES = ("podman", "mmdebstrap", "runc")
BASE_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
APT_TIMEOUT_S = 900
BUILD_TIMEOUT_S = 3600
RUN_TIMEOUT_S = 600
TRAIN = ["--config", "configs/swissroll.yaml", "--set", "output_dir=/opt/gapm/runs",
         *[arg for o in tiny_overrides(stage1_steps=4, stage2_steps=2, batch_size=32, samples=256, test_samples=64,
                                       width=16, checkpoint_every=2, log_every=2, eval_samples=64,
                                       discriminator_steps=1) for arg in ("--set", o)]]


def ensure_podman() -> None:
    if os.geteuid() != 0:
        pytest.skip("podman runs rootful here (its storage, runc, the host network): run the tests as root")
    missing = [name for name in PACKAGES if shutil.which(name) is None]
    if missing and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", *PACKAGES]
        if subprocess.run(install, capture_output=True, env=env, timeout=APT_TIMEOUT_S).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=APT_TIMEOUT_S)
            subprocess.run(install, capture_output=True, env=env, timeout=APT_TIMEOUT_S)
        missing = [name for name in PACKAGES if shutil.which(name) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed and not installable here: apt-get install {' '.join(PACKAGES)}")


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory) -> dict[str, str]:
    """The environment podman runs in: a containers.conf without default ulimits (the
    defaults ask for more open files than this machine's containers may have)."""
    ensure_podman()
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(env: dict[str, str], *args: str, timeout: float = RUN_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args[:3])} ... failed ({result.returncode}):\n" \
                                       f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def ensure_base_image(env: dict[str, str]) -> None:
    """Debian bookworm with python3 and venv, made here (about 2 min) unless already in podman."""
    if podman(env, "image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return
    with tempfile.TemporaryDirectory(prefix="gapm-base-") as directory:
        tar = Path(directory) / "base.tar"
        made = subprocess.run(["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(tar)],
                              capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        assert made.returncode == 0, f"mmdebstrap failed:\n{made.stderr[-3000:]}"
        podman(env, "import", str(tar), BASE_IMAGE)


def expected_commit() -> str:
    """What build_image.sh passes as GAPM_GIT_COMMIT (as the tracker would compute it)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return head + ("-dirty" if dirty else "")


@pytest.fixture(scope="module")
def image(podman_env) -> str:
    """The Dockerfile built by launch/docker/build_image.sh on the bookworm base, with this
    test's torch and torchvision (the image replaced by an earlier run is removed after)."""
    ensure_base_image(podman_env)
    built_commit.append(expected_commit())
    previous = podman(podman_env, "image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    torch_packages = f"torch=={metadata.version('torch')} torchvision=={metadata.version('torchvision')}"
    build = subprocess.run([str(ROOT / "launch/docker/build_image.sh"), "--tag", IMAGE, "--isolation", "chroot",
                            "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                            "--build-arg", f"TORCH_PACKAGES={torch_packages}", "--build-arg", "GAPM_EXTRAS="],
                           env={**podman_env, "GAPM_BUILD_PYTHON": shutil.which("python3") or sys.executable},
                           capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert build.returncode == 0, f"build failed:\n{build.stdout[-6000:]}\n{build.stderr[-3000:]}"
    current = podman(podman_env, "image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    if previous and previous != current:
        podman(podman_env, "rmi", previous, check=False)
    size = int(podman(podman_env, "image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(f"\n{IMAGE}: {size / 1e9:.2f} GB ({torch_packages}, no DeepSpeed)")
    return IMAGE


built_commit: list[str] = []  # what the image was built from (the tree may change while the tests run)


def run_in(env: dict[str, str], image: str, *args: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`podman run` as this machine allows: runc, cgroupfs, the host network."""
    return podman(env, "run", "--rm", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--network", "host",
                  "--env", "OMP_NUM_THREADS=1", *options, image, *args, check=False)


def test_the_image_runs_gapm_as_its_user_from_its_venv(podman_env, image):
    usage = run_in(podman_env, image)  # CMD --help
    assert usage.returncode == 0 and "usage: gapm" in usage.stdout, usage.stderr
    identity = run_in(podman_env, image, "-c", "id -u; id -g; printenv GAPM_GIT_COMMIT; launch/gapm_python.sh",
                      options=("--entrypoint", "bash"))
    assert identity.returncode == 0, identity.stderr
    assert identity.stdout.split() == ["1000", "1000", built_commit[-1], "/opt/gapm/.venv/bin/python"]


def test_a_bind_mounted_run_folder(podman_env, image, tmp_path):
    """What `docker run -v "$PWD/runs:/opt/gapm/runs"` does when runs/ does not exist: the engine
    creates it, owned by root. gapm refuses it in one line (2: fix the input); podman's :U
    gives it to the image's user; --user runs as the owner of a folder that exists."""
    root_owned = tmp_path / "root-owned"
    root_owned.mkdir(mode=0o755)
    refused = run_in(podman_env, image, "train", *TRAIN, options=("--volume", f"{root_owned}:/opt/gapm/runs"))
    assert refused.returncode == 2, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert "cannot write the run directory to /opt/gapm/runs" in last and "Permission denied" in last
    assert not any(root_owned.iterdir())

    given = tmp_path / "given"
    given.mkdir()
    trained = run_in(podman_env, image, "train", *TRAIN, options=("--volume", f"{given}:/opt/gapm/runs:U"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = given / "swissroll/metrics.json"
    assert metrics.is_file() and metrics.stat().st_uid == 1000

    own = tmp_path / "own"
    own.mkdir()
    os.chown(own, 4321, 4321)
    as_user = run_in(podman_env, image, "train", *TRAIN,
                     options=("--user", "4321:4321", "--volume", f"{own}:/opt/gapm/runs"))
    assert as_user.returncode == 0, as_user.stderr[-3000:]
    assert (own / "swissroll/metrics.json").stat().st_uid == 4321


def test_two_containers_train_as_two_nodes_of_an_indexed_job(podman_env, image, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    port = str(free_port())
    names = {rank: f"gapm-node{rank}-{uuid.uuid4().hex[:8]}" for rank in (1, 0)}
    processes, logs = {}, {}
    try:
        for rank, name in names.items():  # node 1 first: it waits for node 0
            # what the Indexed Job gives pod `rank` (indexed-job.yaml), CPU instead of GPUs
            variables = dict(JOB_COMPLETION_INDEX=str(rank), GAPM_NNODES="2", GAPM_MASTER_ADDR="127.0.0.1",
                             GAPM_MASTER_PORT=port, GAPM_CPU="1", OMP_NUM_THREADS="1")
            command = ["podman", "run", "--rm", "--name", name, "--runtime", "runc", "--cgroup-manager", "cgroupfs",
                       "--network", "host", "--volume", f"{runs}:/opt/gapm/runs:U",
                       *[arg for key, value in variables.items() for arg in ("--env", f"{key}={value}")],
                       "--entrypoint", "/opt/gapm/launch/k8s/entrypoint.sh", image, *TRAIN]
            logs[rank] = tmp_path / f"node{rank}.log"
            with logs[rank].open("w") as out:
                processes[rank] = subprocess.Popen(command, env=podman_env, stdout=out, stderr=subprocess.STDOUT)
        codes = {rank: process.wait(timeout=RUN_TIMEOUT_S) for rank, process in processes.items()}
    finally:
        for rank, process in processes.items():
            if process.poll() is None:
                podman(podman_env, "rm", "--force", names[rank], check=False)
                process.kill()
    output = "\n".join(f"== node {rank}\n{log.read_text(errors='replace')[-4000:]}" for rank, log in logs.items())
    assert codes == {1: 0, 0: 0}, output
    assert "start_node.sh: node 0 of 2 exits 0" in logs[0].read_text(), output
    run = runs / "swissroll"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["distributed/max_parameter_divergence"] == 0  # the two ranks ended identical
    tags = json.loads((run / "tags.json").read_text())
    assert tags["world_size"] == "2" and tags["git_commit"] == built_commit[-1]

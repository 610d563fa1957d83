"""The `slurm_cluster` fixture: a real two-node Slurm cluster emulated on 127.0.0.1 (see
tests/slurm_cluster.py), started once per session and stopped at its end."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, SlurmUnavailable


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """munged, slurmctld and slurmd -N n1 / -N n2, installed first (apt-get, as root) when
    missing. Skips when that cannot be done here; a daemon that fails to start is an error.
    The directory is under /tmp itself, not pytest's private tmp: munged runs as the munge
    user and must reach its socket and key."""
    directory = Path(tempfile.mkdtemp(prefix="gapm-slurm-"))
    cluster = SlurmCluster(directory)
    try:
        cluster.start()
    except SlurmUnavailable as error:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.skip(f"no Slurm cluster: {error}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)

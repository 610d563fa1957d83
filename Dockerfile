# gapm in a virtualenv at /opt/gapm/.venv (the launchers find it there, as in a checkout), run as
# the non-root user gapm (uid/gid 1000), with `gapm` as the entry point. Build it with
# launch/docker/build_image.sh, which passes this machine's pip settings in (never into a layer):
#   launch/docker/build_image.sh -t gapm:0.1.0                 # CUDA: pytorch/pytorch runtime base
#   docker run --gpus all --shm-size 8g --user "$(id -u):$(id -g)" -v "$PWD/runs:/opt/gapm/runs" \
#     gapm:0.1.0 train --config configs/swissroll.yaml          # after `mkdir -p runs`
# Multi-node pods run launch/k8s/entrypoint.sh as their command instead (see launch/k8s/).
#
# Build arguments:
#   BASE_IMAGE         an image with python3 (>= 3.10, with venv): the PyTorch CUDA runtime below
#                      (its torch is kept), or e.g. Debian bookworm with python3-venv for CPU
#   TORCH_PACKAGES     torch (and torchvision) to install first where the base has none, e.g.
#                      "torch==2.14.1 torchvision==0.29.1" (a matching pair: torchvision's binary
#                      works only with the torch build it was made for)
#   GAPM_EXTRAS        extras of pyproject.toml to install (default deepspeed; empty: none)
#   GAPM_GIT_COMMIT    the commit built (an image has no .git): recorded as every run's git_commit
ARG BASE_IMAGE=pytorch/pytorch:2.7.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG TORCH_PACKAGES=""
ARG GAPM_EXTRAS=deepspeed

# The venv comes first on PATH: `gapm`, `python` and `pip` are the venv's.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/gapm/.venv \
    PATH=/opt/gapm/.venv/bin:${PATH}

WORKDIR /opt/gapm
# Dependencies first, from pyproject.toml alone (with empty packages and README), so that a change
# of the code or the docs rebuilds only the layers after it. pip's settings arrive as the build secret pip.conf (index
# URLs, certificates; see build_image.sh); the pip cache is a build cache, not a layer.
# --system-site-packages lets the venv see the base image's torch and torchvision, and the
# constraint keeps them: pip may not replace a CUDA build.
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip.conf --mount=type=cache,target=/root/.cache/pip \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi \
    && python3 -m venv --system-site-packages /opt/gapm/.venv \
    && if [ -n "${TORCH_PACKAGES}" ]; then pip install ${TORCH_PACKAGES}; fi \
    && python -c "from importlib import metadata as m; found = {d.metadata['Name'].lower() for d in m.distributions()}; print('\n'.join(f'{n}=={m.version(n)}' for n in ('torch', 'torchvision') if n in found))" > /opt/gapm/.venv/torch-constraints.txt \
    && mkdir gapm pipeline && touch gapm/__init__.py pipeline/__init__.py README.md \
    && package=. && if [ -n "${GAPM_EXTRAS}" ]; then package=".[${GAPM_EXTRAS}]"; fi \
    && pip install --constraint /opt/gapm/.venv/torch-constraints.txt "$package" \
    && pip uninstall --yes gapm && rm -rf gapm pipeline README.md build ./*.egg-info

COPY . .
RUN --mount=type=secret,id=pip.conf --mount=type=cache,target=/root/.cache/pip \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi \
    && pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && chmod 0755 launch/*.sh launch/docker/*.sh launch/slurm/*.sh launch/slurm/*.sbatch launch/k8s/*.sh \
    && python -c "import gapm, pipeline.cli, torchvision, cleanfid.fid"

# After the installs, as it changes with every commit (build_image.sh passes it). The RUN keeps
# it in a file too, and makes a new commit rebuild the ENV layer: buildah reuses a cached ENV
# layer whatever the build argument's value, a RUN layer only for the same values.
ARG GAPM_GIT_COMMIT=""
RUN printf '%s\n' "${GAPM_GIT_COMMIT}" > /opt/gapm/.gapm-git-commit
ENV GAPM_GIT_COMMIT=${GAPM_GIT_COMMIT}

# Non-root. It owns what a run writes next to the code (runs/, mlruns/) and its home (caches);
# the home is also open to any other uid, for `docker run --user "$(id -u):$(id -g)"`.
RUN groupadd --gid 1000 gapm \
    && useradd --uid 1000 --gid gapm --create-home --home-dir /home/gapm --shell /bin/bash gapm \
    && mkdir -p /opt/gapm/runs /opt/gapm/mlruns \
    && chown gapm:gapm /opt/gapm /opt/gapm/runs /opt/gapm/mlruns \
    && chmod 1777 /home/gapm
USER gapm
ENV HOME=/home/gapm

ENTRYPOINT ["gapm"]
CMD ["--help"]

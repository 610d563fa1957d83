# gapm on CUDA: the package with its extras on the PyTorch runtime image, run as a non-root
# user, with `gapm` as the entry point:
#   docker build -t gapm:0.1.0 .
#   docker run --gpus all --shm-size 8g -v "$PWD/runs:/opt/gapm/runs" gapm:0.1.0 \
#     train --config configs/swissroll.yaml
# Multi-node pods run launch/k8s/entrypoint.sh as their command instead (see launch/k8s/).
ARG BASE_IMAGE=pytorch/pytorch:2.7.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/gapm
COPY . .
# The constraint keeps the base image's CUDA build of torch: pip may not replace it.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt ".[deepspeed]" \
    && rm -rf build ./*.egg-info /tmp/torch-constraint.txt \
    && chmod 0755 launch/start_node.sh launch/slurm/*.sh launch/slurm/*.sbatch launch/k8s/entrypoint.sh

# Non-root. It owns only what a run writes next to the code: runs/, mlruns/, the local
# MLflow database (the working directory itself) and its home (caches).
RUN groupadd --gid 1000 gapm \
    && useradd --uid 1000 --gid gapm --create-home --home-dir /home/gapm --shell /bin/bash gapm \
    && mkdir -p /opt/gapm/runs /opt/gapm/mlruns \
    && chown gapm:gapm /opt/gapm /opt/gapm/runs /opt/gapm/mlruns
USER gapm
ENV HOME=/home/gapm

ENTRYPOINT ["gapm"]
CMD ["--help"]

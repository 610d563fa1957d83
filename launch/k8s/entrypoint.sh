#!/usr/bin/env bash
# Container command of the training pods, shared by pytorchjob.yaml and indexed-job.yaml:
# turns what the controller tells the pod into launch/start_node.sh's variables and execs
# it with the `gapm train` arguments (the container's args). One pod per node.
#
#   Kubeflow PyTorchJob (training operator) injects:
#     MASTER_ADDR, MASTER_PORT  the master pod's service and port (the rendezvous)
#     RANK                      this pod's node index (Master 0, Worker i -> i + 1)
#     WORLD_SIZE                pods x spec.nprocPerNode, i.e. the number of pods when
#                               nprocPerNode is unset or "auto"
#     PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE   (operator >= 1.7) preferred when set
#   Indexed Job (indexed-job.yaml):
#     JOB_COMPLETION_INDEX      this pod's node index
#     GAPM_NNODES, GAPM_MASTER_ADDR, GAPM_MASTER_PORT   set in the manifest
#   Neither: a single node (e.g. `docker run --entrypoint launch/k8s/entrypoint.sh ...`).
#
# Explicit GAPM_NNODES / GAPM_NODE_RANK / GAPM_MASTER_ADDR / GAPM_MASTER_PORT /
# GAPM_PROCS_PER_NODE always win. Processes per node default to PET_NPROC_PER_NODE when it
# is a number, else to the visible GPUs. The rendezvous is static (node rank = pod index).
# Kubernetes sends SIGTERM to this process (PID 1) on eviction or deletion: start_node.sh
# passes it to the trainers, which checkpoint, and the pod exits 75 ("resumable"; with
# GAPM_EXIT_RESUMABLE set, that code instead: pytorchjob.yaml sets 203, which its ExitCode
# restart policy restarts). A bad config exits 2, which both manifests treat as final.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

fail() {
    echo "entrypoint.sh: error: $*" >&2
    exit 2
}

if [[ -n ${JOB_COMPLETION_INDEX:-} ]]; then
    node_rank=$JOB_COMPLETION_INDEX
    nnodes=${GAPM_NNODES:-}
    master_addr=${GAPM_MASTER_ADDR:-}
    master_port=${GAPM_MASTER_PORT:-29500}
    [[ -n $nnodes ]] || fail "Indexed Job: set GAPM_NNODES to the Job's completions (see indexed-job.yaml)"
    [[ -n $master_addr ]] || fail "Indexed Job: set GAPM_MASTER_ADDR to pod 0's DNS name, <job>-0.<service> (see indexed-job.yaml)"
elif [[ -n ${RANK:-} || -n ${PET_NODE_RANK:-} ]]; then
    node_rank=${PET_NODE_RANK:-$RANK}
    nnodes=${PET_NNODES:-${WORLD_SIZE:-}}
    master_addr=${MASTER_ADDR:-}
    master_port=${MASTER_PORT:-23456}
    [[ -n $nnodes ]] || fail "PyTorchJob: neither PET_NNODES nor WORLD_SIZE is set"
    [[ -n $master_addr ]] || fail "PyTorchJob: MASTER_ADDR is not set"
    [[ $nnodes =~ ^[0-9]+$ ]] ||
        fail "PyTorchJob: elastic node counts (PET_NNODES=$nnodes) are not supported: remove elasticPolicy"
    if [[ -z ${GAPM_PROCS_PER_NODE:-} && ${PET_NPROC_PER_NODE:-} =~ ^[0-9]+$ ]]; then
        export GAPM_PROCS_PER_NODE=$PET_NPROC_PER_NODE
    fi
else
    node_rank=0
    nnodes=1
    master_addr=127.0.0.1
    master_port=29500
fi

export GAPM_NNODES=${GAPM_NNODES:-$nnodes}
export GAPM_NODE_RANK=${GAPM_NODE_RANK:-$node_rank}
export GAPM_MASTER_ADDR=${GAPM_MASTER_ADDR:-$master_addr}
export GAPM_MASTER_PORT=${GAPM_MASTER_PORT:-$master_port}
export GAPM_RDZV_BACKEND=${GAPM_RDZV_BACKEND:-static}

exec "$here/../start_node.sh" "$@"

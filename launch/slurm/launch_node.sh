#!/usr/bin/env bash
# One Slurm task per node (`srun --ntasks-per-node=1`, see train.sbatch): turns the Slurm
# variables of this task into launch/start_node.sh's and execs it with the `gapm train`
# arguments. Runs outside Slurm too, given the variables (that is how tests run it):
#
#   SLURM_NNODES, SLURM_NODEID      number of nodes, this node's index (0 = first host)
#   SLURM_JOB_NODELIST              the job's hosts; the first one (node 0) hosts the
#                                   rendezvous. Its name comes from `scontrol show hostnames`,
#                                   or, when scontrol cannot answer, from the list itself
#                                   ("gpu[07-09,12]" -> gpu07), else SLURM_LAUNCH_NODE_IPADDR,
#                                   else `hostname`; then its NodeAddr (`scontrol show node`),
#                                   the address Slurm itself reaches it at, which is what works
#                                   where node names are not in DNS or several emulated nodes
#                                   share a host (NodeAddr=127.0.0.1)
#   SLURM_JOB_ID                    picks the rendezvous port 20000 + JOB_ID % 10000, so that
#                                   jobs sharing a node do not collide (GAPM_MASTER_PORT overrides)
#   SLURM_GPUS_ON_NODE              processes on this node (GAPM_PROCS_PER_NODE overrides)
#
# The rendezvous is static: node rank = SLURM_NODEID, node 0 listens, the others connect and
# wait for it, so the order in which srun starts the tasks does not matter.
# GAPM_MASTER_ADDR overrides the rendezvous host (e.g. a high-speed-network hostname) and
# GAPM_RDZV_BACKEND the rendezvous; GAPM_CPU=1 trains on CPU with one process per node.
# Everything else is documented in launch/start_node.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

fail() {
    echo "launch_node.sh: error: $*" >&2
    exit 2
}

[[ -n ${SLURM_NNODES:-} ]] || fail "SLURM_NNODES is not set: run this under srun (see launch/slurm/train.sbatch)"
[[ -n ${SLURM_NODEID:-} ]] || fail "SLURM_NODEID is not set: run this under srun (see launch/slurm/train.sbatch)"

first_host() {
    local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}} hosts="" first=""
    if [[ -n $nodelist ]] && command -v scontrol >/dev/null 2>&1; then
        hosts=$(scontrol show hostnames "$nodelist" 2>/dev/null) || hosts=""
        first=${hosts%%$'\n'*}
    fi
    if [[ -z $first && -n $nodelist ]]; then
        first=${nodelist%%,*}  # "a1,b2" -> a1; "gpu[07-09,12],x" -> gpu[07-09
        if [[ $first == *\[* ]]; then
            local prefix=${first%%\[*} range=${first#*\[}
            first=$prefix${range%%[-,\]]*}
        fi
    fi
    if [[ -z $first ]]; then
        first=${SLURM_LAUNCH_NODE_IPADDR:-$(hostname)}
    fi
    echo "$first"
}

node_address() {  # NAME -> the node's NodeAddr when Slurm knows the node, else NAME
    local info=""
    if command -v scontrol >/dev/null 2>&1; then
        info=$(scontrol show node --oneliner "$1" 2>/dev/null) || info=""
    fi
    if [[ $info =~ (^|[[:space:]])NodeAddr=([^[:space:]]+) ]]; then
        echo "${BASH_REMATCH[2]}"
    else
        echo "$1"
    fi
}

export GAPM_NNODES=$SLURM_NNODES
export GAPM_NODE_RANK=$SLURM_NODEID
export GAPM_MASTER_ADDR=${GAPM_MASTER_ADDR:-$(node_address "$(first_host)")}
export GAPM_MASTER_PORT=${GAPM_MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 10000))}
export GAPM_RDZV_BACKEND=${GAPM_RDZV_BACKEND:-static}
if [[ -z ${GAPM_PROCS_PER_NODE:-} && ${GAPM_CPU:-0} != 1 && -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    export GAPM_PROCS_PER_NODE=$SLURM_GPUS_ON_NODE
fi

exec "$here/../start_node.sh" "$@"

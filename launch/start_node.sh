#!/usr/bin/env bash
# Starts GAPM training on one node of a (multi-)node job: one `accelerate launch` agent that
# runs this node's processes and meets the other nodes' agents at GAPM_MASTER_ADDR:PORT.
# The scheduler wrappers (slurm/launch_node.sh, k8s/entrypoint.sh) translate what their
# scheduler provides into the variables below and exec this script with the arguments of
# `gapm train` (e.g. --config FILE --set key=value). `--resume auto` is always appended:
# whenever a node is (re)started it continues from the run's latest complete checkpoint.
#
#   GAPM_NNODES, GAPM_NODE_RANK         number of nodes, index of this node (0 hosts the rendezvous)
#   GAPM_MASTER_ADDR, GAPM_MASTER_PORT  rendezvous address of node 0, reachable from every node
#   GAPM_PROCS_PER_NODE   training processes on this node (default: the visible GPUs; 1 with GAPM_CPU=1)
#   GAPM_CPU=1            train on CPU over gloo (ACCELERATE_USE_CPU=1): tests, machines without GPUs
#   GAPM_RDZV_BACKEND     static (default: node rank = GAPM_NODE_RANK) or c10d (ranks on arrival)
#   GAPM_RDZV_TIMEOUT     seconds a node waits for the others to arrive (default 900)
#
# Only node 0 ever listens on GAPM_MASTER_PORT; every other node connects to it as a client
# and keeps retrying until node 0 is up. So the nodes may start in any order, and several
# "nodes" may share one host (the same address and port for all; see README, local
# multi-node runs). With static that is torchrun's own rule (rank 0 hosts the store); with
# c10d, torchrun would let whichever node starts first on node 0's host take the port (every
# node on a shared host "matches" 127.0.0.1), after which node 0's accelerate refuses to start
# (port in use), so is_host is passed explicitly.
#   GAPM_ACCELERATE_CONFIG  accelerate config file (default: launch/accelerate/multi_node.yaml)
#   GAPM_PYTHON           interpreter with gapm installed (default: the active virtualenv's, else the
#                         checkout's .venv/bin/python, else python3; see launch/gapm_python.sh)
#   GAPM_DRY_RUN=1        print the launch command (shell-quoted, one line) instead of running it
#
#   GAPM_EXIT_RESUMABLE   the status this script exits with for "resumable" (default 75); for
#                         schedulers that only restart other codes (the Kubeflow PyTorchJob's
#                         restartPolicy ExitCode restarts 128-255 only: pytorchjob.yaml sets 203)
#
# The launcher is `gapm launch` (pipeline/launcher.py): accelerate launch, but it exits with
# gapm's codes — 2 if a training process exited 2 (bad input, never retry), else 75 if one
# exited 75 (resumable: checkpointed and stopped), else the failure's code — and says why in
# one line instead of torch's ChildFailedError traceback. This script exits with that status.
#
# Stopping: SIGTERM, SIGUSR1 and SIGINT sent to this script are passed on to the training
# processes as SIGTERM/SIGUSR1 (SIGINT as SIGTERM): they write a checkpoint and exit 75. Before
# they exist (rendezvous), the launcher gets SIGTERM and ends the start with 75 at once. The
# launcher itself is started with SIGUSR1 ignored, so a signal sent to the whole process tree
# (Slurm signals every process of a step) cannot kill it or, inherited, a training process that
# has not installed its handler yet.
set -euo pipefail

readonly EXIT_RESUMABLE=75
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

fail() {
    echo "start_node.sh: error: $*" >&2
    exit 2
}

require_int() {  # NAME VALUE MIN
    if ! [[ $2 =~ ^[0-9]+$ ]] || (($2 < $3)); then
        fail "$1 must be an integer >= $3, got '$2'"
    fi
}

nnodes=${GAPM_NNODES:-1}
node_rank=${GAPM_NODE_RANK:-0}
master_addr=${GAPM_MASTER_ADDR:-127.0.0.1}
master_port=${GAPM_MASTER_PORT:-29500}
config=${GAPM_ACCELERATE_CONFIG:-$here/accelerate/multi_node.yaml}
rdzv_backend=${GAPM_RDZV_BACKEND:-static}
rdzv_timeout=${GAPM_RDZV_TIMEOUT:-900}

require_int GAPM_NNODES "$nnodes" 1
require_int GAPM_NODE_RANK "$node_rank" 0
((node_rank < nnodes)) || fail "GAPM_NODE_RANK ($node_rank) must be below GAPM_NNODES ($nnodes)"
require_int GAPM_MASTER_PORT "$master_port" 1
[[ $rdzv_backend == static || $rdzv_backend == c10d ]] ||
    fail "GAPM_RDZV_BACKEND must be 'static' or 'c10d', got '$rdzv_backend'"
require_int GAPM_RDZV_TIMEOUT "$rdzv_timeout" 1
exit_resumable=${GAPM_EXIT_RESUMABLE:-$EXIT_RESUMABLE}
require_int GAPM_EXIT_RESUMABLE "$exit_resumable" 1
((exit_resumable <= 255)) || fail "GAPM_EXIT_RESUMABLE must be an exit status 1-255, got '$exit_resumable'"
[[ -f $config ]] || fail "accelerate config '$config' not found (GAPM_ACCELERATE_CONFIG)"
python=$("$here/gapm_python.sh")  # exits 2 with its reason when no interpreter has gapm

if [[ ${GAPM_CPU:-0} == 1 ]]; then
    export ACCELERATE_USE_CPU=1
    procs=${GAPM_PROCS_PER_NODE:-1}
elif [[ -n ${GAPM_PROCS_PER_NODE:-} ]]; then
    procs=$GAPM_PROCS_PER_NODE
else
    # torch counts the GPUs this process may use (CUDA_VISIBLE_DEVICES, cgroup limits).
    procs=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null) || procs=0
    ((procs > 0)) || fail "no GPU visible on $(hostname); set GAPM_PROCS_PER_NODE, or GAPM_CPU=1 to train on CPU"
fi
require_int GAPM_PROCS_PER_NODE "$procs" 1

# The scheduler's node-level variables would mislead the launcher (torchrun reads PET_* as
# defaults for its options) and the workers; the launcher sets the per-process ones itself.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK NODE_RANK MASTER_ADDR MASTER_PORT
for name in "${!PET_@}"; do
    unset "$name"
done

if [[ $rdzv_backend == static ]]; then
    rdzv_conf="timeout=$rdzv_timeout"
else  # read_timeout also bounds how long a client retries connecting to node 0's store
    rdzv_conf="is_host=$((node_rank == 0 ? 1 : 0)),join_timeout=$rdzv_timeout,read_timeout=$rdzv_timeout"
fi

command=(
    "$python" -m pipeline.launcher
    --config_file "$config"
    --num_machines "$nnodes" --machine_rank "$node_rank"
    --num_processes "$((nnodes * procs))"
    --main_process_ip "$master_addr" --main_process_port "$master_port"
    --rdzv_backend "$rdzv_backend" --rdzv_conf "$rdzv_conf"
    --max_restarts 0
    -m pipeline.cli train "$@" --resume auto
)

if [[ ${GAPM_DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi

echo "start_node.sh: node $node_rank of $nnodes on $(hostname), $procs process(es)," \
    "rendezvous $rdzv_backend at $master_addr:$master_port" >&2

# shellcheck disable=SC2317  # called from the traps below
launcher_children() {  # the training processes are the launcher's direct children
    local pid=$1
    if compgen -G "/proc/$pid/task/*/children" >/dev/null; then
        cat /proc/"$pid"/task/*/children 2>/dev/null || true
    else
        pgrep -P "$pid" || true
    fi
}

stop_signal=""
interrupted=0
# shellcheck disable=SC2317  # called from the traps below
forward() {  # SIGNAL_RECEIVED SIGNAL_TO_SEND
    stop_signal=$1
    interrupted=1
    local workers
    read -r -d '' -a workers < <(launcher_children "$launcher") || true
    if ((${#workers[@]})); then
        echo "start_node.sh: received SIG$1: asking the training processes (${workers[*]}) to checkpoint and stop" >&2
        kill -s "$2" "${workers[@]}" 2>/dev/null || true
    else
        # Before they start, the launcher stops the start with 75; after they have exited, it
        # keeps their codes and ignores the signal (pipeline/launcher.py).
        echo "start_node.sh: received SIG$1 with no training process running: passing it to the launcher" >&2
        kill -s TERM "$launcher" 2>/dev/null || true
    fi
}

trap '' USR1 # inherited by the launcher as "ignore"; gapm installs its own handler
"${command[@]}" &
launcher=$!
trap 'forward USR1 USR1' USR1
trap 'forward TERM TERM' TERM
trap 'forward INT TERM' INT

status=0
while :; do
    interrupted=0
    wait "$launcher" && status=0 || status=$?
    # A trapped signal ends `wait` early (status 128+n) while the launcher still runs: wait
    # again (bash remembers the status of a launcher that has exited meanwhile).
    ((interrupted)) || break
done

if [[ -n $stop_signal ]] && ((status == 128 + $(kill -l TERM))); then
    # SIGTERM ended the launcher before it could pass it on: no training process had started.
    echo "start_node.sh: stopped by SIG$stop_signal before training started, nothing to save" >&2
    status=$EXIT_RESUMABLE
fi
if ((status == EXIT_RESUMABLE)); then
    echo "start_node.sh: node $node_rank of $nnodes exits $exit_resumable (resumable): relaunch to continue" \
        "from the latest checkpoint" >&2
    exit "$exit_resumable"
fi
echo "start_node.sh: node $node_rank of $nnodes exits $status" >&2
exit "$status"

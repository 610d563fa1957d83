#!/usr/bin/env bash
# One element of an experiment matrix (pipeline/matrix.py): `gapm matrix element MATRIX --index I`,
# i.e. `gapm train --resume auto` and then `gapm eval` of element I, skipped where done. The
# index comes from the scheduler:
#
#   GAPM_MATRIX_INDEX        explicit (wins)
#   SLURM_ARRAY_TASK_ID      a Slurm job array task (launch/slurm/matrix.sbatch)
#   JOB_COMPLETION_INDEX     a pod of a Kubernetes Indexed Job (launch/k8s/matrix-indexed-job.yaml)
#
#   launch/matrix_element.sh configs/matrices/fashion-mnist-table1.yaml
#
# Runs from the directory the matrix's paths are relative to (the repository root, /opt/gapm in
# the image), with the interpreter launch/gapm_python.sh finds. gapm replaces this shell, so
# signals reach it directly (in a pod it is PID 1): SIGTERM or SIGUSR1 make the training
# checkpoint and the element exit 75 ("resumable": start it again); 2 is bad input.
#   GAPM_DRY_RUN=1    print the command (shell-quoted, one line) instead of running it
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

fail() {
    echo "matrix_element.sh: error: $*" >&2
    exit 2
}

(($# == 1)) || fail "usage: launch/matrix_element.sh MATRIX_FILE (the element index comes from the environment)"
matrix=$1
index=${GAPM_MATRIX_INDEX:-${SLURM_ARRAY_TASK_ID:-${JOB_COMPLETION_INDEX:-}}}
[[ -n $index ]] || fail "no element index: run this as a Slurm array task (SLURM_ARRAY_TASK_ID), as a pod of" \
    "an Indexed Job (JOB_COMPLETION_INDEX), or set GAPM_MATRIX_INDEX"
[[ $index =~ ^[0-9]+$ ]] || fail "the element index must be a number >= 0, got '$index'"
python=$("$here/gapm_python.sh")  # exits 2 with its reason when no interpreter has gapm

command=("$python" -m pipeline.cli matrix element "$matrix" --index "$index")
if [[ ${GAPM_DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
exec "${command[@]}"

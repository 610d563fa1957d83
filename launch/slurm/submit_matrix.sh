#!/usr/bin/env bash
# Submits an experiment matrix to Slurm: the job array of its elements (launch/slurm/matrix.sbatch,
# --array=0-(N-1) with N from `gapm matrix list`) and, after it, the report job
# (launch/slurm/matrix_report.sbatch, --dependency=afterany:ARRAYID). Prints the two job ids,
# "ARRAYID REPORTID", on stdout.
#
#   launch/slurm/submit_matrix.sh MATRIX_FILE [sbatch options ...]
#   launch/slurm/submit_matrix.sh configs/matrices/fashion-mnist-table1.yaml --partition=gpu --time=12:00:00
#   launch/slurm/submit_matrix.sh configs/matrices/fashion-mnist-table1.yaml --array=3,7   # just these again
#   launch/slurm/submit_matrix.sh configs/matrices/fashion-mnist-table1.yaml --array=0-20%4  # 4 at a time
#
# The sbatch options (in --name=value form) go to both jobs, except --array, which replaces the
# computed one. Run from the repository root; gapm runs with the interpreter
# launch/gapm_python.sh finds. The element count is checked here, so a typo in the matrix file
# fails now (status 2) rather than in every task.
set -euo pipefail

fail() {
    echo "submit_matrix.sh: error: $*" >&2
    exit 2
}

(($# >= 1)) || fail "usage: launch/slurm/submit_matrix.sh MATRIX_FILE [sbatch options ...]"
matrix=$1
shift
cd "${GAPM_HOME:-$PWD}"
[[ -f launch/slurm/matrix.sbatch ]] || fail "run this from the repository root (or set GAPM_HOME): the jobs start there"
[[ -f $matrix ]] || fail "matrix file '$matrix' not found in $PWD"
python=$(launch/gapm_python.sh)  # exits 2 with its reason when no interpreter has gapm

array=""
options=()
for option in "$@"; do
    case $option in
        --array=*) array=${option#--array=} ;;
        -*) options+=("$option") ;;
        *) fail "sbatch options go in --name=value form, got '$option'" ;;
    esac
done

listing=$("$python" -m pipeline.cli matrix list "$matrix") || exit $?  # gapm said why
count=$(grep -c . <<<"$listing" || true)
((count > 0)) || fail "$matrix has no elements"
array=${array:-0-$((count - 1))}

array_job=$(sbatch --parsable --array="$array" "${options[@]}" launch/slurm/matrix.sbatch "$matrix")
array_job=${array_job%%;*}
report_job=$(sbatch --parsable --dependency="afterany:$array_job" "${options[@]}" launch/slurm/matrix_report.sbatch "$matrix")
report_job=${report_job%%;*}
echo "submit_matrix.sh: $matrix: $count element(s); array job $array_job (--array=$array)," \
    "report job $report_job after it (afterany); logs in launch/slurm/logs/" >&2
echo "$array_job $report_job"

#!/usr/bin/env bash
# The report of an experiment matrix once its elements have run (a Slurm job array, an Indexed
# Job): `gapm matrix report MATRIX [--out DIR] [--metrics KEYS]`, which tables whatever has
# finished (mean ± std over the seeds that finished), then `gapm matrix list MATRIX` to name the
# elements that did not finish. Exit status: the report's if it failed, else 1 when an element is
# unfinished (the report is written all the same; its rows then have fewer seeds), else 0.
#
#   launch/matrix_report.sh configs/matrices/fashion-mnist-table1.yaml
#
# Used by launch/slurm/matrix_report.sbatch and launch/k8s/matrix-report-job.yaml; runs from the
# directory the matrix's paths are relative to, with the interpreter launch/gapm_python.sh finds.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if (($# < 1)); then
    echo "matrix_report.sh: error: usage: launch/matrix_report.sh MATRIX_FILE [gapm matrix report options]" >&2
    exit 2
fi
matrix=$1
python=$("$here/gapm_python.sh")  # exits 2 with its reason when no interpreter has gapm

status=0
"$python" -m pipeline.cli matrix report "$@" || status=$?
((status == 0)) || exit "$status"

listing=$("$python" -m pipeline.cli matrix list "$matrix") || exit $?
# `gapm matrix list`: "INDEX  STATE  NAME" per element; done = evaluated (or trained, for a
# matrix without evaluation, which list also calls evaluated).
unfinished=$(awk '$2 != "evaluated" { printf "%s%s (%s)", sep, $1, $2; sep = ", " }' <<<"$listing")
if [[ -n $unfinished ]]; then
    indices=$(awk '$2 != "evaluated" { printf "%s%s", sep, $1; sep = "," }' <<<"$listing")
    echo "matrix_report.sh: not finished: element(s) $unfinished; the report shows the rest. Their logs say" \
        "why; run them again (Slurm: launch/slurm/submit_matrix.sh $matrix --array=$indices), then the report" >&2
    exit 1
fi
echo "matrix_report.sh: every element of $matrix finished" >&2

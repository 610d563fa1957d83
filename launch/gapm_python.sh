#!/usr/bin/env bash
# Prints the Python interpreter the launchers run gapm with, after checking that gapm and its
# dependencies are installed for it (else one line saying how to fix it, and exit 2):
#
#   1. GAPM_PYTHON, when set;
#   2. the active virtualenv's python (VIRTUAL_ENV, set by `source .venv/bin/activate`);
#   3. the checkout's own .venv/bin/python (what `make install` creates; in the image,
#      /opt/gapm/.venv, where the Dockerfile installs gapm);
#   4. python3 on PATH.
#
# start_node.sh, the Slurm scripts and the Kubernetes commands call it, so that a launcher
# started without activating anything still finds the venv of the checkout it belongs to.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ -n ${GAPM_PYTHON:-} ]]; then
    python=$GAPM_PYTHON
    origin="GAPM_PYTHON"
elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
    python=$VIRTUAL_ENV/bin/python
    origin="the active virtualenv (VIRTUAL_ENV)"
elif [[ -x $root/.venv/bin/python ]]; then
    python=$root/.venv/bin/python
    origin="the checkout's .venv"
else
    python=python3
    origin="python3 on PATH (no GAPM_PYTHON, no active virtualenv, no $root/.venv)"
fi

if ! command -v "$python" >/dev/null 2>&1; then
    echo "gapm_python.sh: error: $python (from $origin) is not an executable Python; set GAPM_PYTHON" \
        "to the interpreter with gapm installed, or run \`make install\` in $root" >&2
    exit 2
fi
# find_spec imports nothing: a second, not the seconds torch takes.
missing=$("$python" -c 'import importlib.util as u
print(" ".join(m for m in ("accelerate", "torch", "pipeline") if u.find_spec(m) is None))' 2>/dev/null) ||
    missing="(it does not run)"
if [[ -n $missing ]]; then
    echo "gapm_python.sh: error: $python (from $origin) lacks gapm's modules: $missing; run \`make install\`" \
        "in $root (it creates .venv, found without activation), activate gapm's environment, or set GAPM_PYTHON" >&2
    exit 2
fi
echo "$python"

#!/usr/bin/env bash
# Builds the repository's Dockerfile with this machine's pip settings, so that pip inside the
# build reaches the same package indexes (mirrors, local wheel folders, certificates, constraints)
# as pip here:
#
#   launch/docker/build_image.sh -t gapm:0.1.0                       # CUDA image (pytorch/pytorch base)
#   launch/docker/build_image.sh -t gapm:cpu --build-arg BASE_IMAGE=debian:bookworm-slim \
#       --build-arg TORCH_REQUIREMENT=torch==2.13.0+cpu --build-arg GAPM_EXTRAS=   # needs python3-venv in the base
#
# Every other argument goes to `<engine> build` as it is (-t, --build-arg, --isolation, --network ...).
#   - pip's settings (`python3 -m pip config list`: its config files and PIP_* variables) are
#     written to a private temporary pip.conf and passed as the build secret `pip.conf`: the
#     Dockerfile's install step reads it from /run/secrets, and it is in no layer and no file of
#     the repository. Passwords in index URLs stay out of the image too.
#   - podman: the local paths those settings name (file:// indexes, find-links folders,
#     constraint files, the CA bundle) are bind-mounted read-only at the same place for the
#     build (`--volume P:P:ro`). `docker build` cannot mount host paths: serve such indexes
#     over HTTP instead; a note lists what the build will not see.
#   - GAPM_GIT_COMMIT: `git rev-parse HEAD` (+ "-dirty" with uncommitted changes), unless given
#     as a --build-arg: the image has no .git, and every run records this as its git_commit.
#
#   GAPM_CONTAINER_ENGINE  podman or docker (default: podman if installed, else docker)
#   GAPM_BUILD_PYTHON      the Python whose pip settings are passed (default python3)
#   GAPM_DRY_RUN=1         print the pip.conf (to stderr) and the build command instead of building
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

fail() {
    echo "build_image.sh: error: $*" >&2
    exit 2
}

engine=${GAPM_CONTAINER_ENGINE:-}
if [[ -z $engine ]]; then
    if command -v podman >/dev/null 2>&1; then engine=podman; else engine=docker; fi
fi
[[ $engine == podman || $engine == docker ]] || fail "GAPM_CONTAINER_ENGINE must be podman or docker, got '$engine'"
if [[ ${GAPM_DRY_RUN:-0} != 1 ]] && ! command -v "$engine" >/dev/null 2>&1; then
    fail "$engine is not installed (apt-get install podman, or set GAPM_CONTAINER_ENGINE)"
fi
build_python=${GAPM_BUILD_PYTHON:-python3}
command -v "$build_python" >/dev/null 2>&1 || fail "no '$build_python' to read pip's settings with (GAPM_BUILD_PYTHON)"

work=$(mktemp -d "${TMPDIR:-/tmp}/gapm-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 700 "$work"

# pip.conf: one [global] section from every scope pip reports (a scope's later value wins:
# the PIP_* variables come last, as in pip itself); then the local paths the values name.
"$build_python" -m pip config list > "$work/settings" 2>/dev/null ||
    fail "'$build_python -m pip config list' failed: is pip installed for $build_python? (GAPM_BUILD_PYTHON)"
"$build_python" - "$work/settings" "$work/pip.conf" "$work/paths" <<'PYTHON'
import ast
import configparser
import os
import sys

settings, conf_path, paths_path = sys.argv[1:]
# pip's order of precedence: [global], then the command's section, then the PIP_* variables.
# (`pip config list` prints the sections sorted, not in that order.)
PRECEDENCE = {"global": 0, "download": 1, "wheel": 1, "install": 2, ":env:": 3}
found = []
for line in open(settings):
    name, sep, value = line.rstrip("\n").partition("=")
    if not sep or "." not in name:
        continue
    scope, key = name.rsplit(".", 1)
    if scope in PRECEDENCE and key != "config-file":  # PIP_CONFIG_FILE: what it names is listed already
        value = ast.literal_eval(value) if value[:1] in "'\"" else value
        found.append((PRECEDENCE[scope], key, " ".join(str(value).split())))
values = {key: value for _, key, value in sorted(found, key=lambda entry: entry[0])}
conf = configparser.RawConfigParser()
conf["global"] = values
with open(conf_path, "w") as handle:
    conf.write(handle)
paths = set()
for value in values.values():
    for token in value.split():
        path = token[len("file://"):] if token.startswith("file://") else token
        if not path.startswith("/"):
            continue
        path = os.path.normpath(path)
        if os.path.basename(path) == "simple":  # a PEP 503 index: its files lie beside simple/
            path = os.path.dirname(path)
        if os.path.exists(path):
            paths.add(path)
# Only the outermost of nested paths.
kept = [p for p in sorted(paths) if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]
with open(paths_path, "w") as handle:
    handle.writelines(p + "\n" for p in kept)
PYTHON
chmod 600 "$work/pip.conf"

options=()
mapfile -t paths < "$work/paths"
if ((${#paths[@]})); then
    if [[ $engine == podman ]]; then
        for path in "${paths[@]}"; do
            options+=(--volume "$path:$path:ro")
        done
    else
        echo "build_image.sh: note: docker build cannot mount ${paths[*]}: pip in the build will not see them" >&2
    fi
fi

if [[ " $* " != *" GAPM_GIT_COMMIT="* && " $* " != *"--build-arg=GAPM_GIT_COMMIT="* ]]; then
    commit=$(git -C "$root" rev-parse HEAD 2>/dev/null) || commit=""
    if [[ -n $commit && -n $(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        commit="$commit-dirty"
    fi
    [[ -z $commit ]] || options+=(--build-arg "GAPM_GIT_COMMIT=$commit")
fi
tagged=0
for argument in "$@"; do
    [[ $argument != -t && $argument != --tag && $argument != -t=* && $argument != --tag=* ]] || tagged=1
done
((tagged)) || options+=(--tag gapm:latest)

command=("$engine" build --secret "id=pip.conf,src=$work/pip.conf" "${options[@]}" "$@" --file "$root/Dockerfile" "$root")
if [[ $engine == docker ]]; then
    export DOCKER_BUILDKIT=1  # build secrets and cache mounts
fi
if [[ ${GAPM_DRY_RUN:-0} == 1 ]]; then
    cat "$work/pip.conf" >&2
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
"${command[@]}"

#!/usr/bin/env bash
# Create (once) the Python environment for this lock file and point ./.venv at it.
#
# The environment lives outside the clone, under $KUBETUNE_CACHE (default ~/.cache/kubetune),
# in a folder named after the hash of the lock files: torch from PyPI is the multi-GB CUDA
# build, so a fresh clone with the same lock reuses it instead of reinstalling. pip's own
# cache is kept too, so a changed lock installs from cached wheels. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
python=${PYTHON:-python3}
key=$( (cat requirements/lock.txt requirements/deepspeed.txt; "$python" -c 'import sys; print(sys.version)') \
       | sha256sum | cut -c1-16)
venv="$cache/venvs/$key"

if [ ! -f "$venv/.complete" ]; then
    echo "setup: creating Python environment $venv (first run: several minutes, torch is large)"
    start=$(date +%s)
    rm -rf "$venv"
    mkdir -p "$cache/venvs"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip==25.3
    # --no-deps: the lock is already the whole resolution; nothing may float.
    "$venv/bin/pip" install -q --no-deps -r requirements/lock.txt
    # deepspeed's setup.py imports torch, so it builds against the torch just installed.
    DS_BUILD_OPS=0 "$venv/bin/pip" install -q --no-deps --no-build-isolation -r requirements/deepspeed.txt
    "$venv/bin/pip" check
    touch "$venv/.complete"
    echo "setup: environment ready in $(( $(date +%s) - start )) s"
fi

ln -sfn "$venv" .venv
# The project itself: an editable install (no dependencies, no network) so the `kubetune`
# command exists. The Makefile also puts this clone's sources first on PYTHONPATH, so a
# shared environment always runs the clone that invoked it.
# Checked without PYTHONPATH (make exports it, which would hide a missing install); an install
# that points at a clone since deleted fails the import and is redone.
if [ ! -x .venv/bin/kubetune ] || ! env -u PYTHONPATH .venv/bin/python -c 'import kubetune_operator' 2>/dev/null; then
    .venv/bin/pip install -q --no-deps --no-build-isolation -e .
fi

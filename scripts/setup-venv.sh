#!/usr/bin/env bash
# This clone's Python environment, ./.venv, exactly as requirements/lock.txt says (hash-checked).
#
# uv installs from its cache under $KUBETUNE_CACHE/uv (default ~/.cache/kubetune/uv): the first
# run downloads the lock (torch is the multi-GB CUDA build), every later run or clone links the
# cached files in seconds. The environment belongs to this clone alone: the project is installed
# editable from here, so .venv/bin/kubetune always runs this clone's code. Idempotent: nothing is
# done while the lock files and the venv's Python are unchanged.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$repo"

uv=$(ensure_uv)
export UV_CACHE_DIR=${UV_CACHE_DIR:-$kubetune_cache/uv}
python=${PYTHON:-python3}
key=$( (cat requirements/lock.txt requirements/deepspeed.txt pyproject.toml; "$python" -c 'import sys; print(sys.version)'; pwd) \
       | sha256sum | cut -c1-16)
stamp=.venv/.kubetune-setup
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && [ -x .venv/bin/kubetune ]; then
    exit 0
fi

start=$(date +%s)
# An older clone layout linked .venv to a shared environment: replace the link, not its target.
[ -L .venv ] && rm .venv
if [ ! -x .venv/bin/python ]; then
    "$uv" venv --quiet --python "$python" .venv
fi
say "installing requirements/lock.txt into .venv (uv cache: $UV_CACHE_DIR)"
"$uv" pip sync --quiet --python .venv/bin/python --require-hashes requirements/lock.txt
# deepspeed's setup.py imports torch: built (once; uv caches the wheel) against the torch just installed.
DS_BUILD_OPS=0 "$uv" pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation \
    --require-hashes -r requirements/deepspeed.txt
"$uv" pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation -e .
"$uv" pip check --quiet --python .venv/bin/python
echo "$key" > "$stamp"
say "environment ready in $(elapsed "$start") s"

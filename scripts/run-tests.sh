#!/usr/bin/env bash
# The whole suite, every tier. A tier that cannot run here is reported as NOT RUN, loudly, by the
# test summary; it never turns into a silent pass.
set -uo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$repo" || exit 1

if [ -x scripts/k8s-build.sh ]; then
    if ! bash scripts/k8s-build.sh; then
        echo "!!! cluster tier: the Kubernetes binaries could not be built; its tests will report NOT RUN" >&2
    fi
fi

# The e2e tier needs a Docker engine and kubetune's images. Where this machine can run an engine
# (one answers already, or we are root and can install and start one) the images are built (cached:
# unchanged images are not rebuilt) and the tier runs; elsewhere it is reported as NOT RUN. A failed
# image build fails the run, after the other tiers have run.
# Its kind part (tests/e2e/test_kind.py) runs on the cluster `make kind-up` brings up with those
# images and the chart (a healthy one is reused); where that cannot happen the reason is passed to
# the tests, which report NOT RUN with it, and a failed kind-up fails the run too.
images_failed=0
kind_failed=0
if bash scripts/docker-engine.sh; then
    if bash scripts/images.sh; then
        export KUBETUNE_E2E=1
        if bash scripts/kind.sh up; then
            export KUBETUNE_E2E_KIND=1 KUBETUNE_E2E_KUBECONFIG="$repo/.cache/kind/kubeconfig"
        else
            kind_failed=1
            export KUBETUNE_E2E_KIND=1 KUBETUNE_E2E_KIND_PROBLEM="make kind-up failed on this machine (see its output above)"
            echo "!!! e2e kind tier: make kind-up failed (see above); its tests will report NOT RUN" >&2
        fi
    else
        images_failed=1
        echo "!!! e2e tier: building the images failed (see above); its tests will report NOT RUN" >&2
    fi
else
    echo "!!! e2e tier: no Docker engine on this machine; its tests (kind included) will report NOT RUN" >&2
    export KUBETUNE_E2E_KIND=1 KUBETUNE_E2E_KIND_PROBLEM="no Docker engine on this machine, so no kind cluster"
fi

.venv/bin/python -m pytest tests --durations=15 "$@"   # the slowest tests, to keep the suite fast
status=$?
[ "$status" -eq 0 ] && { [ "$images_failed" -eq 1 ] || [ "$kind_failed" -eq 1 ]; } && status=1
# pytest exits 5 when nothing was collected: that is a broken suite, not a pass.
[ "$status" -eq 5 ] && echo "!!! no tests were collected" >&2
exit "$status"

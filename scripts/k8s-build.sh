#!/usr/bin/env bash
# Build the binaries of the local Kubernetes test control plane (tests/cluster/) from source,
# through the Go module proxy only, at the versions pinned in scripts/k8s-versions.env:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, kwokctl, helm,
#   kind (kwokctl starts the others as a cluster: tests/cluster/harness.py).
#
# They are built into ${KUBETUNE_K8S_BIN:-${KUBETUNE_CACHE:-~/.cache/kubetune}/k8s/<K8S_VERSION>/bin},
# outside the clone, and .cache/k8s/<K8S_VERSION>/bin in the clone is a symlink to it, so fresh
# clones (CI) reuse them. GOPATH/GOMODCACHE/GOCACHE stay at Go's defaults for the same reason.
#
# Idempotent: each binary has a stamp holding the version it was built at; a run with every
# binary present at its pinned version builds nothing (well under a second). Cold: ~13 min on
# 2 cores (kube-apiserver alone ~8). A module the proxy refuses is named and the script exits 1.
#
# Usage: bash scripts/k8s-build.sh [--print-bin]     (--print-bin: print the bin dir and exit)
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
k8s_versions
bin=$k8s_bin
link=$repo/.cache/k8s/$K8S_VERSION/bin

if [ "${1:-}" = "--print-bin" ]; then
    echo "$bin"
    exit 0
fi

# name -> version it must be built at (the stamp content).
declare -A want=(
    [etcd]="etcd $ETCD_VERSION"
    [kube-apiserver]="kubernetes $K8S_VERSION"
    [kube-controller-manager]="kubernetes $K8S_VERSION"
    [kube-scheduler]="kubernetes $K8S_VERSION"
    [kubectl]="kubernetes $K8S_VERSION"
    [kwok]="kwok $KWOK_VERSION"
    [kwokctl]="kwok $KWOK_VERSION"
    [helm]="helm $HELM_VERSION"
    [kind]="kind $KIND_VERSION"
)
need() { # need NAME...: true if any NAME is missing or at another version (re-checked after the lock)
    local n
    for n in "$@"; do stamped "$bin" "$n" "${want[$n]}" || return 0; done
    return 1
}

make_link() {
    case "$bin" in "$repo"/.cache/k8s/"$K8S_VERSION"/bin) return 0 ;; esac
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$bin" ]; then return 0; fi
    mkdir -p "$(dirname "$link")"
    if [ -e "$link" ] && [ ! -L "$link" ]; then
        warn "$link exists and is not a symlink; leaving it (binaries are in $bin)"
        return 0
    fi
    ln -sfn "$bin" "$link"
}

missing=()
for name in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok kwokctl helm kind; do
    if need "$name"; then missing+=("$name"); fi
done
if [ ${#missing[@]} -eq 0 ]; then
    make_link
    say "all binaries present in $bin (Kubernetes $K8S_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION, helm $HELM_VERSION, kind $KIND_VERSION)"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Something to build.
ensure_go
src=$kubetune_cache/k8s/src
step_logs=$kubetune_cache/k8s/logs
mkdir -p "$bin/.stamp" "$src"
# Two clones building at once share the cache dir: serialize.
exec 9>"$kubetune_cache/k8s/.build.lock"
if ! flock -n 9; then
    say "another build holds $kubetune_cache/k8s/.build.lock; waiting"
    flock 9
fi
t_all=$(date +%s)
say "building into $bin: ${missing[*]} ($(go version), -p $go_jobs)"

install_bins() { # install_bins OUTDIR NAME...: move built binaries in and stamp them
    local out=$1 n
    shift
    for n in "$@"; do
        mv -f "$out/$n" "$bin/$n"
        stamp "$bin" "$n" "${want[$n]}"
    done
    rm -rf "$out"
}

go_install() { # go_install NAME MODULE/CMD@VERSION [LDFLAGS]: one command of a module that installs as is
    local name=$1 pkg=$2 path out
    path=${pkg%@*}
    check_module "${path%%/cmd/*}@${pkg##*@}"
    out=$(mktemp -d "$bin/.out.XXXXXX")
    run_step "$name" env GOBIN="$out" go install -p "$go_jobs" -trimpath -ldflags "-s -w ${3:-}" "$pkg"
    install_bins "$out" "$name"
}

if need etcd; then
    out=$(mktemp -d "$bin/.out.XXXXXX")
    go_build_etcd etcd "$src/etcd-$ETCD_VERSION" "$ETCD_VERSION" "$out/etcd"
    install_bins "$out" etcd
fi
kwok_ldflags="-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v} -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${K8S_VERSION#v}"
if need kwok; then
    go_install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "$kwok_ldflags"
fi
if need kwokctl; then # the same module as kwok; the harness hands it every binary (no downloads)
    go_install kwokctl "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION" "$kwok_ldflags"
fi
if need kube-apiserver kube-controller-manager kube-scheduler kubectl; then
    out=$(mktemp -d "$bin/.out.XXXXXX")
    go_build_kubernetes kubernetes "$src/kubernetes-$K8S_VERSION" "$out" \
        kube-apiserver kube-controller-manager kube-scheduler kubectl
    install_bins "$out" kube-apiserver kube-controller-manager kube-scheduler kubectl
fi
if need helm; then
    go_install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
        "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
fi
if need kind; then
    go_install kind "sigs.k8s.io/kind@$KIND_VERSION"
fi

make_link
say "done in $(elapsed "$t_all") s; binaries in $bin (linked from .cache/k8s/$K8S_VERSION/bin)"

#!/usr/bin/env bash
# Build the binaries of the local Kubernetes test control plane (tests/cluster/) from source,
# through the Go module proxy only, at the versions pinned in scripts/k8s-versions.env:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, helm, kind.
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

repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=k8s-versions.env
. "$repo/scripts/k8s-versions.env"

cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
bin=${KUBETUNE_K8S_BIN:-$cache/k8s/$K8S_VERSION/bin}
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
    [helm]="helm $HELM_VERSION"
    [kind]="kind $KIND_VERSION"
)

have() { # have NAME: binary present and built at the pinned version
    [ -x "$bin/$1" ] && [ -f "$bin/.stamp/$1" ] && [ "$(<"$bin/.stamp/$1")" = "${want[$1]}" ]
}

make_link() {
    case "$bin" in "$repo"/.cache/k8s/"$K8S_VERSION"/bin) return 0 ;; esac
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$bin" ]; then return 0; fi
    mkdir -p "$(dirname "$link")"
    if [ -e "$link" ] && [ ! -L "$link" ]; then
        echo "k8s-build: $link exists and is not a symlink; leaving it (binaries are in $bin)" >&2
        return 0
    fi
    ln -sfn "$bin" "$link"
}

missing=()
for name in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm kind; do
    have "$name" || missing+=("$name")
done
if [ ${#missing[@]} -eq 0 ]; then
    make_link
    echo "k8s-build: all binaries present in $bin (Kubernetes $K8S_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION, helm $HELM_VERSION, kind $KIND_VERSION)"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Something to build.
if ! command -v go >/dev/null 2>&1; then
    if [ -x /usr/local/go/bin/go ]; then
        export PATH="/usr/local/go/bin:$PATH"
    else
        echo "k8s-build: 'go' not found (need Go >= 1.24 on PATH) to build: ${missing[*]}" >&2
        exit 1
    fi
fi

mkdir -p "$bin/.stamp" "$cache/k8s/src" "$cache/k8s/logs"
logs=$cache/k8s/logs
# Two clones building at once share the cache dir: serialize.
exec 9>"$cache/k8s/.build.lock"
if ! flock -n 9; then
    echo "k8s-build: another build holds $cache/k8s/.build.lock; waiting"
    flock 9
fi

jobs=${KUBETUNE_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -buildvcs=false"
t_all=$(date +%s)
echo "k8s-build: building into $bin: ${missing[*]} ($(go version), -p $jobs)"

need() { # need NAME...: true if any NAME is missing (re-checked after the lock)
    local n
    for n in "$@"; do have "$n" || return 0; done
    return 1
}

check_module() { # check_module MODULE@VERSION: is the proxy serving it?
    local out
    if ! out=$(go mod download -json "$1" 2>&1); then
        echo "k8s-build: the Go module proxy refused $1:" >&2
        echo "$out" | grep -E '"Error"|proxy|410|404|not found|unknown revision' >&2 || echo "$out" >&2
        exit 1
    fi
}

run_step() { # run_step STEP COMMAND...: run with a log; on failure name refused modules
    local step=$1 t0 rc=0
    shift
    t0=$(date +%s)
    echo "k8s-build: [$step] started $(date +%T) (log: $logs/$step.log)"
    nice -n 10 "$@" >"$logs/$step.log" 2>&1 || rc=$?
    if [ $rc -ne 0 ]; then
        echo "k8s-build: [$step] FAILED (exit $rc) after $(( $(date +%s) - t0 )) s" >&2
        local refused
        refused=$(grep -oE '[a-zA-Z0-9._~/-]+@v[0-9][^: ]*: .*(reading https?://|verifying|invalid version|unknown revision|not found|module lookup disabled|40[34] |410 Gone).*' \
                  "$logs/$step.log" | sort -u || true)
        if [ -n "$refused" ]; then
            echo "k8s-build: module(s) the Go module proxy refused:" >&2
            echo "$refused" | sed 's/^/  /' >&2
        fi
        tail -n 30 "$logs/$step.log" >&2
        exit 1
    fi
    echo "k8s-build: [$step] done in $(( $(date +%s) - t0 )) s"
}

install_bins() { # install_bins OUTDIR NAME...: move built binaries in and stamp them
    local out=$1 n
    shift
    for n in "$@"; do
        mv -f "$out/$n" "$bin/$n"
        printf '%s' "${want[$n]}" >"$bin/.stamp/$n"
    done
    rm -rf "$out"
}

# --- etcd: wrapper module over go.etcd.io/etcd/server/v3 (its go.mod replaces its siblings
# with ../ paths, so it cannot be `go install`ed) ------------------------------------------------
if need etcd; then
    check_module "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    w=$cache/k8s/src/etcd-$ETCD_VERSION
    mkdir -p "$w"
    cat >"$w/go.mod" <<EOF
module kubetune.local/etcd-build

go 1.23

require (
	go.etcd.io/etcd/server/v3 $ETCD_VERSION
	go.etcd.io/etcd/api/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/pkg/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/v3 $ETCD_VERSION
	go.etcd.io/etcd/pkg/v3 $ETCD_VERSION
	go.etcd.io/etcd/raft/v3 $ETCD_VERSION
)
EOF
    cat >"$w/main.go" <<'EOF'
// Generated by scripts/k8s-build.sh: the etcd binary (same as etcd's own root main.go).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
    out=$(mktemp -d "$bin/.out.XXXXXX")
    run_step etcd bash -c "cd '$w' && go build -mod=mod -p $jobs -trimpath -o '$out/etcd' \
        -ldflags '-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION' ."
    install_bins "$out" etcd
fi

# --- kwok -------------------------------------------------------------------------------------
if need kwok; then
    check_module "sigs.k8s.io/kwok@$KWOK_VERSION"
    out=$(mktemp -d "$bin/.out.XXXXXX")
    run_step kwok env GOBIN="$out" go install -p "$jobs" -trimpath \
        -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v} -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${K8S_VERSION#v}" \
        "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
    install_bins "$out" kwok
fi

# --- Kubernetes: wrapper module over k8s.io/kubernetes with every ./staging replace turned into
# the published k8s.io/* module at K8S_STAGING_VERSION; all four commands in one go build -------
if need kube-apiserver kube-controller-manager kube-scheduler kubectl; then
    check_module "k8s.io/kubernetes@$K8S_VERSION"
    kmod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
    staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$kmod")
    if [ -z "$staging" ]; then
        echo "k8s-build: found no ./staging replace directives in $kmod" >&2
        exit 1
    fi
    w=$cache/k8s/src/kubernetes-$K8S_VERSION
    mkdir -p "$w"
    {
        printf 'module kubetune.local/kubernetes-build\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$K8S_VERSION"
        for m in $staging; do printf '\t%s => %s %s\n' "$m" "$m" "$K8S_STAGING_VERSION"; done
        printf ')\n'
    } >"$w/go.mod"
    minor=${K8S_VERSION#v1.}
    minor=${minor%%.*}
    ld="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    done
    out=$(mktemp -d "$bin/.out.XXXXXX")
    run_step kubernetes bash -c "cd '$w' && go build -mod=mod -p $jobs -trimpath -o '$out/' -ldflags '$ld' \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl"
    install_bins "$out" kube-apiserver kube-controller-manager kube-scheduler kubectl
fi

# --- helm ---------------------------------------------------------------------------------------
if need helm; then
    check_module "helm.sh/helm/v3@$HELM_VERSION"
    out=$(mktemp -d "$bin/.out.XXXXXX")
    run_step helm env GOBIN="$out" go install -p "$jobs" -trimpath \
        -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
        "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    install_bins "$out" helm
fi

# --- kind ---------------------------------------------------------------------------------------
if need kind; then
    check_module "sigs.k8s.io/kind@$KIND_VERSION"
    out=$(mktemp -d "$bin/.out.XXXXXX")
    run_step kind env GOBIN="$out" go install -p "$jobs" -trimpath -ldflags "-s -w" "sigs.k8s.io/kind@$KIND_VERSION"
    install_bins "$out" kind
fi

make_link
echo "k8s-build: done in $(( $(date +%s) - t_all )) s; binaries in $bin (linked from .cache/k8s/$K8S_VERSION/bin)"

#!/usr/bin/env bash
# The images a kind node runs, without a registry: built here from source and saved as
# docker-save tarballs (in ${KUBETUNE_CACHE:-~/.cache/kubetune}/kind/images), tagged as kubeadm
# v1.34.2 and kind v0.30.0 expect them, for scripts/restricted/kind-assemble.sh to import:
#   registry.k8s.io/kube-{apiserver,controller-manager,scheduler}:v1.34.2  scripts/k8s-build.sh's binaries
#   registry.k8s.io/kube-proxy:v1.34.2, registry.k8s.io/etcd:3.6.5-0, registry.k8s.io/coredns/coredns:v1.12.1,
#   docker.io/kindest/local-path-provisioner:v20250214-acbabc1a (rancher's v0.0.30)
#                                     Go binaries built here from the Go module proxy
#   registry.k8s.io/pause:3.10.1 (+ :3.10, containerd's sandbox_image in kind's config)
#                                     Kubernetes' own pause.c, compiled static
#   docker.io/kindest/local-path-helper:v20241212-8ac705d0   the base image itself
#   docker.io/kindest/kindnetd:v20250512-df8de77b             our kind-cni.sh (kindnetd's module is
#                                     not served by the Go module proxy)
# Every image starts FROM ${KUBETUNE_BASE_IMAGE:-kubetune/base:bookworm} (scripts/images.sh base).
# A machine that can pull images needs none of this: kindest/node:v1.34.2 already holds them.
#
# Usage: bash scripts/restricted/kind-images.sh   (called by scripts/kind-node-image.sh images)
# Idempotent: binaries have version stamps, tarballs are kept; KIND_NODE_REBUILD=1 rebuilds images.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
k8s_versions
ensure_go
kc=$kubetune_cache/kind
kbin=$kc/bin
ctx=$kc/context
tars=$kc/images
step_logs=$kc/logs
timings=$kc/timings.txt
base_src=${KUBETUNE_BASE_IMAGE:-kubetune/base:bookworm}
ETCD_IMAGE_VERSION=v3.6.5          # kubeadm v1.34.2: registry.k8s.io/etcd:3.6.5-0
COREDNS_VERSION=v1.12.1
LPP_VERSION=v0.0.30
mkdir -p "$kbin/.stamp" "$ctx" "$tars"
have_image "$base_src" || die "$base_src missing: run bash scripts/images.sh base"

# --- the binaries -------------------------------------------------------------------------------
if ! stamped "$kbin" kube-proxy "$K8S_VERSION"; then
    go_build_kubernetes kube-proxy "$kc/src/kubernetes-$K8S_VERSION" "$kbin" kube-proxy
    stamp "$kbin" kube-proxy "$K8S_VERSION"
fi
if ! stamped "$kbin" etcd "$ETCD_IMAGE_VERSION"; then
    go_build_etcd etcd "$kc/src/etcd-$ETCD_IMAGE_VERSION" "$ETCD_IMAGE_VERSION" "$kbin/etcd"
    stamp "$kbin" etcd "$ETCD_IMAGE_VERSION"
fi
if ! stamped "$kbin" coredns "$COREDNS_VERSION"; then
    run_step coredns env GOBIN="$kbin" go install -p "$go_jobs" -trimpath -ldflags "-s -w" \
        "github.com/coredns/coredns@$COREDNS_VERSION"
    stamp "$kbin" coredns "$COREDNS_VERSION"
fi
if ! stamped "$kbin" local-path-provisioner "$LPP_VERSION"; then
    run_step local-path-provisioner env GOBIN="$kbin" go install -p "$go_jobs" -trimpath -ldflags "-s -w" \
        "github.com/rancher/local-path-provisioner@$LPP_VERSION"
    stamp "$kbin" local-path-provisioner "$LPP_VERSION"
fi
if ! stamped "$kbin" pause "$K8S_VERSION"; then
    go mod download "k8s.io/kubernetes@$K8S_VERSION"
    run_step pause gcc -Os -Wall -Werror -static -DVERSION="v3.10.1-kubetune" -o "$kbin/pause" \
        "$(go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c"
    stamp "$kbin" pause "$K8S_VERSION"
fi

# --- the images ---------------------------------------------------------------------------------
# img NAME TAG...: docker build of the context $ctx/img-NAME (its Dockerfile written by the
# caller), saved to $tars/NAME.tar with every TAG.
img() {
    local name=$1 t
    shift
    if [ -s "$tars/$name.tar" ] && [ -z "${KIND_NODE_REBUILD:-}" ]; then say "image $name: $tars/$name.tar present"; return 0; fi
    run_step "img-$name" docker build -t "$1" "$ctx/img-$name"
    for t in "${@:2}"; do docker tag "$1" "$t"; done
    docker save -o "$tars/$name.tar.tmp" "$@"
    mv -f "$tars/$name.tar.tmp" "$tars/$name.tar"
}
ctx_with() { # ctx_with NAME FILE...: a fresh context with hard links (or copies) of FILEs
    local c=$ctx/img-$1
    shift
    rm -rf "$c"; mkdir -p "$c"
    cp -l "$@" "$c/" 2>/dev/null || cp "$@" "$c/"
}

r=registry.k8s.io
for b in kube-apiserver kube-controller-manager kube-scheduler; do
    ctx_with "$b" "$k8s_bin/$b"
    printf 'FROM %s\nCOPY %s /usr/local/bin/%s\nENTRYPOINT ["/usr/local/bin/%s"]\n' "$base_src" "$b" "$b" "$b" >"$ctx/img-$b/Dockerfile"
    img "$b" "$r/$b:$K8S_VERSION"
done
ctx_with kube-proxy "$kbin/kube-proxy"
printf 'FROM %s\nRUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y iptables nftables conntrack ipset kmod && rm -rf /var/lib/apt/lists/*\nCOPY kube-proxy /usr/local/bin/kube-proxy\nENTRYPOINT ["/usr/local/bin/kube-proxy"]\n' "$base_src" >"$ctx/img-kube-proxy/Dockerfile"
img kube-proxy "$r/kube-proxy:$K8S_VERSION"
ctx_with etcd "$kbin/etcd"
printf 'FROM %s\nCOPY etcd /usr/local/bin/etcd\nCMD ["/usr/local/bin/etcd"]\n' "$base_src" >"$ctx/img-etcd/Dockerfile"
img etcd "$r/etcd:${ETCD_IMAGE_VERSION#v}-0"
ctx_with coredns "$kbin/coredns"
printf 'FROM %s\nCOPY coredns /coredns\nEXPOSE 53 53/udp\nENTRYPOINT ["/coredns"]\n' "$base_src" >"$ctx/img-coredns/Dockerfile"
img coredns "$r/coredns/coredns:$COREDNS_VERSION"
ctx_with pause "$kbin/pause"
printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$ctx/img-pause/Dockerfile"
img pause "$r/pause:3.10.1" "$r/pause:3.10"
ctx_with local-path-provisioner "$kbin/local-path-provisioner"
printf 'FROM %s\nCOPY local-path-provisioner /usr/bin/local-path-provisioner\nCMD ["local-path-provisioner"]\n' "$base_src" >"$ctx/img-local-path-provisioner/Dockerfile"
img local-path-provisioner docker.io/kindest/local-path-provisioner:v20250214-acbabc1a
mkdir -p "$ctx/img-local-path-helper"
printf 'FROM %s\n' "$base_src" >"$ctx/img-local-path-helper/Dockerfile"
img local-path-helper docker.io/kindest/local-path-helper:v20241212-8ac705d0
# the CNI agent (kindnetd stand-in): a shell loop over iproute2 + kubectl
ctx_with kindnetd "$k8s_bin/kubectl" "$restricted/kind-cni.sh"
printf 'FROM %s\nRUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y iproute2 iptables && rm -rf /var/lib/apt/lists/*\nCOPY kubectl /usr/local/bin/kubectl\nCOPY kind-cni.sh /usr/local/bin/kindnetd\nRUN chmod 0755 /usr/local/bin/kindnetd /usr/local/bin/kubectl\nENTRYPOINT ["/usr/local/bin/kindnetd"]\n' "$base_src" >"$ctx/img-kindnetd/Dockerfile"
img kindnetd docker.io/kindest/kindnetd:v20250512-df8de77b
record "image tarballs: $(du -sh "$tars" | cut -f1) in $tars"

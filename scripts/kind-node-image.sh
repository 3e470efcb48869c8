#!/usr/bin/env bash
# Build a kind node image offline, from parts the project makes itself (no container registry):
#
#   kubetune/kind-base:bookworm      kind v0.30.0's images/base, FROM kubetune/base:bookworm, with
#                                    Debian's systemd/containerd/runc/CNI plugins and kind's files
#   image tarballs, tagged as kubeadm v1.34.2 and kind expect them:
#     registry.k8s.io/kube-{apiserver,controller-manager,scheduler,proxy}:v1.34.2
#     registry.k8s.io/etcd:3.6.5-0, registry.k8s.io/coredns/coredns:v1.12.1,
#     registry.k8s.io/pause:3.10.1 (+ :3.10, containerd's sandbox_image in kind's config)
#     docker.io/kindest/kindnetd:v20250512-df8de77b        (our own: see kind-cni.sh, the
#                                    real kindnetd module is not served by the Go proxy)
#     docker.io/kindest/local-path-provisioner:v20250214-acbabc1a (rancher's, v0.0.30)
#     docker.io/kindest/local-path-helper:v20241212-8ac705d0       (the base image)
#   kubetune/kind-node:v1.34.2       the node image: base + kubelet/kubeadm/kubectl + the tarballs
#                                    imported into containerd's k8s.io namespace (what
#                                    `kind build node-image` does, by hand: it would `ctr pull`
#                                    every image it is not handed as a tarball)
#
# Binaries are built from the Go module proxy into ~/.cache/kubetune/kind/bin (kubelet, kubeadm,
# kube-proxy the same way scripts/k8s-build.sh builds the others; kube-apiserver & co are taken
# from scripts/k8s-build.sh's bin dir).
#
# Usage: bash scripts/kind-node-image.sh [go|base|images|node|probe|all]...   (default: all but probe)
#   probe: kind create cluster --image kubetune/kind-node:v1.34.2 --config kind-config.yaml
#          --name kt-probe, wait for nodes + system pods, a smoke pod on the worker (CoreDNS
#          lookup, a local-path PVC), then delete the cluster (KIND_PROBE_KEEP=1 keeps it).
#          Where the engine can't run --privileged containers (this sandbox lacks
#          CAP_SYS_RESOURCE) it runs against scripts/kind-probe-engine.sh's private engine, whose
#          runc is wrapped by scripts/kind-runc.sh.
# Idempotent: every step is skipped when its output (stamp or docker image) is present;
# KIND_NODE_REBUILD=1 rebuilds the images and node.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
# shellcheck source=k8s-versions.env
. "$repo/scripts/k8s-versions.env"
cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
kc=$cache/kind
kbin=$kc/bin
k8sbin=$(bash "$repo/scripts/k8s-build.sh" --print-bin)
ctx=$kc/context
logs=$kc/logs
tars=$kc/images
timings=$kc/timings.txt
kind_mod=$(go env GOMODCACHE)/sigs.k8s.io/kind@$KIND_VERSION

ETCD_IMAGE_VERSION=v3.6.5          # kubeadm v1.34.2: registry.k8s.io/etcd:3.6.5-0
COREDNS_VERSION=v1.12.1
LPP_VERSION=v0.0.30
base_src=${KUBETUNE_BASE_IMAGE:-kubetune/base:bookworm}
kind_base=kubetune/kind-base:bookworm
node_image=${KIND_NODE_IMAGE:-kubetune/kind-node:$K8S_VERSION}
jobs=${KUBETUNE_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
mkdir -p "$kbin/.stamp" "$ctx" "$logs" "$tars"

say() { echo "kind-node-image: $*"; }
die() { echo "kind-node-image: ERROR: $*" >&2; exit 1; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
record() { echo "$(date -u +%FT%TZ) $*" >>"$timings"; say "$*"; }
step() { # step NAME CMD...: run with a log and a timing
    local name=$1 t0 rc=0
    shift
    t0=$(date +%s)
    say "[$name] started $(date +%T) (log: $logs/$name.log)"
    "$@" >"$logs/$name.log" 2>&1 || rc=$?
    if [ $rc -ne 0 ]; then
        tail -n 30 "$logs/$name.log" >&2
        die "[$name] failed (exit $rc) after $(( $(date +%s) - t0 )) s"
    fi
    record "[$name] done in $(( $(date +%s) - t0 )) s"
}
stamped() { [ -x "$kbin/$1" ] && [ -f "$kbin/.stamp/$1" ] && [ "$(<"$kbin/.stamp/$1")" = "$2" ]; }
stamp() { printf '%s' "$2" >"$kbin/.stamp/$1"; }

export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -buildvcs=false"

# --- Go binaries ------------------------------------------------------------------------------
build_go() {
    [ -d "$kind_mod" ] || go mod download "sigs.k8s.io/kind@$KIND_VERSION"
    # kubelet, kubeadm, kube-proxy: same wrapper module as scripts/k8s-build.sh (copied, not shared)
    if ! stamped kubelet "$K8S_VERSION" || ! stamped kubeadm "$K8S_VERSION" || ! stamped kube-proxy "$K8S_VERSION"; then
        local w=$kc/src/kubernetes-$K8S_VERSION kmod staging m ld minor p
        mkdir -p "$w"
        kmod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
        staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$kmod")
        {
            printf 'module kubetune.local/kubernetes-build\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$K8S_VERSION"
            for m in $staging; do printf '\t%s => %s %s\n' "$m" "$m" "$K8S_STAGING_VERSION"; done
            printf ')\n'
        } >"$w/go.mod.want"
        cmp -s "$w/go.mod.want" "$w/go.mod" 2>/dev/null || cp "$w/go.mod.want" "$w/go.mod"
        minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
        ld="-s -w"
        for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
            ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
        done
        step kubelet-kubeadm bash -c "cd '$w' && go build -mod=mod -p $jobs -trimpath -o '$kbin/' -ldflags '$ld' \
            k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubeadm k8s.io/kubernetes/cmd/kube-proxy"
        for p in kubelet kubeadm kube-proxy; do stamp $p "$K8S_VERSION"; done
    fi
    # etcd at the version kubeadm pins (wrapper module, like scripts/k8s-build.sh's)
    if ! stamped etcd "$ETCD_IMAGE_VERSION"; then
        local w=$kc/src/etcd-$ETCD_IMAGE_VERSION
        mkdir -p "$w"
        cat >"$w/go.mod" <<EOF
module kubetune.local/etcd-build

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_IMAGE_VERSION
EOF
        printf 'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n' >"$w/main.go"
        step etcd bash -c "cd '$w' && go mod tidy && go build -mod=mod -p $jobs -trimpath -o '$kbin/etcd' \
            -ldflags '-s -w' ."
        stamp etcd "$ETCD_IMAGE_VERSION"
    fi
    if ! stamped coredns "$COREDNS_VERSION"; then
        step coredns env GOBIN="$kbin" go install -p "$jobs" -trimpath -ldflags "-s -w" \
            "github.com/coredns/coredns@$COREDNS_VERSION"
        stamp coredns "$COREDNS_VERSION"
    fi
    if ! stamped local-path-provisioner "$LPP_VERSION"; then
        step local-path-provisioner env GOBIN="$kbin" go install -p "$jobs" -trimpath -ldflags "-s -w" \
            "github.com/rancher/local-path-provisioner@$LPP_VERSION"
        stamp local-path-provisioner "$LPP_VERSION"
    fi
    # pause: Kubernetes' own pause.c, static
    if ! stamped pause "$K8S_VERSION"; then
        local src
        src=$(go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c
        step pause gcc -Os -Wall -Werror -static -DVERSION="v3.10.1-kubetune" -o "$kbin/pause" "$src"
        stamp pause "$K8S_VERSION"
    fi
}

# --- the kind base image ----------------------------------------------------------------------
build_base() {
    if have_image "$kind_base" && [ -z "${KIND_NODE_REBUILD:-}" ]; then say "$kind_base present; not rebuilt"; return 0; fi
    have_image "$base_src" || die "$base_src missing: run bash scripts/images.sh base"
    local c=$ctx/base
    rm -rf "$c"; mkdir -p "$c"
    cp -r "$kind_mod/images/base/files" "$c/files"
    chmod -R u+w "$c"
    # classic builder: no COPY --chmod; modes are fixed in the RUN below
    cat >"$c/Dockerfile" <<EOF
FROM $base_src
COPY files/usr/local/bin/ /usr/local/bin/
RUN chmod 0755 /usr/local/bin/* \\
    && echo "Installing Packages ..." \\
    && DEBIAN_FRONTEND=noninteractive clean-install \\
      systemd \\
      conntrack iptables nftables iproute2 ethtool util-linux mount kmod \\
      libseccomp2 pigz fuse-overlayfs \\
      bash ca-certificates curl jq procps \\
      containerd runc containernetworking-plugins \\
    && find /lib/systemd/system/sysinit.target.wants/ -name "systemd-tmpfiles-setup.service" -delete \\
    && rm -f /lib/systemd/system/multi-user.target.wants/* \\
    && rm -f /etc/systemd/system/*.wants/* \\
    && rm -f /lib/systemd/system/local-fs.target.wants/* \\
    && rm -f /lib/systemd/system/sockets.target.wants/*udev* \\
    && rm -f /lib/systemd/system/sockets.target.wants/*initctl* \\
    && rm -f /lib/systemd/system/basic.target.wants/* \\
    && echo "ReadKMsg=no" >> /etc/systemd/journald.conf \\
    && ln -sf "\$(which systemd)" /sbin/init
# restrict_oom_score_adj = true: CRI clamps pods' oom_score_adj to containerd's own; without it
# runc fails every pod sandbox ("failed to update /proc/self/oom_score_adj: Permission denied",
# seen as "can't get final child's PID from pipe: EOF") where the engine lacks CAP_SYS_RESOURCE.
# kind's files after the packages: Debian's containerd ships /etc/containerd/config.toml as a
# conffile and dpkg would stop at its prompt
COPY files/kind/ /kind/
COPY files/LICENSES/ /LICENSES/
COPY files/etc/ /etc/
RUN chmod 0755 /kind/bin /kind/bin/* \\
    && find /etc/containerd /etc/default /etc/sysctl.d /etc/systemd/system /etc/crictl.yaml -type f -exec chmod 0644 {} + \\
    && for b in containerd ctr containerd-shim-runc-v2; do ln -sf /usr/bin/\$b /usr/local/bin/\$b; done \\
    && mkdir -p /usr/local/sbin && ln -sf /usr/sbin/runc /usr/local/sbin/runc \\
    && mkdir -p /opt/cni/bin && for p in host-local loopback ptp portmap bridge; do ln -sf /usr/lib/cni/\$p /opt/cni/bin/\$p; done \\
    && sed -i 's/^\\( *restrict_oom_score_adj\\) = false/\\1 = true/' /etc/containerd/config.toml \\
    && grep -q 'restrict_oom_score_adj = true' /etc/containerd/config.toml \\
    && ctr oci spec \\
        | jq '.hooks.createContainer[.hooks.createContainer| length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \\
        | jq 'del(.process.rlimits)' > /etc/containerd/cri-base.json \\
    && containerd --version && runc --version
RUN systemctl enable kubelet.service \\
    && systemctl enable containerd.service \\
    && systemctl enable undo-mount-hacks.service \\
    && systemctl mask systemd-binfmt.service \\
    && mkdir -p /etc/kubernetes/manifests
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]
EOF
    step kind-base docker build -t "$kind_base" "$c"
    record "kind-base: $(docker image inspect -f '{{.Size}}' "$kind_base" | numfmt --to=iec)"
}

# --- component images -------------------------------------------------------------------------
# img NAME TAG...: docker build context $ctx/img-NAME (Dockerfile written by the caller), saved
# to $tars/NAME.tar with every TAG.
img() {
    local name=$1; shift
    if [ -s "$tars/$name.tar" ] && [ -z "${KIND_NODE_REBUILD:-}" ]; then say "image $name: $tars/$name.tar present"; return 0; fi
    local t
    step "img-$name" docker build -t "$1" "$ctx/img-$name"
    for t in "${@:2}"; do docker tag "$1" "$t"; done
    docker save -o "$tars/$name.tar.tmp" "$@"
    mv -f "$tars/$name.tar.tmp" "$tars/$name.tar"
}
ctx_with() { # ctx_with NAME FILE...: fresh context with hard links/copies of FILEs
    local c=$ctx/img-$1; shift
    rm -rf "$c"; mkdir -p "$c"
    cp -l "$@" "$c/" 2>/dev/null || cp "$@" "$c/"
}

build_images() {
    local b r=registry.k8s.io
    for b in kube-apiserver kube-controller-manager kube-scheduler; do
        ctx_with "$b" "$k8sbin/$b"
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
    ctx_with kindnetd "$k8sbin/kubectl" "$repo/scripts/kind-cni.sh"
    printf 'FROM %s\nRUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y iproute2 iptables && rm -rf /var/lib/apt/lists/*\nCOPY kubectl /usr/local/bin/kubectl\nCOPY kind-cni.sh /usr/local/bin/kindnetd\nRUN chmod 0755 /usr/local/bin/kindnetd /usr/local/bin/kubectl\nENTRYPOINT ["/usr/local/bin/kindnetd"]\n' "$base_src" >"$ctx/img-kindnetd/Dockerfile"
    img kindnetd docker.io/kindest/kindnetd:v20250512-df8de77b
    record "image tarballs: $(du -sh "$tars" | cut -f1) in $tars"
}

# --- the node image ---------------------------------------------------------------------------
build_node() {
    if have_image "$node_image" && [ -z "${KIND_NODE_REBUILD:-}" ]; then say "$node_image present; not rebuilt"; return 0; fi
    step node bash "$repo/scripts/kind-assemble.sh" "$kind_base" "$node_image" "$K8S_VERSION" "$kbin/kubelet" "$kbin/kubeadm" "$k8sbin/kubectl" -- "$tars"/*.tar
    record "node: $node_image $(docker image inspect -f '{{.Size}}' "$node_image" | numfmt --to=iec)"
}

probe() {
    local kind=$k8sbin/kind t0 main_id
    t0=$(date +%s)
    # An engine that can't run privileged containers (this sandbox: no CAP_SYS_RESOURCE in the
    # bounding set) gets a private second engine with runc wrapped (scripts/kind-probe-engine.sh).
    if [ -z "${DOCKER_HOST:-}" ] && ! docker run --rm --privileged --entrypoint true "$kind_base" >/dev/null 2>&1; then
        say "[probe] the engine can't run --privileged containers; using scripts/kind-probe-engine.sh"
        bash "$repo/scripts/kind-probe-engine.sh" start
        bash "$repo/scripts/kind-probe-engine.sh" net
        main_id=$(docker image inspect -f '{{.Id}}' "$node_image")
        export DOCKER_HOST
        DOCKER_HOST=$(bash "$repo/scripts/kind-probe-engine.sh" host)
        if [ "$(docker image inspect -f '{{.Id}}' "$node_image" 2>/dev/null)" != "$main_id" ]; then
            local tl=$(date +%s)
            DOCKER_HOST= docker save "$node_image" | docker load >/dev/null
            record "[probe] $node_image loaded into the probe engine in $(( $(date +%s) - tl )) s"
        fi
    fi
    "$kind" delete cluster --name kt-probe >/dev/null 2>&1 || true
    mkdir -p "$repo/.cache/e2e"
    say "[probe] kind create cluster --image $node_image --config kind-config.yaml --name kt-probe --wait 3m"
    if "$kind" create cluster --image "$node_image" --config kind-config.yaml --name kt-probe --wait 3m --retain -v 1 2>&1 | tee "$logs/probe.log"; then
        record "[probe] cluster up in $(( $(date +%s) - t0 )) s"
    else
        record "[probe] kind create cluster FAILED after $(( $(date +%s) - t0 )) s; logs: kind export logs --name kt-probe"
    fi
    local k=("$k8sbin/kubectl" --context kind-kt-probe) tw
    tw=$(date +%s)
    if "${k[@]}" wait --for=condition=Ready nodes --all --timeout=180s \
        && "${k[@]}" -n kube-system wait --for=condition=Ready pods --all --timeout=180s \
        && "${k[@]}" -n local-path-storage wait --for=condition=Ready pods --all --timeout=120s; then
        record "[probe] all nodes and system pods Ready $(( $(date +%s) - tw )) s after create"
    else
        record "[probe] nodes/system pods NOT all Ready after $(( $(date +%s) - tw )) s"
    fi
    "${k[@]}" get nodes -o wide || true
    "${k[@]}" get pods -A -o wide || true
    # smoke: a pod on the worker resolves a service name through CoreDNS (cross-node pod network,
    # kube-proxy service VIP) and a PVC binds through local-path-provisioner
    "${k[@]}" apply -f - <<'YAML' || true
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: kt-probe-pvc, namespace: default}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 10Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: kt-probe-smoke, namespace: default}
spec:
  nodeSelector: {kubetune.io/pool: cpu}
  restartPolicy: Never
  containers:
  - name: smoke
    image: docker.io/kindest/local-path-helper:v20241212-8ac705d0
    imagePullPolicy: Never
    command: [sh, -c, "getent hosts kubernetes.default.svc.cluster.local && echo data >/data/x && cat /data/x && echo smoke-ok"]
    volumeMounts: [{name: d, mountPath: /data}]
  volumes:
  - name: d
    persistentVolumeClaim: {claimName: kt-probe-pvc}
YAML
    if docker exec kt-probe-worker test -d /var/lib/kubetune; then record "[probe] extraMount /var/lib/kubetune present on the worker"; else record "[probe] extraMount /var/lib/kubetune MISSING on the worker"; fi
    if "${k[@]}" wait --for=jsonpath='{.status.phase}'=Succeeded pod/kt-probe-smoke --timeout=120s; then
        record "[probe] smoke pod: $("${k[@]}" logs kt-probe-smoke | tr '\n' ' ')"
    else
        record "[probe] smoke pod FAILED: $("${k[@]}" get pod kt-probe-smoke -o wide --no-headers 2>&1)"
        "${k[@]}" describe pod kt-probe-smoke | tail -15 || true
        "${k[@]}" logs kt-probe-smoke || true
    fi
    if [ -z "${KIND_PROBE_KEEP:-}" ]; then "$kind" delete cluster --name kt-probe; fi
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(go base images node)
for s in "${steps[@]}"; do
    case "$s" in
        go) build_go ;;
        base) build_base ;;
        images) build_images ;;
        node) build_node ;;
        probe) probe ;;
        all) build_go; build_base; build_images; build_node ;;
        *) die "unknown step $s" ;;
    esac
done

#!/usr/bin/env bash
# Build a kind node image offline, from parts the project makes itself (no container registry):
#
#   kubetune/kind-base:bookworm   kind v0.30.0's images/base, FROM kubetune/base:bookworm, with
#                                 Debian's systemd/containerd/runc/CNI plugins and kind's files
#   image tarballs                the images a node runs (registry.k8s.io/kube-*, etcd, coredns,
#                                 pause; kind's kindnetd and local-path images), built from source:
#                                 scripts/restricted/kind-images.sh
#   kubetune/kind-node:v1.34.2    the node image: the base + kubelet/kubeadm/kubectl + those
#                                 tarballs imported into containerd, put together by hand as
#                                 `kind build node-image` would (it would pull every image it is
#                                 not handed): scripts/restricted/kind-assemble.sh
#
# A machine that can pull images needs none of this: kind's own kindest/node:v1.34.2 holds it all
# (kind create cluster --image kindest/node:v1.34.2 --config kind-config.yaml).
#
# Usage: bash scripts/kind-node-image.sh [go|base|images|node|probe|all]...   (default: all but probe)
#   go:    kubelet and kubeadm from the Go module proxy into ~/.cache/kubetune/kind/bin (kubectl
#          and the control plane's binaries are scripts/k8s-build.sh's)
#   probe: kind create cluster --image kubetune/kind-node:v1.34.2 --config kind-config.yaml
#          --name kt-probe, wait for nodes + system pods, a smoke pod on the worker (CoreDNS
#          lookup, a local-path PVC), then delete the cluster (KIND_PROBE_KEEP=1 keeps it).
#          Needs an engine that runs --privileged containers: where the host lacks capabilities
#          (this sandbox: CAP_SYS_RESOURCE), scripts/docker-engine.sh starts one whose runc is
#          wrapped by scripts/restricted/kind-runc.sh. `make kind-up` (scripts/kind.sh) is the
#          cluster users get; the probe is this image's own smoke test.
# Idempotent: every step is skipped when its output (stamp or docker image) is present;
# KIND_NODE_REBUILD=1 rebuilds the images and node.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$repo"
k8s_versions
ensure_go
kc=$kubetune_cache/kind
kbin=$kc/bin
ctx=$kc/context
step_logs=$kc/logs
logs=$step_logs
timings=$kc/timings.txt
kind_mod=$(go env GOMODCACHE)/sigs.k8s.io/kind@$KIND_VERSION
base_src=${KUBETUNE_BASE_IMAGE:-kubetune/base:bookworm}
kind_base=kubetune/kind-base:bookworm
node_image=${KIND_NODE_IMAGE:-kubetune/kind-node:$K8S_VERSION}
mkdir -p "$kbin/.stamp" "$ctx" "$logs"

# --- kubelet, kubeadm ---------------------------------------------------------------------------
build_go() {
    [ -d "$kind_mod" ] || go mod download "sigs.k8s.io/kind@$KIND_VERSION"
    if ! stamped "$kbin" kubelet "$K8S_VERSION" || ! stamped "$kbin" kubeadm "$K8S_VERSION"; then
        go_build_kubernetes kubelet-kubeadm "$kc/src/kubernetes-$K8S_VERSION" "$kbin" kubelet kubeadm
        stamp "$kbin" kubelet "$K8S_VERSION"
        stamp "$kbin" kubeadm "$K8S_VERSION"
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
    run_step kind-base docker build -t "$kind_base" "$c"
    record "kind-base: $(docker image inspect -f '{{.Size}}' "$kind_base" | numfmt --to=iec)"
}

# --- the node image ---------------------------------------------------------------------------
build_node() {
    if have_image "$node_image" && [ -z "${KIND_NODE_REBUILD:-}" ]; then say "$node_image present; not rebuilt"; return 0; fi
    run_step node bash "$restricted/kind-assemble.sh" "$kind_base" "$node_image" "$K8S_VERSION" \
        "$kbin/kubelet" "$kbin/kubeadm" "$k8s_bin/kubectl" -- "$kc/images"/*.tar
    record "node: $node_image $(docker image inspect -f '{{.Size}}' "$node_image" | numfmt --to=iec)"
}

probe() {
    local kind=$k8s_bin/kind t0
    t0=$(date +%s)
    # An engine that can't run privileged containers (this sandbox: no CAP_SYS_RESOURCE in the
    # bounding set) gets a private second engine with runc wrapped.
    docker run --rm --privileged --entrypoint true "$kind_base" >/dev/null 2>&1 \
        || die "the engine can't run --privileged containers; start it with scripts/docker-engine.sh (which runs containers through scripts/restricted/kind-runc.sh where the host needs it)"
    "$kind" delete cluster --name kt-probe >/dev/null 2>&1 || true
    mkdir -p "$repo/.cache/e2e"
    say "[probe] kind create cluster --image $node_image --config kind-config.yaml --name kt-probe --wait 3m"
    if "$kind" create cluster --image "$node_image" --config kind-config.yaml --name kt-probe --wait 3m --retain -v 1 2>&1 | tee "$logs/probe.log"; then
        record "[probe] cluster up in $(elapsed "$t0") s"
    else
        record "[probe] kind create cluster FAILED after $(elapsed "$t0") s; logs: kind export logs --name kt-probe"
    fi
    local k=("$k8s_bin/kubectl" --context kind-kt-probe) tw
    tw=$(date +%s)
    if "${k[@]}" wait --for=condition=Ready nodes --all --timeout=180s \
        && "${k[@]}" -n kube-system wait --for=condition=Ready pods --all --timeout=180s \
        && "${k[@]}" -n local-path-storage wait --for=condition=Ready pods --all --timeout=120s; then
        record "[probe] all nodes and system pods Ready $(elapsed "$tw") s after create"
    else
        record "[probe] nodes/system pods NOT all Ready after $(elapsed "$tw") s"
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
        images) bash "$restricted/kind-images.sh" ;;
        node) build_node ;;
        probe) probe ;;
        all) build_go; build_base; bash "$restricted/kind-images.sh"; build_node ;;
        *) die "unknown step $s" ;;
    esac
done

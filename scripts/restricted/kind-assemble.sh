#!/usr/bin/env bash
# Assemble a kind node image by hand, doing what `kind build node-image` (kind v0.30.0,
# pkg/build/nodeimage/buildcontext.go) does, minus the registry: run the base image with
# `sleep infinity`, copy kubelet/kubeadm/kubectl to /usr/bin, write /kind/version and the default
# CNI and storage manifests, start containerd in the container, `ctr -n k8s.io images import` the
# given docker-save tarballs, stop containerd, `docker commit` with kind's entrypoint.
# (kind's own builder can't be used offline: it `ctr content fetch`es every image that kubeadm
# lists and that is not one of the four control-plane tarballs of a Kubernetes release, with no
# check for images already present.)
#
# Usage: bash scripts/restricted/kind-assemble.sh BASE_IMAGE NODE_IMAGE K8S_VERSION BINARY... -- IMAGE_TAR...
# Called by scripts/kind-node-image.sh (step node) with the tarballs of kind-images.sh.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
k8s_versions
ensure_go
base=$1 image=$2 version=$3
shift 3
bins=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do bins+=("$1"); shift; done
[ "${1:-}" = -- ] && shift
tars=("$@")
kind_mod=$(go env GOMODCACHE)/sigs.k8s.io/kind@$KIND_VERSION
[ -d "$kind_mod" ] || go mod download "sigs.k8s.io/kind@$KIND_VERSION"

id=kind-build-kubetune-$$
cleanup() { docker rm -f -v "$id" >/dev/null 2>&1 || true; }
trap cleanup EXIT
t0=$(date +%s)
docker run -d --entrypoint=sleep --name="$id" --security-opt seccomp=unconfined "$base" infinity >/dev/null
dx() { docker exec -i "$id" "$@"; }

for b in "${bins[@]}"; do
    say "copy $b -> /usr/bin/$(basename "$b")"
    docker cp "$b" "$id:/usr/bin/$(basename "$b")"
    dx chmod 0755 "/usr/bin/$(basename "$b")"
    dx chown root:root "/usr/bin/$(basename "$b")"
done
printf '%s' "$version" | dx sh -c 'cat >/kind/version'
dx mkdir -p /kind/manifests

# default storage: kind's own manifest, taken from its source (a Go raw string with the image
# names spliced in)
src=$kind_mod/pkg/build/nodeimage/const_storage.go
prov=$(sed -n 's/^const storageProvisionerImage = "\(.*\)"$/\1/p' "$src")
helper=$(sed -n 's/^const storageHelperImage = "\(.*\)"$/\1/p' "$src")
if [ -z "$prov" ] || [ -z "$helper" ]; then die "no storage images in $src"; fi
awk '/^const defaultStorageManifest = `/{on=1; next} on && /^`$/{exit} on' "$src" \
    | sed -e "s#\` + storageProvisionerImage + \`#$prov#g" -e "s#\` + storageHelperImage + \`#$helper#g" \
    | dx sh -c 'cat >/kind/manifests/default-storage.yaml'

# default CNI: kind templates this file ({{ .PodSubnet }}) at cluster creation; ours runs
# scripts/restricted/kind-cni.sh under kindnetd's image name
cni_image=$(sed -n 's/^const kindnetdImage = "\(.*\)"$/\1/p' "$kind_mod/pkg/build/nodeimage/const_cni.go")
dx sh -c 'cat >/kind/manifests/default-cni.yaml' <<YAML
# kubetune's offline kindnetd stand-in (scripts/restricted/kind-cni.sh)
# would you kindly template this file
---
kind: ClusterRole
apiVersion: rbac.authorization.k8s.io/v1
metadata:
  name: kindnet
rules:
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
---
kind: ClusterRoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata:
  name: kindnet
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: kindnet
subjects:
- kind: ServiceAccount
  name: kindnet
  namespace: kube-system
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: kindnet
  namespace: kube-system
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: kindnet
  namespace: kube-system
  labels: {tier: node, app: kindnet, k8s-app: kindnet}
spec:
  selector:
    matchLabels: {app: kindnet}
  template:
    metadata:
      labels: {tier: node, app: kindnet, k8s-app: kindnet}
    spec:
      hostNetwork: true
      nodeSelector: {kubernetes.io/os: linux}
      tolerations:
      - operator: Exists
      priorityClassName: system-node-critical
      serviceAccountName: kindnet
      containers:
      - name: kindnet-cni
        image: $cni_image
        imagePullPolicy: IfNotPresent
        env:
        - name: NODE_NAME
          valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
        - name: POD_SUBNET
          value: {{ .PodSubnet }}
        volumeMounts:
        - {name: cni-cfg, mountPath: /etc/cni/net.d}
        - {name: xtables-lock, mountPath: /run/xtables.lock, readOnly: false}
        resources:
          requests: {cpu: 10m, memory: 30Mi}
        securityContext:
          privileged: false
          capabilities:
            add: ["NET_RAW", "NET_ADMIN"]
      volumes:
      - name: cni-cfg
        hostPath: {path: /etc/cni/net.d}
      - name: xtables-lock
        hostPath: {path: /run/xtables.lock, type: FileOrCreate}
YAML

say "starting containerd in the build container"
dx bash -c 'nohup containerd >/tmp/containerd.log 2>&1 &'
dx bash -c 'for i in $(seq 1 30); do [ -S /run/containerd/containerd.sock ] && break; sleep 0.5; done; ctr version >/dev/null' \
    || { dx cat /tmp/containerd.log >&2; exit 1; }
for t in "${tars[@]}"; do
    say "ctr -n k8s.io images import $(basename "$t")"
    dx ctr --namespace=k8s.io images import --all-platforms --no-unpack --digests - <"$t" \
        || { dx cat /tmp/containerd.log | tail -20 >&2; exit 1; }
done
dx ctr --namespace=k8s.io images list -q | grep -v '^sha256:'
dx pkill containerd || true
sleep 2
dx rm -f /tmp/containerd.log
docker commit \
    --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' \
    --change 'ENV HTTP_PROXY="" HTTPS_PROXY="" NO_PROXY=""' \
    "$id" "$image" >/dev/null
say "$image committed in $(elapsed "$t0") s"

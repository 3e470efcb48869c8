#!/usr/bin/env bash
# kubetune on a kind cluster: `make kind-up` / `make kind-down` / `make kind-status`.
#
#   up      a Docker engine (scripts/docker-engine.sh), kind/kubectl/helm (scripts/k8s-build.sh), the
#           node image, kubetune's images (scripts/images.sh), the cluster of kind-config.yaml
#           (kubeconfig: .cache/kind/kubeconfig), the images loaded into its nodes (`kind load`), and
#           the Helm chart installed from helm/kubetune: the operator runs as a pod, with in-cluster
#           config and the chart's RBAC. A healthy cluster is reused: a second `up` takes seconds.
#   down    delete the cluster (the images and caches stay).
#   status  is the cluster there and healthy, which node image, is the operator ready.
#
# The node image: $KIND_NODE_IMAGE when set; else kind's public kindest/node:$K8S_VERSION when it is
# present or can be pulled; else kubetune/kind-node:$K8S_VERSION, built offline by
# scripts/kind-node-image.sh (machines without a container registry). Where the engine cannot run
# privileged containers, scripts/docker-engine.sh has detected it and runs containers through
# scripts/restricted/kind-runc.sh; this script checks that a privileged container runs before it
# creates anything.
#
# Data: `kubetune upload SRC pvc://CLAIM/PATH` (see the README) puts files onto a claim.
# Environment: KIND_CLUSTER_NAME (default: kind-config.yaml's name), KUBETUNE_KIND_KUBECONFIG.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$repo"
k8s_versions
timings=$repo/.cache/kind/timings.txt
name=${KIND_CLUSTER_NAME:-$(sed -n 's/^name: *//p' kind-config.yaml | head -1)}
kubeconfig=${KUBETUNE_KIND_KUBECONFIG:-$repo/.cache/kind/kubeconfig}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
release=kubetune
release_ns=kubetune-system
operator_image=ghcr.io/kubetune/operator:$version
trainer_images=(ghcr.io/kubetune/trainer:"$version" ghcr.io/kubetune/serve:"$version")
loaded_dir=/var/lib/kubetune-images   # in each node: the image IDs load_images put there
kind=$k8s_bin/kind
kubectl=("$k8s_bin/kubectl" --kubeconfig "$kubeconfig")
helm=("$k8s_bin/helm" --kubeconfig "$kubeconfig")
mkdir -p "$repo/.cache/kind"

stage() { # stage NAME TITLE COMMAND...: run a stage and record its duration
    local t0 stage_name=$1
    t0=$(date +%s)
    say "── $2"
    shift 2
    "$@"
    record "stage $stage_name: $(elapsed "$t0") s"
}

exists() { "$kind" get clusters 2>/dev/null | grep -qx "$name"; }
healthy() {
    exists && [ -s "$kubeconfig" ] \
        && timeout 20 "${kubectl[@]}" get --raw /readyz >/dev/null 2>&1 \
        && [ -z "$("${kubectl[@]}" get nodes --no-headers 2>/dev/null | awk '$2 != "Ready"')" ] \
        && [ "$("${kubectl[@]}" get nodes --no-headers 2>/dev/null | wc -l)" -eq "$(grep -c '^- role:' kind-config.yaml)" ]
}
cluster_node_image() { docker inspect -f '{{.Config.Image}}' "$name-control-plane" 2>/dev/null || true; }

node_image() { # prints the node image to use, building it when needed (messages on stderr)
    local public=kindest/node:$K8S_VERSION
    if [ -n "${KIND_NODE_IMAGE:-}" ]; then echo "$KIND_NODE_IMAGE"; return; fi
    if have_image "$public" || timeout 600 docker pull -q "$public" >/dev/null 2>&1; then echo "$public"; return; fi
    say "kind's public node image $public cannot be pulled here: building kubetune/kind-node:$K8S_VERSION offline" >&2
    bash scripts/kind-node-image.sh all >&2
    echo "kubetune/kind-node:$K8S_VERSION"
}

check_privileged() {
    docker run --rm --privileged --entrypoint true "$1" >/dev/null 2>&1 && return 0
    die "this Docker engine cannot run --privileged containers, which kind needs for its nodes:
  $(docker run --rm --privileged --entrypoint true "$1" 2>&1 | tail -1)
  an engine started by scripts/docker-engine.sh on such a host runs scripts/restricted/kind-runc.sh;
  restart yours with: --add-runtime kt-runc=$kubetune_cache/tools/kind-runc.sh --default-runtime kt-runc"
}

create_cluster() {
    local image=$1 current
    current=$(cluster_node_image)
    if exists && [ ! -s "$kubeconfig" ]; then   # made by another clone of this repository: reuse it
        "$kind" export kubeconfig --name "$name" --kubeconfig "$kubeconfig" >/dev/null 2>&1 || true
    fi
    if healthy && [ "$current" = "$image" ]; then
        say "cluster $name is up and healthy (node image $image): reused"
        return 0
    fi
    if exists; then
        say "cluster $name is ${current:+on $current, }not healthy or not on $image: recreating it"
        "$kind" delete cluster --name "$name" --kubeconfig "$kubeconfig"
    fi
    "$kind" create cluster --config kind-config.yaml --name "$name" --image "$image" \
        --kubeconfig "$kubeconfig" --wait 5m
    "${kubectl[@]}" -n local-path-storage rollout status deployment/local-path-provisioner --timeout=3m
}

load_images() {
    local node image id had workers
    # The trainer image (~6 GB) only where training and serving pods run: the worker nodes.
    workers=$("$kind" get nodes --name "$name" | grep -v -- '-control-plane$' || true)
    [ -n "$workers" ] || workers=$name-control-plane
    for node in $("$kind" get nodes --name "$name"); do
        local wanted=("$operator_image") missing=()
        if grep -qx "$node" <<<"$workers"; then wanted+=("${trainer_images[@]}"); fi
        for image in "${wanted[@]}"; do
            id=$(docker image inspect -f '{{.Id}}' "$image")
            # What this script loaded into the node is noted in the node itself (its ID per image
            # name): a reused cluster skips what it holds, and a rebuilt image's predecessor is
            # removed from the node first, so the node's disk does not fill with old 6 GB images.
            had=$(docker exec "$node" cat "$loaded_dir/${image//[\/:]/_}" 2>/dev/null || true)
            [ "$had" = "$id" ] && continue
            if [ -n "$had" ]; then
                docker exec "$node" ctr -n k8s.io images rm "$image" "$had" >/dev/null 2>&1 || true
            fi
            missing+=("$image")
        done
        if [ ${#missing[@]} -eq 0 ]; then
            say "$node holds ${wanted[*]}"
            continue
        fi
        "$kind" load docker-image --name "$name" --nodes "$node" "${missing[@]}"
        # kind's `ctr images import --digests` also names each image import-DATE@DIGEST; those
        # names would keep a replaced image's content on the node's disk for good
        docker exec "$node" sh -c 'ctr -n k8s.io images ls -q | grep "^import-" | xargs -r ctr -n k8s.io images rm >/dev/null'
        for image in "${missing[@]}"; do
            docker exec "$node" sh -c "mkdir -p $loaded_dir && echo $(docker image inspect -f '{{.Id}}' "$image") > $loaded_dir/${image//[\/:]/_}"
        done
    done
}

install_chart() {
    # The image's ID as a pod annotation: a rebuilt image under the same tag rolls the operator.
    local id
    id=$(docker image inspect -f '{{.Id}}' "$operator_image" | cut -c8-19)
    # CRDs first (helm/kubetune/UPGRADING.md): Helm installs a chart's crds/ once and never updates
    # them, so a cluster kept from an older version would refuse (and `kubectl explain` hide) new fields.
    "${kubectl[@]}" apply --server-side --force-conflicts -f helm/kubetune/crds/
    "${helm[@]}" upgrade --install "$release" helm/kubetune --namespace "$release_ns" --create-namespace \
        --set-string "podAnnotations.kubetune\.io/image-id=$id" --wait --timeout 5m
    "${kubectl[@]}" -n "$release_ns" rollout status deployment/"$release"-operator --timeout=3m
}

up() {
    local t_all image
    t_all=$(date +%s)
    stage engine "the Docker engine" bash scripts/docker-engine.sh
    stage binaries "kind, kubectl and helm ($K8S_VERSION; built once from the Go module proxy)" bash scripts/k8s-build.sh
    local t0
    t0=$(date +%s)
    say "── the node image"
    image=$(node_image)
    record "stage node-image ($image): $(elapsed "$t0") s"
    check_privileged "$image"
    stage images "kubetune's images (scripts/images.sh)" bash scripts/images.sh operator trainer
    stage cluster "the cluster $name (kind-config.yaml)" create_cluster "$image"
    stage load "images into the nodes (kind load)" load_images
    stage chart "the Helm chart (helm/kubetune) in $release_ns" install_chart
    record "kind-up: ready in $(elapsed "$t_all") s"
    echo
    echo "  export KUBECONFIG=$kubeconfig"
    echo "  kubectl get pods -n $release_ns"
    echo "  .venv/bin/kubetune upload .cache/models/tiny-llama pvc://kubetune-data/models/tiny-llama"
}

down() {
    if exists; then
        "$kind" delete cluster --name "$name" --kubeconfig "$kubeconfig"
    else
        say "no cluster $name"
    fi
    rm -f "$kubeconfig"
}

status() {
    if ! exists; then say "no cluster $name (make kind-up)"; return 1; fi
    say "cluster $name on $(cluster_node_image); kubeconfig $kubeconfig"
    if healthy; then say "healthy: API ready, every node Ready"; else say "NOT healthy"; return 1; fi
    "${kubectl[@]}" -n "$release_ns" get deployment,pods -o wide
}

case "${1:-up}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) die "usage: bash scripts/kind.sh [up|down|status]" ;;
esac

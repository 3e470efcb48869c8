#!/usr/bin/env bash
# `make demo`: the operator's story on a kind cluster, set-up included.
#
#   1. the cluster: `make kind-up` (scripts/kind.sh: engine, node image, images, cluster, chart)
#   2. the data: the tiny model and the chat dataset onto the claim kubetune-data (`kubetune upload`)
#   3. training: the FineTuneJob of examples/cpu-tiny-kind.yaml (2 pods x 1 process, DDP on CPU),
#      its progress as `kubectl get ftj -w` shows it
#   4. serving: the AdapterDeployment of the same file, Available once the adapter is loaded
#   5. the answer: the question asked through the OpenAI API (the official `openai` client) at the
#      Service (kubectl port-forward svc/tiny-support)
#
# Each stage prints its duration. The demo runs in the namespace kubetune-demo, recreated on each
# run (so it trains from scratch); `make kind-down` deletes the cluster. `make demo-local` is the
# quick path without a cluster (scripts/demo-local.sh).
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$repo"
k8s_versions
export KUBECONFIG=${KUBETUNE_KIND_KUBECONFIG:-$repo/.cache/kind/kubeconfig}
export PATH=$k8s_bin:$PATH
ns=kubetune-demo
name=tiny-support
question="How long are backups kept?"
timings=$repo/.cache/kind/timings.txt
python=.venv/bin/python
t_demo=$(date +%s)
t0=0
begin() { t0=$(date +%s); echo; echo "== $*"; }
end() { record "$1: $(elapsed "$t0") s"; }
doc() { # doc KIND: that document of the example, as JSON (a YAML dump could unquote "1e-2")
    "$python" - "$1" <<'PY'
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open("examples/cpu-tiny-kind.yaml")) if d["kind"] == sys.argv[1]]
print(json.dumps(docs[0]))
PY
}

begin "1. the cluster (make kind-up)"
bash scripts/kind.sh up
end cluster

begin "2. the data onto pvc://kubetune-data (kubetune upload), namespace $ns"
kubectl delete namespace "$ns" --ignore-not-found --wait=true >/dev/null
kubectl create namespace "$ns" >/dev/null
.venv/bin/kubetune upload .cache/models/tiny-llama pvc://kubetune-data/models/tiny-llama -n "$ns"
.venv/bin/kubetune upload examples/data/support-chat.jsonl pvc://kubetune-data/datasets/support-chat.jsonl -n "$ns"
end data

begin "3. training: kubectl apply the FineTuneJob of examples/cpu-tiny-kind.yaml; kubectl get ftj -w"
doc FineTuneJob | kubectl apply -n "$ns" -f -
kubectl get ftj "$name" -n "$ns" -w &
watcher=$!
trap 'kill $watcher 2>/dev/null || true' EXIT
for _ in $(seq 1800); do   # 30 min at most
    phase=$(kubectl get ftj "$name" -n "$ns" -o jsonpath='{.status.phase}')
    case "$phase" in Succeeded|Failed) break ;; esac
    sleep 1
done
sleep 1; kill "$watcher" 2>/dev/null || true; wait "$watcher" 2>/dev/null || true
if [ "$phase" != Succeeded ]; then
    kubectl get ftj "$name" -n "$ns" -o jsonpath='{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}'
    die "the FineTuneJob did not succeed (phase: ${phase:-none})"
fi
echo "adapter: $(kubectl get ftj "$name" -n "$ns" -o jsonpath='{.status.adapter.uri} sha256 {.status.adapter.sha256}')"
end training

begin "4. serving: kubectl apply the AdapterDeployment; wait until Available"
doc AdapterDeployment | kubectl apply -n "$ns" -f -
kubectl wait --for=condition=Available "adapterdeployment/$name" -n "$ns" --timeout=10m
kubectl get adapterdeployment "$name" -n "$ns"
end serving

begin "5. the answer through the Service (kubectl port-forward svc/$name; the openai client)"
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
service_port=$(kubectl get service "$name" -n "$ns" -o jsonpath='{.spec.ports[0].port}')
kubectl port-forward -n "$ns" "service/$name" "$port:$service_port" --address 127.0.0.1 >/dev/null &
forward=$!
trap 'kill $watcher $forward 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 0.2; done
PORT=$port QUESTION=$question "$python" - <<'PY'
import os
import sys

from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{os.environ['PORT']}/v1", api_key="unused")
models = [m.id for m in client.models.list().data]
print("models served:", ", ".join(models))
question = os.environ["QUESTION"]
print("Q:", question)
answers = {}
for model in models:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0
    )
    answers[model] = " ".join(reply.choices[0].message.content.split())
    print(f"A ({model}):", answers[model])  # the untrained base model answers noise
if not answers.get("support", "").startswith("Backups are kept for thirty days."):
    sys.exit("the adapter did not give the trained answer")
PY
end answer
record "all: $(elapsed "$t_demo") s"
echo
echo "The cluster stays up: KUBECONFIG=$KUBECONFIG kubectl get ftj,adapterdeployment -n $ns; make kind-down deletes it."

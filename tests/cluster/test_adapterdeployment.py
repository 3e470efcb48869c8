"""The AdapterDeployment handlers in-process (KopfRunner) against the real control plane: the
admin-key Secret, NetworkPolicy, adapters ConfigMap, Deployment and Service created, owned and
accepted by the API server, and adapters hot-loaded onto the replica at its pod IP (kwok's address,
added to the loopback interface, where a small http.server plays the runtime:
tests/cluster/pod_address.py) with the derived admin key; an adapter URI in a FineTuneJob's status
that is not under its output never reaches the replica or the Deployment; an adapter whose job's
evaluation fails a `require` rule is Rejected, with an Event, and never reaches the replica."""

from __future__ import annotations

import base64
import json
import threading
import time
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kopf.testing import KopfRunner

from kubetune.api.adaptersfile import parse_adapters_file
from kubetune_operator import keys
from kubetune_operator.adapterdeployment.adapters import REPLICA_URLS_ANNOTATION
from kubetune_operator.config import OperatorConfig
from kubetune_operator.handlers import REGISTRY
from kubetune_operator.state import ALLOW_METRICS_URL_ENV
from tests.cluster.pod_address import address_on_loopback

pytestmark = pytest.mark.cluster

API = "/apis/kubetune.io/v1alpha1"
WAIT = 30
BAD = "adapter rank 128 exceeds maxLoraRank 64"


class FakeReplica:
    """/health, /v1/models, load and unload; `bad` is refused with the runtime's 400."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, bad: str = "bad"):
        self.adapters: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.auth: set[str | None] = set()
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def reply(self, code: int, body):
                data = (json.dumps(body) if not isinstance(body, str) else body).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                if self.path == "/health":
                    return self.reply(200, {"status": "ready"})
                with fake.lock:
                    fake.auth.add(self.headers.get("Authorization"))
                    cards = [{"id": "base", "parent": None, "root": "hf://org/base"}] + [
                        {"id": n, "parent": "base", "root": u} for n, u in fake.adapters.items()
                    ]
                return self.reply(200, {"object": "list", "data": cards})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = body["lora_name"]
                with fake.lock:
                    fake.auth.add(self.headers.get("Authorization"))
                    if self.path == "/v1/load_lora_adapter":
                        fake.calls.append(("load", name))
                        if name == bad:
                            return self.reply(400, {"error": {"message": BAD, "type": "BadRequestError", "code": 400}})
                        fake.adapters[name] = body["lora_path"]
                        return self.reply(200, f"Success: LoRA adapter '{name}' added successfully.")
                    fake.calls.append(("unload", name))
                    fake.adapters.pop(name, None)
                    return self.reply(200, "ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def operator(cluster, crds, namespace, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.setenv("KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS", "0.5")
    monkeypatch.setenv(ALLOW_METRICS_URL_ENV, "1")
    with KopfRunner(["run", "--standalone", "--namespace", namespace], registry=REGISTRY, timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output[-5000:]


def get(cluster, path):
    code, body = cluster.api("GET", path)
    return body if code == 200 else None


def patch(cluster, path, body):
    code, out = cluster.api("PATCH", path, body, content_type="application/merge-patch+json")
    assert code == 200, out
    return out


def adapter(status, name):
    return next((a for a in (status or {}).get("adapters") or [] if a["name"] == name), None)


@pytest.fixture
def replica_at_pod_ip(cluster):
    """Starts the fake runtime at the ready pod's IP (or, where the IP can't be added, on 127.0.0.1
    behind the operator's testing annotation) and returns it."""
    with ExitStack() as stack:

        def start(namespace: str, name: str) -> FakeReplica:
            pod = cluster.wait_for(
                lambda: next(
                    (
                        p
                        for p in cluster.pods(namespace, f"kubetune.io/adapterdeployment={name}")
                        if (p.get("status") or {}).get("podIP")
                    ),
                    None,
                ),
                "a serving pod with an IP",
                timeout=WAIT,
            )
            if stack.enter_context(address_on_loopback(pod["status"]["podIP"])):
                fake = FakeReplica(pod["status"]["podIP"], 8000)
            else:
                fake = FakeReplica()
                patch(
                    cluster,
                    f"{API}/namespaces/{namespace}/adapterdeployments/{name}",
                    {"metadata": {"annotations": {REPLICA_URLS_ANNOTATION: fake.url}}},
                )
            stack.callback(fake.close)
            return fake

        yield start


def test_adapterdeployment_serves_and_hot_swaps_adapters(cluster, namespace, operator, replica_at_pod_ip):
    ns = namespace
    ftj = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "trained"},
        "spec": {"model": {"uri": "hf://org/base"}, "dataset": {"uri": "s3://datasets/chat.jsonl", "format": "chat"},
                 "method": {"type": "lora"}, "hyperparameters": {"maxSteps": 1},
                 "runPolicy": {"suspend": True},
                 "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "1Gi"}, "output": {"uri": "s3://outputs/trained"}},
    }  # fmt: skip
    code, body = cluster.api("POST", f"{API}/namespaces/{ns}/finetunejobs", ftj)
    assert code == 201, body
    ad = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment",
        "metadata": {"name": "support"},
        "spec": {"baseModel": {"uri": "hf://org/base"}, "runtime": "builtin", "replicas": 1,
                 "resources": {"gpusPerReplica": 0, "cpu": "1", "memory": "1Gi"},
                 "adapters": [{"name": "legal", "uri": "s3://adapters/legal"}, {"name": "bad", "uri": "s3://adapters/bad"},
                              {"name": "v1", "fromJob": "trained"}]},
    }  # fmt: skip
    code, body = cluster.api("POST", f"{API}/namespaces/{ns}/adapterdeployments", ad)
    assert code == 201, body
    uid = body["metadata"]["uid"]
    ad_path = f"{API}/namespaces/{ns}/adapterdeployments/support"
    dep_path = f"/apis/apps/v1/namespaces/{ns}/deployments/support"

    dep = cluster.wait_for(lambda: get(cluster, dep_path), "Deployment created", timeout=WAIT)
    svc = get(cluster, f"/api/v1/namespaces/{ns}/services/support")
    for obj in (dep, svc):
        [ref] = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("AdapterDeployment", uid, True)
    command = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:4] == ["kubetune", "serve", "--model", "hf://org/base"] and "--adapter" not in command
    assert svc["spec"]["ports"][0]["port"] == 8000

    # The admin key: in an owned Secret (the operator wrote it and derives it again), mounted as a file.
    admin_key = keys.admin_key(OperatorConfig.from_env(), ns, "support", uid)
    secret = cluster.wait_for(lambda: get(cluster, f"/api/v1/namespaces/{ns}/secrets/support-admin-key"), "Secret")
    assert secret["metadata"]["ownerReferences"][0]["uid"] == uid
    assert base64.b64decode(secret["data"]["admin-key"]).decode() == admin_key
    assert command[command.index("--admin-key-file") + 1] == "/etc/kubetune/admin-key/admin-key"
    # The NetworkPolicy, as the API server stored it: the serving pods, their port, this namespace.
    policy = get(cluster, f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/support-serving")
    assert policy["metadata"]["ownerReferences"][0]["uid"] == uid
    assert policy["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}] and {"podSelector": {}} in rule["from"]

    def status_where(pred, what):
        def check():
            obj = get(cluster, ad_path)
            return obj if obj and pred(obj.get("status") or {}) else None

        try:
            return cluster.wait_for(check, what, timeout=WAIT)
        except Exception:
            print(json.dumps((get(cluster, ad_path) or {}).get("status"), indent=1))
            raise

    # The replicas' adapters file: every adapter with a URI; v1 not yet (its job has not succeeded).
    cm_path = f"/api/v1/namespaces/{ns}/configmaps/support-adapters"
    cm = get(cluster, cm_path)
    assert cm["metadata"]["ownerReferences"][0]["uid"] == uid
    assert parse_adapters_file(cm["data"]["adapters.json"]) == {
        "legal": "s3://adapters/legal",
        "bad": "s3://adapters/bad",
    }

    def waiting_for_job(s):
        ready = next((c for c in s.get("conditions") or [] if c["type"] == "AdaptersReady"), {})
        return ready.get("reason") == "WaitingForJob" and ready.get("status") == "False"

    status_where(waiting_for_job, "AdaptersReady=False, reason WaitingForJob")
    replica = replica_at_pod_ip(ns, "support")

    st = status_where(
        lambda s: (
            s.get("readyReplicas") == 1
            and (adapter(s, "legal") or {}).get("state") == "Loaded"
            and (adapter(s, "bad") or {}).get("state") == "Failed"
        ),
        "legal Loaded, bad Failed",
    )["status"]
    assert adapter(st, "bad")["message"] == BAD
    assert adapter(st, "v1")["state"] == "Pending" and "waiting for FineTuneJob trained" in adapter(st, "v1")["message"]
    assert st["endpoint"] == f"http://support.{ns}.svc:8000/v1"
    assert st["adaptersReady"] == "1/3"
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds["Available"] == "True" and conds["Degraded"] == "True" and conds["AdaptersReady"] == "False"
    assert ("load", "legal") in replica.calls and ("load", "v1") not in replica.calls
    assert replica.calls.count(("load", "bad")) == 1  # not retried for the same URI
    assert replica.auth == {f"Bearer {admin_key}"}

    template_before = get(cluster, dep_path)
    # Add an adapter and remove one: loaded and unloaded, without touching the pod template.
    patch(
        cluster,
        ad_path,
        {
            "spec": {
                "adapters": [
                    {"name": "bad", "uri": "s3://adapters/bad"},
                    {"name": "v1", "fromJob": "trained"},
                    {"name": "extra", "uri": "s3://adapters/extra"},
                ]
            }
        },
    )
    status_where(
        lambda s: (adapter(s, "extra") or {}).get("state") == "Loaded" and adapter(s, "legal") is None,
        "extra loaded, legal unloaded",
    )
    assert parse_adapters_file(get(cluster, cm_path)["data"]["adapters.json"]) == {
        "bad": "s3://adapters/bad",
        "extra": "s3://adapters/extra",
    }
    assert ("unload", "legal") in replica.calls and "legal" not in replica.adapters
    after = get(cluster, dep_path)
    assert after["metadata"]["generation"] == template_before["metadata"]["generation"]
    assert after["spec"]["template"] == template_before["spec"]["template"]

    # The FineTuneJob "succeeds" with an adapter URI that is not its own (anyone who may edit its
    # status can write one): refused, it reaches neither the replica nor the Deployment.
    now = "2026-01-01T00:00:00Z"
    succeeded = {"type": "Succeeded", "status": "True", "reason": "Completed", "message": "done",
                 "lastTransitionTime": now}  # fmt: skip
    job_status = f"{API}/namespaces/{ns}/finetunejobs/trained/status"
    patch(cluster, job_status, {"status": {"conditions": [succeeded], "adapter": {"uri": "pvc://payroll-db-data/"}}})
    st = status_where(lambda s: (adapter(s, "v1") or {}).get("state") == "Failed", "v1 Failed, untrusted")["status"]
    assert "not under its output s3://outputs/trained/adapter" in adapter(st, "v1")["message"]
    assert next(c for c in st["conditions"] if c["type"] == "AdaptersReady")["reason"] == "UntrustedAdapterSource"
    assert ("load", "v1") not in replica.calls
    assert "payroll-db-data" not in json.dumps(get(cluster, dep_path)["spec"])

    # Its own adapter, under its output: v1 loads from it.
    adapter_uri = "s3://outputs/trained/adapter"
    patch(cluster, job_status, {"status": {"adapter": {"uri": adapter_uri, "sha256": "ab" * 32}}})
    st = status_where(lambda s: (adapter(s, "v1") or {}).get("state") == "Loaded", "v1 loaded")["status"]
    assert adapter(st, "v1")["uri"] == adapter_uri and adapter(st, "v1")["loadedReplicas"] == 1
    assert replica.adapters["v1"] == adapter_uri
    assert parse_adapters_file(get(cluster, cm_path)["data"]["adapters.json"])["v1"] == adapter_uri
    assert get(cluster, dep_path)["spec"]["template"] == template_before["spec"]["template"]
    replica_sets = get(cluster, f"/apis/apps/v1/namespaces/{ns}/replicasets")["items"]
    assert len(replica_sets) == 1  # no rollout for any adapter change


def test_promotion_gate_loads_the_adapter_whose_evaluation_passes_and_rejects_the_other(
    cluster, namespace, operator, replica_at_pod_ip
):
    """One FineTuneJob, two adapters from it: `{rougeL.delta min 0.05}` holds and loads; the
    impossible `{rougeL.delta min 10}` is Rejected with the value and the rule, reaches neither the
    replica nor its adapters file, and says so in a Warning Event."""
    ns = namespace
    ftj = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "evaluated"},
        "spec": {"model": {"uri": "hf://org/base"}, "dataset": {"uri": "s3://datasets/chat.jsonl", "format": "chat"},
                 "method": {"type": "lora"}, "hyperparameters": {"maxSteps": 1}, "runPolicy": {"suspend": True},
                 "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "1Gi"},
                 "output": {"uri": "s3://outputs/evaluated"}},
    }  # fmt: skip
    code, body = cluster.api("POST", f"{API}/namespaces/{ns}/finetunejobs", ftj)
    assert code == 201, body
    ad = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment", "metadata": {"name": "gated"},
        "spec": {"baseModel": {"uri": "hf://org/base"}, "runtime": "builtin", "replicas": 1,
                 "resources": {"gpusPerReplica": 0, "cpu": "1", "memory": "1Gi"},
                 "adapters": [
                     {"name": "passes", "fromJob": "evaluated", "require": [{"metric": "rougeL.delta", "min": 0.05},
                                                                           {"metric": "forgettingRatio", "max": 1.15}]},
                     {"name": "impossible", "fromJob": "evaluated", "require": [{"metric": "rougeL.delta", "min": 10}]},
                 ]},
    }  # fmt: skip
    code, body = cluster.api("POST", f"{API}/namespaces/{ns}/adapterdeployments", ad)
    assert code == 201, body
    ad_path = f"{API}/namespaces/{ns}/adapterdeployments/gated"
    replica = replica_at_pod_ip(ns, "gated")

    def status_where(pred, what):
        def check():
            obj = get(cluster, ad_path)
            return obj if obj and pred(obj.get("status") or {}) else None

        try:
            return cluster.wait_for(check, what, timeout=WAIT)["status"]
        except Exception:
            print(json.dumps((get(cluster, ad_path) or {}).get("status"), indent=1))
            raise

    # Not finished: both wait, whatever a rule says.
    st = status_where(lambda s: (adapter(s, "impossible") or {}).get("state") == "Pending", "both waiting")
    assert adapter(st, "passes")["state"] == "Pending"

    adapter_uri = "s3://outputs/evaluated/adapter"
    evaluation = {"examples": 20, "seconds": 3.5, "tokensGenerated": 1200, "forgettingRatio": 1.04,
                  "metrics": {"rougeL": {"base": 0.18, "tuned": 0.31, "delta": 0.13}}}  # fmt: skip
    succeeded = {"type": "Succeeded", "status": "True", "reason": "Completed", "message": "done",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}  # fmt: skip
    patch(
        cluster,
        f"{API}/namespaces/{ns}/finetunejobs/evaluated/status",
        {"status": {"conditions": [succeeded], "adapter": {"uri": adapter_uri}, "evaluation": evaluation}},
    )
    st = status_where(
        lambda s: (
            (adapter(s, "passes") or {}).get("state") == "Loaded"
            and (adapter(s, "impossible") or {}).get("state") == "Rejected"
        ),
        "passes Loaded, impossible Rejected",
    )
    message = adapter(st, "impossible")["message"]
    assert message == (
        "FineTuneJob evaluated fails require: rougeL.delta is 0.13, required min 10; "
        "not loaded: retrain, or relax the rule"
    )
    assert adapter(st, "impossible")["loadedReplicas"] == 0 and "uri" not in adapter(st, "impossible")
    ready = next(c for c in st["conditions"] if c["type"] == "AdaptersReady")
    assert (ready["status"], ready["reason"]) == ("False", "AdapterRejected")
    assert next(c for c in st["conditions"] if c["type"] == "Degraded")["status"] == "False"
    assert st["adaptersReady"] == "1/2"
    assert replica.adapters == {"passes": adapter_uri}
    assert ("load", "impossible") not in replica.calls and replica.calls.count(("load", "passes")) == 1
    cm = get(cluster, f"/api/v1/namespaces/{ns}/configmaps/gated-adapters")
    assert parse_adapters_file(cm["data"]["adapters.json"]) == {"passes": adapter_uri}

    def rejection_events():
        events = get(cluster, f"/api/v1/namespaces/{ns}/events")["items"]
        return [e for e in events if e["involvedObject"].get("name") == "gated" and e["reason"] == "AdapterRejected"
                and e["message"].startswith("adapter impossible:")]  # fmt: skip

    [event] = cluster.wait_for(rejection_events, "an AdapterRejected Event", timeout=WAIT)
    assert event["type"] == "Warning" and event["message"] == f"adapter impossible: {message}"
    # The resync passes on (every 0.5 s): the adapter stays out, and is not announced again.
    time.sleep(3)
    assert len(rejection_events()) == 1 and ("load", "impossible") not in replica.calls
    assert adapter(get(cluster, ad_path)["status"], "impossible")["state"] == "Rejected"

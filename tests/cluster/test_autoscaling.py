"""Scaling an AdapterDeployment against the real control plane, with the operator's handlers in-process
(the `operator` fixture of test_adapterdeployment.py): `kubectl scale` through the CRD's scale
subresource grows the Deployment, and a new replica counts in status.readyReplicas only once it
serves every adapter (a fake runtime at each kwok pod's IP, as in test_adapterdeployment.py); the
HorizontalPodAutoscaler and PodDisruptionBudget the operator renders are accepted and owned, the
controller-manager's autoscaler drives spec.replicas through /scale, and removing `autoscaling`
deletes the autoscaler."""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest

from kubetune.api.adapterdeployment import IN_FLIGHT_METRIC
from kubetune_operator.adapterdeployment.adapters import REPLICA_URLS_ANNOTATION
from kubetune_operator.adapterdeployment.render import label_selector
from tests.cluster.pod_address import address_on_loopback
from tests.cluster.test_adapterdeployment import (
    API,
    WAIT,
    FakeReplica,
    adapter,
    get,
    operator,  # noqa: F401  (the fixture: its operator, in-process)
    patch,
)

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("operator")]

NAME = "support"
ADAPTERS = [{"name": "legal", "uri": "s3://adapters/legal"}, {"name": "billing", "uri": "s3://adapters/billing"}]
NOBODY = "http://127.0.0.1:9"  # nothing listens: a replica whose runtime is not answering yet


def adapter_deployment(**spec) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment", "metadata": {"name": NAME},
        "spec": {"baseModel": {"uri": "hf://org/base"}, "runtime": "builtin", "adapters": ADAPTERS,
                 "resources": {"gpusPerReplica": 0, "cpu": "100m", "memory": "128Mi"}, **spec},
    }  # fmt: skip


class Runtimes:
    """A fake runtime per serving pod, started when the test says: at the pod's IP where it can be
    added to lo, else on 127.0.0.1 behind the operator's testing annotation (pods in name order)."""

    def __init__(self, cluster, stack: ExitStack, namespace: str):
        self.cluster, self.stack, self.namespace = cluster, stack, namespace
        self.by_pod: dict[str, FakeReplica] = {}
        self.at_pod_ip: bool | None = None

    def pods(self, count: int) -> list[dict]:
        """The `count` serving pods, once each has an IP, sorted by name."""

        def ready():
            pods = [p for p in self.cluster.pods(self.namespace, label_selector(NAME)) if "deletionTimestamp"
                    not in p["metadata"] and (p.get("status") or {}).get("podIP")]  # fmt: skip
            return sorted(pods, key=lambda p: p["metadata"]["name"]) if len(pods) == count else None

        return self.cluster.wait_for(ready, f"{count} serving pods with an IP", timeout=WAIT)

    def start(self, pod: dict) -> FakeReplica:
        ip = pod["status"]["podIP"]
        if self.at_pod_ip is not False:
            self.at_pod_ip = self.stack.enter_context(address_on_loopback(ip))
        fake = FakeReplica(ip, 8000) if self.at_pod_ip else FakeReplica()
        self.stack.callback(fake.close)
        self.by_pod[pod["metadata"]["name"]] = fake
        if not self.at_pod_ip:
            self.annotate(self.pods(len(self.cluster.pods(self.namespace, label_selector(NAME)))))
        return fake

    def annotate(self, pods: list[dict]) -> None:
        names = [p["metadata"]["name"] for p in pods]
        urls = [self.by_pod[n].url if n in self.by_pod else NOBODY for n in names]
        path = f"{API}/namespaces/{self.namespace}/adapterdeployments/{NAME}"
        patch(self.cluster, path, {"metadata": {"annotations": {REPLICA_URLS_ANNOTATION: ",".join(urls)}}})


def status_where(cluster, path, pred, what, timeout=WAIT):
    def check():
        obj = get(cluster, path)
        return obj if obj and pred(obj.get("status") or {}) else None

    try:
        return cluster.wait_for(check, what, timeout=timeout)["status"]
    except Exception:
        print(json.dumps((get(cluster, path) or {}).get("status"), indent=1))
        raise


def every_adapter_loaded(status: dict) -> bool:
    return all((adapter(status, a["name"]) or {}).get("state") == "Loaded" for a in ADAPTERS)


def test_kubectl_scale_converges_and_new_replicas_count_once_they_serve_every_adapter(cluster, namespace):
    ns = namespace
    code, body = cluster.api("POST", f"{API}/namespaces/{ns}/adapterdeployments", adapter_deployment(replicas=1))
    assert code == 201, body
    ad_path = f"{API}/namespaces/{ns}/adapterdeployments/{NAME}"
    dep_path = f"/apis/apps/v1/namespaces/{ns}/deployments/{NAME}"
    with ExitStack() as stack:
        runtimes = Runtimes(cluster, stack, ns)
        cluster.wait_for(lambda: get(cluster, dep_path), "Deployment created", timeout=WAIT)
        [first] = runtimes.pods(1)
        runtimes.start(first)
        st = status_where(cluster, ad_path, lambda s: s.get("readyReplicas") == 1 and every_adapter_loaded(s),
                          "one replica ready with every adapter")  # fmt: skip
        assert st["replicas"] == 1 and st["selector"] == label_selector(NAME)

        scaled = cluster.kubectl("scale", "-n", ns, f"adapterdeployment/{NAME}", "--replicas", "3", check=False)
        assert scaled.returncode == 0, scaled.stderr
        code, scale = cluster.api("GET", f"{ad_path}/scale")
        assert code == 200 and scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3, scale
        assert get(cluster, ad_path)["spec"]["replicas"] == 3

        cluster.wait_for(lambda: (get(cluster, dep_path) or {}).get("spec", {}).get("replicas") == 3,
                         "Deployment scaled to 3", timeout=WAIT)  # fmt: skip
        cluster.wait_for(lambda: (get(cluster, dep_path).get("status") or {}).get("readyReplicas") == 3,
                         "3 kwok pods ready", timeout=WAIT)  # fmt: skip
        pods = runtimes.pods(3)
        new = [p for p in pods if p["metadata"]["name"] != first["metadata"]["name"]]
        late = new[1]
        runtimes.start(new[0])
        # Every pod is Ready to the kubelet, but the late replica's runtime has loaded nothing:
        # it does not count.
        st = status_where(cluster, ad_path, lambda s: s.get("replicas") == 3 and s.get("readyReplicas") == 2
                          and every_adapter_loaded(s), "3 replicas, 2 ready with every adapter")  # fmt: skip
        available = next(c for c in st["conditions"] if c["type"] == "Available")
        assert available["message"].startswith("3 of 3 replicas ready")
        fake = runtimes.start(late)
        st = status_where(cluster, ad_path, lambda s: s.get("readyReplicas") == 3 and every_adapter_loaded(s),
                          "3 replicas ready with every adapter")  # fmt: skip
        assert st["replicas"] == 3
        assert sorted(fake.adapters) == ["billing", "legal"]
        assert all(sorted(f.adapters) == ["billing", "legal"] for f in runtimes.by_pod.values())
        assert all(a["loadedReplicas"] == 3 for a in st["adapters"])

        code, scale = cluster.api("GET", f"{ad_path}/scale")
        assert code == 200 and scale["status"] == {"replicas": 3, "selector": label_selector(NAME)}, scale


def test_the_autoscaler_and_disruption_budget_are_accepted_owned_and_removed(cluster, namespace):
    ns = namespace
    autoscaling = {"minReplicas": 2, "maxReplicas": 4, "targetInFlightRequests": 5}
    spec = adapter_deployment(replicas=1, autoscaling=autoscaling)
    code, body = cluster.api("POST", f"{API}/namespaces/{ns}/adapterdeployments", spec)
    assert code == 201, body
    uid = body["metadata"]["uid"]
    ad_path = f"{API}/namespaces/{ns}/adapterdeployments/{NAME}"
    hpa_path = f"/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers/{NAME}"
    pdb_path = f"/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/{NAME}"

    hpa = cluster.wait_for(lambda: get(cluster, hpa_path), "HorizontalPodAutoscaler created", timeout=WAIT)
    pdb = cluster.wait_for(lambda: get(cluster, pdb_path), "PodDisruptionBudget created", timeout=WAIT)
    for obj in (hpa, pdb):
        [ref] = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("AdapterDeployment", NAME, uid, True)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment",
                                             "name": NAME}  # fmt: skip
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 4)
    [metric] = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == IN_FLIGHT_METRIC and metric["pods"]["target"]["averageValue"] == "5"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert (
        pdb["spec"]["selector"]["matchLabels"]
        == get(cluster, f"/apis/apps/v1/namespaces/{ns}/deployments/{NAME}")["spec"]["selector"]["matchLabels"]
    )

    # The controller-manager's autoscaler lifts spec.replicas to its minimum through /scale (no
    # metric needed for that), and the operator follows with the Deployment.
    cluster.wait_for(lambda: get(cluster, ad_path)["spec"]["replicas"] == 2, "the autoscaler scaled to 2", timeout=60)
    cluster.wait_for(
        lambda: (get(cluster, f"/apis/apps/v1/namespaces/{ns}/deployments/{NAME}") or {})["spec"]["replicas"] == 2,
        "Deployment at 2",
        timeout=WAIT,
    )

    # The rule's CEL half: a minimum above the maximum is refused at admission with the model's words.
    code, out = cluster.api(
        "PATCH", ad_path, {"spec": {"autoscaling": {"minReplicas": 5}}}, content_type="application/merge-patch+json"
    )
    assert code == 422 and "autoscaling.minReplicas must not exceed maxReplicas" in json.dumps(out), out

    # autoscaling removed: the autoscaler is deleted; spec.replicas stays where it left it.
    patch(cluster, ad_path, {"spec": {"autoscaling": None}})
    cluster.wait_for(lambda: get(cluster, hpa_path) is None, "HorizontalPodAutoscaler deleted", timeout=WAIT)
    assert get(cluster, ad_path)["spec"]["replicas"] == 2 and get(cluster, pdb_path) is not None
    # Down to one replica: the budget goes too.
    cluster.kubectl("scale", "-n", ns, f"adapterdeployment/{NAME}", "--replicas", "1")
    cluster.wait_for(lambda: get(cluster, pdb_path) is None, "PodDisruptionBudget deleted", timeout=WAIT)

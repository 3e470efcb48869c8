"""The local control plane itself: scheduling onto fake GPU nodes, pod lifecycles driven through
kwok, eviction, garbage collection, CRD CEL validation. If these fail, operator tests can't be trusted."""

from __future__ import annotations

import json
import uuid

import pytest

pytestmark = pytest.mark.cluster

GPU = "nvidia.com/gpu"
TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}


def gpu_pod(name: str, gpus: int, **extra_meta) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **extra_meta},
        "spec": {
            "restartPolicy": "Never",
            "tolerations": [TOLERATION],
            "containers": [
                {
                    "name": "trainer",
                    "image": "example.invalid/trainer:test",
                    "resources": {"limits": {GPU: str(gpus)}, "requests": {"cpu": "1", "memory": "1Gi"}},
                }
            ],
        },
    }


def job(name: str, template_annotations: dict | None = None, **spec) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": template_annotations or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "tolerations": [TOLERATION],
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "example.invalid/trainer:test",
                            "resources": {"limits": {GPU: "8"}},
                        }
                    ],
                },
            },
            **spec,
        },
    }


def job_condition(cluster, ns: str, name: str, type_: str) -> dict | None:
    j = cluster.get("job", name, ns)
    c = cluster.condition(j, type_) if j else None
    return c if c and c["status"] == "True" else None


def test_gpu_nodes(cluster):
    nodes = {n["metadata"]["name"]: n for n in cluster.get("nodes")["items"]}
    product = "nvidia.com/gpu.product"
    gpu = [n for n in nodes.values() if n["metadata"]["labels"].get(product) == "NVIDIA-H100-80GB-HBM3"]
    assert len(gpu) >= 2
    assert {n["metadata"]["labels"]["topology.kubernetes.io/zone"] for n in gpu} >= {"zone-a", "zone-b"}
    for n in gpu:
        assert n["status"]["allocatable"][GPU] == "8"
        assert n["status"]["capacity"][GPU] == "8"
        assert {"key": GPU, "value": "present", "effect": "NoSchedule"} in n["spec"]["taints"]
    assert any(GPU not in n["status"]["allocatable"] and not n["spec"].get("taints") for n in nodes.values())


def test_gpu_pod_is_scheduled_and_runs(cluster, namespace):
    cluster.apply(gpu_pod("eight", 8), namespace=namespace)
    pod = cluster.wait_pod_phase(namespace, "eight", "Running")
    node = cluster.get("node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.count"] == "8"
    assert pod["status"]["podIP"]
    assert cluster.condition(pod, "Ready")["status"] == "True"


def test_too_many_gpus_stays_pending_with_scheduler_reason(cluster, namespace):
    cluster.apply(gpu_pod("sixteen", 16), namespace=namespace)

    def unschedulable(p):
        c = cluster.condition(p, "PodScheduled")
        return c is not None and c["status"] == "False" and c.get("reason") == "Unschedulable"

    pod = cluster.wait_pod(namespace, "sixteen", unschedulable, "PodScheduled=False (Unschedulable)")
    assert pod["status"]["phase"] == "Pending"
    assert "Insufficient nvidia.com/gpu" in cluster.condition(pod, "PodScheduled")["message"]


def test_job_pod_driven_to_succeeded_completes_the_job(cluster, namespace):
    cluster.apply(job("train"), namespace=namespace)
    (pod,) = cluster.wait_job_pods(namespace, "train")
    name = pod["metadata"]["name"]
    cluster.wait_pod_phase(namespace, name, "Running")
    done = cluster.succeed_pod(namespace, name)
    assert done["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    cluster.wait_for(lambda: job_condition(cluster, namespace, "train", "Complete"), "Job Complete")
    assert cluster.get("job", "train", namespace)["status"]["succeeded"] == 1


def test_pod_driven_to_failed(cluster, namespace):
    cluster.apply(gpu_pod("crash", 8), namespace=namespace)
    pod = cluster.fail_pod(namespace, "crash", exit_code=3, reason="Error", message="CUDA error: out of memory")
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"], term["message"]) == (3, "Error", "CUDA error: out of memory")


def test_job_template_annotation_fails_the_job(cluster, namespace):
    # The annotation on the pod template: every pod of the Job fails by itself after 1 s.
    cluster.apply(
        job("doomed", {cluster.ANN_RESULT: "Failed", cluster.ANN_RESULT_AFTER: "1s", cluster.ANN_EXIT_CODE: "137"}),
        namespace=namespace,
    )
    cond = cluster.wait_for(lambda: job_condition(cluster, namespace, "doomed", "Failed"), "Job Failed")
    assert cond["reason"] == "BackoffLimitExceeded"


def test_evicted_pod_carries_disruption_target(cluster, namespace):
    hold = "kubetune.test/hold"
    cluster.apply(gpu_pod("victim", 8, finalizers=[hold]), namespace=namespace)
    cluster.wait_pod_phase(namespace, "victim", "Running")
    cluster.evict_pod(namespace, "victim")
    pod = cluster.wait_pod_phase(namespace, "victim", "Failed")  # kept by the finalizer
    cond = cluster.condition(pod, "DisruptionTarget")
    assert cond["status"] == "True" and cond["reason"] == "EvictionByEvictionAPI", cond
    assert pod["metadata"]["deletionTimestamp"]
    cluster.kubectl(
        "patch",
        "pod",
        "victim",
        "-n",
        namespace,
        "--type=json",
        "-p",
        json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]),
    )
    cluster.wait_pod_gone(namespace, "victim")


def test_evicted_job_pod_is_replaced_under_pod_failure_policy(cluster, namespace):
    # What a training operator relies on: a disruption is not the workload's failure.
    policy = {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    cluster.apply(job("resilient", podFailurePolicy=policy), namespace=namespace)
    (first,) = cluster.wait_job_pods(namespace, "resilient")
    cluster.wait_pod_phase(namespace, first["metadata"]["name"], "Running")
    cluster.evict_pod(namespace, first["metadata"]["name"])
    cluster.wait_pod_gone(namespace, first["metadata"]["name"])  # job controller dropped its finalizer

    def replacement():
        pods = [
            p for p in cluster.pods(namespace, "job-name=resilient") if p["metadata"]["uid"] != first["metadata"]["uid"]
        ]
        return pods[0] if pods else None

    second = cluster.wait_for(replacement, "replacement pod")
    cluster.succeed_pod(namespace, second["metadata"]["name"])
    cluster.wait_for(lambda: job_condition(cluster, namespace, "resilient", "Complete"), "Job Complete")
    assert cluster.get("job", "resilient", namespace)["status"].get("failed", 0) == 0


def test_garbage_collector_deletes_dependents(cluster, namespace):
    owner = json.loads(cluster.kubectl("create", "configmap", "owner", "-n", namespace, "-o", "json").stdout)
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "owned",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
                ],
            },
            "data": {"k": "v"},
        },
        namespace=namespace,
    )
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace, "--wait=false")
    cluster.wait_for(
        lambda: cluster.get("configmap", "owned", namespace) is None,
        "garbage collection of configmap/owned",
        timeout=60,
    )


def test_crd_cel_validation_rejects_bad_object(cluster):
    group = f"t{uuid.uuid4().hex[:8]}.kubetune.test"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"minReplicas": {"type": "integer"}, "replicas": {"type": "integer"}},
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "self.minReplicas <= self.replicas",
                                            "message": "minReplicas must not exceed replicas",
                                        }
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    cluster.apply(crd)
    try:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=30s")

        def widget(name, lo, hi):
            return json.dumps(
                {
                    "apiVersion": f"{group}/v1",
                    "kind": "Widget",
                    "metadata": {"name": name, "namespace": "default"},
                    "spec": {"minReplicas": lo, "replicas": hi},
                }
            )

        # The CRD's REST endpoint can lag Established by a moment: retry the good object.
        cluster.wait_for(
            lambda: cluster.kubectl("create", "-f", "-", input=widget("good", 1, 2), check=False).returncode == 0,
            "good widget created",
        )
        bad = cluster.kubectl("create", "-f", "-", input=widget("bad", 3, 2), check=False)
        assert bad.returncode != 0
        assert "minReplicas must not exceed replicas" in bad.stderr, bad.stderr
    finally:
        cluster.kubectl("delete", "crd", f"widgets.{group}", "--wait=false", check=False)

"""Stuck work explains itself: the reasons the Job controller, the scheduler and the kubelet give
become a FineTuneJob's Running condition and an AdapterDeployment's Available and Degraded
conditions, read back through the API server from the operator running in-process against the
control plane of tests/cluster/harness.py, with Stalled=True exactly for those only a person can
clear, each within a few resync intervals of Kubernetes saying it.

Where the control plane itself produces the reason, it does: the Job controller refused by the API
server for a PriorityClass that does not exist (FailedCreate), the scheduler finding no claim
(`persistentvolumeclaim "..." not found`), no node matching a node selector, or no node with
enough CPU. The kubelet's part is kwok's: the `kubetune-pod-waiting` stage of
tests/cluster/kwok-pod-stages.yaml (`cluster.hold_pod`) puts containers in the waiting states a
kubelet reports (ErrImagePull, ImagePullBackOff, InvalidImageName, CreateContainerConfigError,
CrashLoopBackOff with the last termination), and the fail stage ends one OOMKilled with exit 137.
A cluster started before that stage was added lacks it (kwok reads its stages at start): those
tests say NOT RUN until the cluster is restarted (`harness.py down && harness.py up`).
"""

from __future__ import annotations

import time

import pytest

from tests.cluster.test_operator import (
    INDEX,
    cond,
    cpu_tiny,
    create_ftj,
    get_ftj,
    gpu_job,
    job_pods,
    running_operator,
    wait_status,
)

pytestmark = pytest.mark.cluster

WAITING_STAGE = "kubetune-pod-waiting"

API = "/apis/kubetune.io/v1alpha1"
INTERVAL = 0.5  # the operator's resync interval in these tests (seconds)
# Kubernetes says it, then the operator's next refresh writes it: a few intervals on a busy 2-core
# machine (the Job controller's own retries are what take longest: 1 s, 2 s, ... between them).
WITHIN = 20.0


@pytest.fixture
def stuck_operator(cluster, crds, namespace, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.setenv("KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS", str(INTERVAL))
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "kubetune/trainer:test")
    with running_operator(namespace) as runner:
        yield runner


@pytest.fixture
def waiting_stage(cluster):
    """The kwok stage that plays a kubelet whose containers cannot start."""
    if not cluster.has_stage(WAITING_STAGE):
        pytest.skip(
            "cluster tier NOT RUN: the running cluster was started before the kwok stage kubetune-pod-waiting "
            "was added; restart it (python3 tests/cluster/harness.py down && python3 tests/cluster/harness.py up)"
        )


def three(obj: dict, *types: str) -> dict[str, tuple[str, str]]:
    return {t: (cond(obj, t).get("status", ""), cond(obj, t).get("reason", "")) for t in types}


def wait_running_reason(cluster, ns: str, name: str, reason: str, timeout: float = WITHIN) -> dict:
    """The FineTuneJob once Running=False says `reason`, with Stalled written for the same status."""

    def ok(obj: dict) -> bool:
        return cond(obj, "Running").get("reason") == reason and cond(obj, "Stalled").get("status") in ("True", "False")

    return wait_status(cluster, ns, name, ok, f"Running=False ({reason})", timeout)


def assert_stalled(obj: dict, reason: str, stalled: bool) -> None:
    running, ready, reconciling, stall = (cond(obj, t) for t in ("Running", "Ready", "Reconciling", "Stalled"))
    assert (running["status"], running["reason"]) == ("False", reason), running
    assert "\n" not in running["message"] and len(running["message"]) < 700
    if stalled:
        assert (stall["status"], stall["reason"], stall["message"]) == ("True", reason, running["message"])
        assert (ready["status"], ready["reason"]) == ("False", reason)
        assert reconciling["status"] == "False"
    else:
        assert stall["status"] == "False" and reconciling["status"] == "True", (stall, reconciling)
    assert obj["status"]["phase"] == "Admitted"


def rank0(cluster, ns: str, name: str, timeout: float = 30) -> dict:
    def check():
        pods = [p for p in job_pods(cluster, ns, name, "Running") if p["metadata"]["annotations"].get(INDEX) == "0"]
        return pods[0] if pods else None

    return cluster.wait_for(check, f"rank 0 of {ns}/{name} Running", timeout=timeout)


# --- the control plane's own reasons -------------------------------------------------------------


def test_a_missing_priority_class_is_the_job_controllers_failed_create(cluster, namespace, stuck_operator):
    """The Job controller's words, from an Event nothing else shows; Stalled until the class exists,
    and no longer once it does and the pods run."""
    ns = namespace
    klass = f"{ns}-training-high"  # cluster-scoped: named after this test's namespace, deleted after
    job = gpu_job("ranked")
    job["spec"]["resources"]["priorityClassName"] = klass
    create_ftj(cluster, ns, job)
    stuck = wait_running_reason(cluster, ns, "ranked", "FailedCreate")
    assert_stalled(stuck, "FailedCreate", stalled=True)
    message = cond(stuck, "Running")["message"]
    assert message.startswith("0/1 pods running; the Job controller cannot create pods: ")
    assert f"no PriorityClass with name {klass} was found" in message, message
    assert not job_pods(cluster, ns, "ranked")

    try:
        cluster.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": klass},
                       "value": 1000, "description": "test_stuck_work"})  # fmt: skip
        # The Job controller retries with a growing delay; then the pod runs and the stall is over.
        running = wait_status(
            cluster, ns, "ranked", lambda o: cond(o, "Running").get("status") == "True", "Running", timeout=60
        )
        assert three(running, "Stalled", "Reconciling") == {"Stalled": ("False", "Running"),
                                                             "Reconciling": ("True", "Running")}  # fmt: skip
    finally:
        cluster.kubectl("delete", "priorityclass", klass, "--ignore-not-found", "--wait=false", check=False)


def test_a_missing_claim_is_the_schedulers_not_found(cluster, namespace, stuck_operator):
    """examples/cpu-one-pod.yaml on a namespace without its claims."""
    ns = namespace
    create_ftj(cluster, ns, cpu_tiny("claims"))
    stuck = wait_running_reason(cluster, ns, "claims", "Unschedulable")
    assert_stalled(stuck, "Unschedulable", stalled=True)
    message = cond(stuck, "Running")["message"]
    [pod] = job_pods(cluster, ns, "claims")
    assert f"pod {pod['metadata']['name']} cannot be scheduled: " in message
    assert 'persistentvolumeclaim "' in message and "not found" in message, message


def test_no_node_matching_the_selector_needs_a_person(cluster, namespace, stuck_operator):
    ns = namespace
    job = gpu_job("nowhere")
    job["spec"]["resources"]["nodeSelector"] = {"kubetune.test/pool": "no-such-pool"}
    create_ftj(cluster, ns, job)
    stuck = wait_running_reason(cluster, ns, "nowhere", "Unschedulable")
    assert_stalled(stuck, "Unschedulable", stalled=True)
    assert "didn't match Pod's node affinity/selector" in cond(stuck, "Running")["message"]


def test_a_cluster_without_room_is_waited_for_not_stalled(cluster, namespace, stuck_operator):
    """More CPU than any node has: the scheduler says Insufficient cpu; work may finish, nodes may
    be added: Running says why, the job is Reconciling, not Stalled."""
    ns = namespace
    job = gpu_job("crowded")
    job["spec"]["resources"]["cpu"] = "500"
    create_ftj(cluster, ns, job)
    stuck = wait_running_reason(cluster, ns, "crowded", "Unschedulable")
    assert_stalled(stuck, "Unschedulable", stalled=False)
    message = cond(stuck, "Running")["message"]
    assert "Insufficient cpu" in message and "waiting for capacity" in message, message
    # Polled like a running job: still the same after more rounds, never Stalled meanwhile.
    time.sleep(4 * INTERVAL)
    assert three(get_ftj(cluster, ns, "crowded"), "Stalled")["Stalled"][0] == "False"


# --- the kubelet's reasons (kwok) ----------------------------------------------------------------

KUBELET = {
    "ErrImagePull": 'failed to pull and unpack image "docker.io/kubetune/trainer:nope": not found',
    "ImagePullBackOff": 'Back-off pulling image "docker.io/kubetune/trainer:nope"',
    "InvalidImageName": 'Failed to apply default image tag "Kubetune/Trainer": invalid reference format',
    "CreateContainerConfigError": "couldn't find key token in Secret {ns}/hf-token",
}


@pytest.mark.parametrize("reason", list(KUBELET))
def test_a_container_that_cannot_start_stalls_the_job(cluster, namespace, stuck_operator, waiting_stage, reason):
    ns = namespace
    create_ftj(cluster, ns, gpu_job("blocked"))
    pod = rank0(cluster, ns, "blocked")
    said = KUBELET[reason].format(ns=ns)
    cluster.hold_pod(ns, pod["metadata"]["name"], reason, said)
    stuck = wait_running_reason(cluster, ns, "blocked", reason)
    assert_stalled(stuck, reason, stalled=True)
    message = cond(stuck, "Running")["message"]
    assert message == f"0/1 pods running; pod {pod['metadata']['name']} container trainer: {reason}: {said}"


def test_out_of_memory_stalls_the_job_until_a_retry_runs(cluster, namespace, stuck_operator):
    """The trainer killed by the kernel (exit 137, OOMKilled): the Job retries after its back-off,
    and until then the job says why and waits on a person."""
    ns = namespace
    create_ftj(cluster, ns, gpu_job("hungry", backoffLimit=2))
    pod = rank0(cluster, ns, "hungry")
    cluster.fail_pod(ns, pod["metadata"]["name"], exit_code=137, reason="OOMKilled", message="")
    stuck = wait_running_reason(cluster, ns, "hungry", "OOMKilled", timeout=10)
    assert_stalled(stuck, "OOMKilled", stalled=True)
    message = cond(stuck, "Running")["message"]
    assert f"pod {pod['metadata']['name']} container trainer ran out of memory (exit 137 (OOMKilled)" in message


# --- AdapterDeployment ---------------------------------------------------------------------------


def adapterdeployment(cluster, ns: str, name: str, cpu: str = "1") -> dict:
    body = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment", "metadata": {"name": name},
        "spec": {"baseModel": {"uri": "hf://org/base"}, "runtime": "builtin", "replicas": 1,
                 "resources": {"gpusPerReplica": 0, "cpu": cpu, "memory": "1Gi"},
                 "adapters": [{"name": "legal", "uri": "s3://adapters/legal"}]},
    }  # fmt: skip
    code, out = cluster.api("POST", f"{API}/namespaces/{ns}/adapterdeployments", body)
    assert code == 201, out
    return out


def serving_pod(cluster, ns: str, name: str) -> dict:
    def ready():
        for p in cluster.pods(ns, f"kubetune.io/adapterdeployment={name}"):
            conditions = (p.get("status") or {}).get("conditions") or []
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return p
        return None

    return cluster.wait_for(ready, f"a ready serving pod of {ns}/{name}", timeout=30)


def wait_ad(cluster, ns: str, name: str, predicate, what: str, timeout: float = WITHIN) -> dict:
    path = f"{API}/namespaces/{ns}/adapterdeployments/{name}"

    def check():
        code, body = cluster.api("GET", path)
        return body if code == 200 and predicate(body) else None

    try:
        return cluster.wait_for(check, f"AdapterDeployment {ns}/{name}: {what}", timeout=timeout)
    except Exception:
        print(cluster.api("GET", path)[1].get("status"))
        raise


@pytest.mark.parametrize(
    "reason, said, last",
    [
        ("ErrImagePull", 'failed to pull and unpack image "docker.io/kubetune/serve:nope": not found', None),
        ("CrashLoopBackOff", "back-off 40s restarting failed container", (2, "Error", "unknown flag: --max-lora")),
    ],
)
def test_a_serving_replica_that_cannot_run_is_degraded_and_stalled(
    cluster, namespace, stuck_operator, waiting_stage, reason, said, last
):
    ns = namespace
    adapterdeployment(cluster, ns, "support")
    pod = serving_pod(cluster, ns, "support")
    name = pod["metadata"]["name"]
    cluster.hold_pod(ns, name, reason, said, last=last)

    # Both: the pod's diagnosis, and the Deployment controller's count of ready replicas (it may lag).
    def stalled_and_unavailable(o):
        return cond(o, "Stalled").get("reason") == reason and cond(o, "Available").get("status") == "False"

    stuck = wait_ad(cluster, ns, "support", stalled_and_unavailable, f"Stalled ({reason}), not Available")
    assert three(stuck, "Available", "Degraded", "Stalled", "Reconciling") == {
        "Available": ("False", reason), "Degraded": ("True", reason), "Stalled": ("True", reason),
        "Reconciling": ("False", "Stalled"),
    }  # fmt: skip
    available = cond(stuck, "Available")["message"]
    assert available.startswith(f"0 of 1 replicas ready; pod {name} container ")
    if last is None:
        assert available.endswith(f"{reason}: {said}")
    else:
        assert "keeps crashing, restarted 3 times; last exit 2 (Error): unknown flag: --max-lora" in available
    assert cond(stuck, "Degraded")["message"] == cond(stuck, "Stalled")["message"]
    assert stuck["status"]["observedGeneration"] == stuck["metadata"]["generation"]


def test_serving_pods_waiting_for_room_are_not_degraded(cluster, namespace, stuck_operator):
    ns = namespace
    adapterdeployment(cluster, ns, "roomy", cpu="500")
    unschedulable = lambda o: cond(o, "Available").get("reason") == "Unschedulable"  # noqa: E731
    stuck = wait_ad(cluster, ns, "roomy", unschedulable, "Available=False (Unschedulable)")
    assert cond(stuck, "Degraded").get("status") != "True" and cond(stuck, "Stalled")["status"] == "False"
    assert "Insufficient cpu" in cond(stuck, "Available")["message"]
    assert "waiting for capacity" in cond(stuck, "Available")["message"]

"""The operator in-process (kopf.testing.KopfRunner) against the real control plane of
tests/cluster/harness.py: kwok plays the kubelet, the controller-manager runs the Job controller and
the garbage collector, the scheduler places pods on the fake CPU and GPU nodes.

What is shown: admission (plan recorded, invalid specs and jobs that cannot fit refused without a
Job), the ConfigMap/Service/Job created once and owned by the FineTuneJob, conditions and phase
following the pods, progress scraped from a fake rank-0 metrics endpoint, the result read from
rank 0's termination message, suspend/resume and deadlines patched onto the Job, failures with
the trainer's reason, an evicted pod not counted as a restart, a restart of the operator mid-reconcile
converging without duplicates (and not failing a running job), a Job deleted by hand created
again, and deletion garbage-collecting everything (no finalizer).

Each test runs its own operator, watching only its own namespace. Rank 0's metrics come from a
tiny HTTP server on 127.0.0.1 named in the annotation kubetune.io/metrics-url (kwok pods have fake
IPs), which the operator honours only with KUBETUNE_OPERATOR_ALLOW_METRICS_URL_ANNOTATION=1.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from kopf.testing import KopfRunner

from kubetune_operator import metrics
from kubetune_operator.handlers import REGISTRY
from kubetune_operator.scrape import METRICS_URL_ANNOTATION
from kubetune_operator.state import ALLOW_METRICS_URL_ENV

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
FTJ_API = "/apis/kubetune.io/v1alpha1"
GPU = "nvidia.com/gpu"
TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
INDEX = "batch.kubernetes.io/job-completion-index"
SCRAPE_INTERVAL = "0.5"
WAIT = 30

TRAINER_METRICS = """\
# HELP kubetune_train_step Optimizer steps done.
# TYPE kubetune_train_step gauge
kubetune_train_step 42.0
kubetune_train_total_steps 60.0
kubetune_train_epoch 0.7
kubetune_train_loss 1.25
kubetune_train_eval_loss 1.5
kubetune_train_learning_rate 0.003
kubetune_train_tokens_per_second 812.5
kubetune_train_eta_seconds 120.0
kubetune_train_gpu_memory_bytes 0.0
"""


# ------------------------------------------------------------------------------------------------
# Manifests.


def cpu_tiny(name: str = "tiny-support") -> dict:
    """examples/cpu-one-pod.yaml's FineTuneJob (pvc:// model, data and output; CPU only)."""
    docs = yaml.safe_load_all((REPO / "examples" / "cpu-one-pod.yaml").read_text())
    [doc] = [d for d in docs if d and d["kind"] == "FineTuneJob"]
    doc["metadata"] = {"name": name}
    return doc


def gpu_job(name: str, model: str = "hf://Qwen/Qwen2.5-0.5B-Instruct", method: str = "lora", **run_policy) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": model},
            "dataset": {"uri": "s3://datasets/chat.jsonl", "format": "chat"},
            "method": {"type": method},
            "hyperparameters": {"maxSteps": 100, "globalBatchSize": 8, "microBatchSize": 1},
            "resources": {"gpusPerNode": 1, "cpu": "4", "memory": "16Gi", "tolerations": [TOLERATION]},
            "output": {"uri": f"s3://adapters/{name}"},
            "runPolicy": run_policy,
        },
    }


# ------------------------------------------------------------------------------------------------
# Cluster helpers.


def ftj_path(ns: str, name: str = "") -> str:
    return f"{FTJ_API}/namespaces/{ns}/finetunejobs" + (f"/{name}" if name else "")


def create_ftj(cluster, ns: str, obj: dict) -> dict:
    status, body = cluster.api("POST", ftj_path(ns), obj)
    assert status == 201, body
    return body


def get_ftj(cluster, ns: str, name: str) -> dict | None:
    status, body = cluster.api("GET", ftj_path(ns, name))
    return body if status == 200 else None


def patch_ftj(cluster, ns: str, name: str, patch: dict, subresource: str = "") -> dict:
    path = ftj_path(ns, name) + (f"/{subresource}" if subresource else "")
    status, body = cluster.api("PATCH", path, patch, content_type="application/merge-patch+json")
    assert status == 200, body
    return body


def cond(obj: dict | None, type_: str) -> dict:
    """The condition of `type_` ({} when absent)."""
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), {})


def wait_status(cluster, ns: str, name: str, predicate, what: str, timeout: float = WAIT) -> dict:
    def check():
        obj = get_ftj(cluster, ns, name)
        return obj if obj is not None and predicate(obj) else None

    try:
        return cluster.wait_for(check, f"FineTuneJob {ns}/{name}: {what}", timeout=timeout)
    except Exception:
        print(json.dumps((get_ftj(cluster, ns, name) or {}).get("status"), indent=1))
        raise


def wait_condition(cluster, ns, name, type_, status="True", reason=None, timeout: float = WAIT) -> dict:
    def ok(obj):
        c = cond(obj, type_)
        return c.get("status") == status and (reason is None or c.get("reason") == reason)

    return wait_status(cluster, ns, name, ok, f"{type_}={status}" + (f" ({reason})" if reason else ""), timeout)


def children(cluster, ns: str, name: str) -> dict[str, dict | None]:
    """The FineTuneJob's ConfigMap, Service and Job (None for each one absent)."""

    def get(path: str) -> dict | None:
        status, body = cluster.api("GET", path)
        return body if status == 200 else None

    return {
        "ConfigMap": get(f"/api/v1/namespaces/{ns}/configmaps/{name}-trainer-config"),
        "Service": get(f"/api/v1/namespaces/{ns}/services/{name}-workers"),
        "Job": get(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}"),
    }


def job_pods(cluster, ns: str, name: str, phase: str | None = None) -> list[dict]:
    pods = cluster.pods(ns, f"kubetune.io/job={name}")

    def live_in_phase(p: dict) -> bool:
        return p["status"].get("phase") == phase and not p["metadata"].get("deletionTimestamp")

    return [p for p in pods if phase is None or live_in_phase(p)]


def running_rank0(cluster, ns: str, name: str, timeout: float = WAIT) -> dict:
    def check():
        pods = [p for p in job_pods(cluster, ns, name, "Running") if p["metadata"]["annotations"].get(INDEX) == "0"]
        return pods[0] if pods else None

    return cluster.wait_for(check, f"rank 0 of {ns}/{name} Running", timeout=timeout)


def bound_claims(cluster, ns: str, *claims: str) -> list[str]:
    """PersistentVolumeClaims bound to hostPath PersistentVolumes made for them (kwok never mounts
    anything; the scheduler only needs the claims bound). Returns the PV names, to delete after.
    Binding takes the PV controller a few seconds; the test does not wait for it.
    The PVs go first and the claims only once the PV controller has seen them Available, or the
    binding would wait for the controller's next periodic sync (15 s)."""
    pvs = [f"{ns}-{claim}" for claim in claims]
    cluster.apply(*[{
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": f"/tmp/{pv}"},
                 "claimRef": {"namespace": ns, "name": claim}},
    } for pv, claim in zip(pvs, claims, strict=True)])  # fmt: skip
    for pv in pvs:
        cluster.wait_for(
            lambda v=pv: (cluster.get("pv", v) or {}).get("status", {}).get("phase") == "Available",
            f"volume {pv} available",
        )
    cluster.apply(*[{
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": ns},
        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                 "resources": {"requests": {"storage": "1Gi"}}},
    } for pv, claim in zip(pvs, claims, strict=True)])  # fmt: skip
    return pvs  # bound a few seconds later; the scheduler places the pod as soon as they are


def sample(name: str, **labels: str) -> float:
    """The operator's own metric (its registry is process-wide, so tests compare before and after)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def events_for(cluster, ns: str, name: str) -> list[dict]:
    r = cluster.kubectl("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json")
    return json.loads(r.stdout)["items"]


# ------------------------------------------------------------------------------------------------
# The operator, and a fake rank 0.


@contextmanager
def running_operator(namespace: str):
    with KopfRunner(["run", "--standalone", "--namespace", namespace], registry=REGISTRY, timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output[-5000:]


@pytest.fixture
def env(cluster, crds, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.setenv("KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS", SCRAPE_INTERVAL)
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "kubetune/trainer:test")
    monkeypatch.setenv(ALLOW_METRICS_URL_ENV, "1")


@pytest.fixture
def operator(env, namespace):
    with running_operator(namespace) as runner:
        yield runner


class FakeRank0:
    """A Prometheus endpoint on 127.0.0.1 serving `text` (None: answer 503)."""

    def __init__(self, text: str | None):
        self.text = text
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                body = (fake.text or "unavailable").encode()
                self.send_response(200 if fake.text is not None else 503)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def rank0():
    fake = FakeRank0(None)
    yield fake
    fake.close()


# ------------------------------------------------------------------------------------------------
# Tests.


def test_cpu_job_is_admitted_runs_reports_progress_and_succeeds(cluster, namespace, operator, rank0):
    pvs = bound_claims(cluster, namespace, "models", "datasets", "adapters")
    scrapes_ok = sample("kubetune_operator_metrics_scrapes_total", result="ok")
    scrapes_failed = sample("kubetune_operator_metrics_scrapes_total", result="error")
    reconciles = sample("kubetune_operator_reconciles_total", kind="FineTuneJob", result="ok")
    try:
        manifest = cpu_tiny()
        manifest["metadata"]["annotations"] = {METRICS_URL_ANNOTATION: rank0.url}
        ftj = create_ftj(cluster, namespace, manifest)
        uid = ftj["metadata"]["uid"]

        # Admission: the plan is recorded; the model's size is unknown (pvc://), and the message says so.
        admitted = wait_condition(cluster, namespace, "tiny-support", "Admitted")
        assert "without a GPU memory check" in cond(admitted, "Admitted")["message"]
        assert admitted["status"]["plan"]["worldSize"] == 1 and admitted["status"]["plan"]["microBatch"] == 8

        # The children exist, owned by the FineTuneJob (the controller reference the GC follows).
        def all_children():
            found = children(cluster, namespace, "tiny-support")
            return found if all(found.values()) else None

        for kind, obj in cluster.wait_for(all_children, "ConfigMap, Service and Job").items():
            [ref] = obj["metadata"]["ownerReferences"]
            owner = (ref["kind"], ref["uid"], ref["controller"], ref["blockOwnerDeletion"])
            assert owner == ("FineTuneJob", uid, True, True), kind

        # Pods run on the CPU node → Running; rank 0's metrics: 503 first (tolerated), then readings.
        pod = running_rank0(cluster, namespace, "tiny-support")
        assert pod["spec"]["nodeName"] == "cpu-node"
        running = wait_condition(cluster, namespace, "tiny-support", "Running", reason="PodsRunning")
        assert running["status"]["phase"] == "Running"

        def scrape_failure_told(obj):
            return "metrics unavailable" in cond(obj, "Running")["message"]

        wait_status(cluster, namespace, "tiny-support", scrape_failure_told, "the scrape failure told in Running")
        rank0.text = TRAINER_METRICS
        scraped = wait_status(
            cluster,
            namespace,
            "tiny-support",
            lambda o: o["status"].get("progress", {}).get("step") == 42,
            "progress scraped",
        )
        progress, metrics = scraped["status"]["progress"], scraped["status"]["metrics"]
        assert (progress["totalSteps"], progress["percent"], progress["epoch"]) == (60, 70, 0.7)
        assert datetime.fromisoformat(progress["eta"]) > datetime.now(UTC)
        assert metrics == {"trainLoss": 1.25, "evalLoss": 1.5, "learningRate": 0.003, "tokensPerSecond": 812.5}
        assert cond(scraped, "Running")["message"] == "1/1 pods running"  # the scrape note is gone
        assert cond(scraped, "Running")["lastTransitionTime"] == cond(running, "Running")["lastTransitionTime"]

        # rank 0 exits 0 with the trainer's JSON result → Succeeded, adapter and final metrics.
        result = {"phase": "Succeeded", "steps": 60,
                  "adapter": {"uri": "pvc://adapters/tiny-support/adapter", "sizeBytes": 1234, "sha256": "ab" * 32},
                  "metrics": {"trainLoss": 0.91, "evalLoss": 1.02, "tokensPerSecond": 900.0}}  # fmt: skip
        cluster.succeed_pod_with_message(namespace, pod, json.dumps(result))
        done = wait_status(
            cluster, namespace, "tiny-support", lambda o: o["status"].get("phase") == "Succeeded", "Succeeded"
        )
        status = done["status"]
        assert cond(done, "Succeeded")["status"] == "True" and cond(done, "Running")["reason"] == "Completed"
        assert status["adapter"] == result["adapter"]
        assert status["metrics"]["trainLoss"] == 0.91 and status["metrics"]["learningRate"] == 0.003
        assert status["progress"] == {"step": 60, "totalSteps": 60, "epoch": 0.7, "percent": 100}
        assert status["restarts"] == 0 and status["startTime"] and status["completionTime"]
        assert status["observedGeneration"] == done["metadata"]["generation"]
        assert not done["metadata"].get("finalizers")

        reasons = {e["reason"] for e in events_for(cluster, namespace, "tiny-support")}
        assert {"Admitted", "PodsRunning", "Completed"} <= reasons, reasons

        # The operator's own metrics counted all of it; failed scrapes were tolerated, not fatal.
        assert sample("kubetune_operator_metrics_scrapes_total", result="error") > scrapes_failed
        assert sample("kubetune_operator_metrics_scrapes_total", result="ok") > scrapes_ok
        assert sample("kubetune_operator_reconciles_total", kind="FineTuneJob", result="ok") > reconciles
        assert sample("kubetune_operator_reconcile_duration_seconds_count", kind="FineTuneJob") > 0
    finally:
        for pv in pvs:
            cluster.kubectl("delete", "pv", pv, "--wait=false", check=False)


def test_gpu_job_runs_on_a_gpu_node_and_an_eviction_is_not_a_restart(cluster, namespace, operator):
    gpu_hours = sample("kubetune_operator_gpu_hours_requested_total")
    create_ftj(cluster, namespace, gpu_job("gpu-lora"))
    admitted = wait_condition(cluster, namespace, "gpu-lora", "Admitted")
    plan = admitted["status"]["plan"]
    assert plan["strategy"] == "ddp" and plan["totalParams"] == 494_032_768 and 0 < plan["estimatedGpuMemoryGiB"] < 80

    first = running_rank0(cluster, namespace, "gpu-lora")
    assert first["spec"]["nodeName"].startswith("gpu-node-")
    assert first["spec"]["containers"][0]["resources"]["limits"][GPU] == "1"
    wait_condition(cluster, namespace, "gpu-lora", "Running")

    cluster.evict_pod(namespace, first["metadata"]["name"])
    second = cluster.wait_for(
        lambda: next((p for p in job_pods(cluster, namespace, "gpu-lora", "Running")
                      if p["metadata"]["name"] != first["metadata"]["name"]), None),
        "a replacement pod Running",
    )  # fmt: skip
    assert second["metadata"]["annotations"][INDEX] == "0"
    again = wait_condition(cluster, namespace, "gpu-lora", "Running")
    assert again["status"]["restarts"] == 0 and again["status"]["phase"] == "Running"
    job = cluster.get("job", "gpu-lora", namespace)
    assert not job["status"].get("failed")  # the podFailurePolicy ignored the disruption
    cluster.wait_for(
        lambda: sample("kubetune_operator_gpu_hours_requested_total") > gpu_hours,
        "GPU-hours counted while Running",
        timeout=5,
    )
    # The gauge is refreshed from the operator's index once per resync round.
    cluster.wait_for(
        lambda: sample("kubetune_operator_finetunejobs", phase="Running") >= 1,
        "the jobs-by-phase gauge counts the running job",
        timeout=10,
    )


def test_a_file_uri_fails_as_invalid_spec_and_creates_nothing(cluster, namespace, operator):
    text = (REPO / "examples" / "invalid" / "file-uri-in-cluster.yaml").read_text()
    manifest = yaml.safe_load(text)
    manifest["metadata"].pop("namespace")
    create_ftj(cluster, namespace, manifest)
    failed = wait_condition(cluster, namespace, "file-uri-in-cluster", "Failed", reason="InvalidSpec")
    assert failed["status"]["phase"] == "Failed"
    assert "file:// only works with `kubetune train` on your machine" in cond(failed, "Failed")["message"]
    assert cond(failed, "Admitted")["status"] == "False"
    time.sleep(1.5)  # nothing is created, now or on a later reconcile
    assert not any(children(cluster, namespace, "file-uri-in-cluster").values())
    warnings = [e for e in events_for(cluster, namespace, "file-uri-in-cluster") if e["type"] == "Warning"]
    assert any(e["reason"] == "InvalidSpec" for e in warnings)


def test_a_70b_full_fine_tune_on_one_gpu_is_refused_with_advice(cluster, namespace, operator):
    create_ftj(cluster, namespace, gpu_job("llama70b", model="hf://meta-llama/Llama-3.1-70B", method="full"))
    failed = wait_condition(cluster, namespace, "llama70b", "Failed", reason="InsufficientGpuMemory")
    message = cond(failed, "Failed")["message"]
    assert "80 GiB" in message and "qlora" in message and "fsdp over" in message, message
    assert failed["status"]["phase"] == "Failed" and failed["status"]["plan"]["totalParams"] == 70_553_706_496
    time.sleep(1)
    assert cluster.get("job", "llama70b", namespace) is None


def test_suspend_resume_and_deadline_are_patched_onto_the_job(cluster, namespace, operator):
    create_ftj(cluster, namespace, gpu_job("pausable"))
    running_rank0(cluster, namespace, "pausable")
    wait_condition(cluster, namespace, "pausable", "Running")

    patch_ftj(cluster, namespace, "pausable", {"spec": {"runPolicy": {"suspend": True, "activeDeadlineSeconds": 7200}}})
    cluster.wait_for(
        lambda: (cluster.get("job", "pausable", namespace) or {}).get("spec", {}).get("suspend") is True,
        "Job suspended",
    )
    suspended = wait_condition(cluster, namespace, "pausable", "Suspended", reason="Suspended")
    assert suspended["status"]["phase"] == "Suspended" and cond(suspended, "Running")["status"] == "False"
    cluster.wait_for(lambda: not job_pods(cluster, namespace, "pausable", "Running"), "the pods stopped")
    first = cluster.get("job", "pausable", namespace)
    assert first["spec"]["activeDeadlineSeconds"] == 7200

    # While suspended, resources may change: the Job (whose pod template cannot) is replaced.
    patch_ftj(cluster, namespace, "pausable", {"spec": {"resources": {"cpu": "6"}}})
    replaced = cluster.wait_for(
        lambda: (lambda j: j if j and j["metadata"]["uid"] != first["metadata"]["uid"] else None)(
            cluster.get("job", "pausable", namespace)), "the Job replaced")  # fmt: skip
    assert replaced["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "6"
    assert replaced["spec"]["suspend"] is True and replaced["spec"]["activeDeadlineSeconds"] == 7200

    patch_ftj(cluster, namespace, "pausable", {"spec": {"runPolicy": {"suspend": False}}})
    resumed = wait_condition(cluster, namespace, "pausable", "Suspended", status="False", reason="Resumed")
    assert resumed["status"]["observedGeneration"] == resumed["metadata"]["generation"]
    pod = running_rank0(cluster, namespace, "pausable")
    assert pod["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "6"
    wait_condition(cluster, namespace, "pausable", "Running")
    assert cluster.get("job", "pausable", namespace)["spec"]["suspend"] is False

    # A deadline changes on a running Job too.
    patch_ftj(cluster, namespace, "pausable", {"spec": {"runPolicy": {"activeDeadlineSeconds": 3600}}})
    cluster.wait_for(
        lambda: cluster.get("job", "pausable", namespace)["spec"].get("activeDeadlineSeconds") == 3600,
        "deadline patched",
    )


def test_a_trainer_failure_reports_the_trainers_reason_and_the_message(cluster, namespace, operator):
    create_ftj(cluster, namespace, gpu_job("doomed"))
    pod = running_rank0(cluster, namespace, "doomed")
    # Exit code 2 means bad input: the podFailurePolicy fails the Job at once, without retries. The
    # trainer's termination message says why, as JSON.
    error = json.dumps({"phase": "Failed", "reason": "InvalidInput", "message": "dataset row 3: no 'messages' key"})
    cluster.fail_pod(namespace, pod["metadata"]["name"], exit_code=2, message=error)
    failed = wait_condition(cluster, namespace, "doomed", "Failed", reason="InvalidInput")  # the trainer's reason
    message = cond(failed, "Failed")["message"]
    assert "exited 2" in message and "InvalidInput: dataset row 3: no 'messages' key" in message, message
    assert "FailJob" in message  # and the Job's own words: its podFailurePolicy rule
    assert failed["status"]["restarts"] == 0  # failed at once: no retry
    assert failed["status"]["phase"] == "Failed" and failed["status"]["completionTime"]


def test_an_operator_restart_mid_reconcile_creates_nothing_twice(cluster, namespace, env):
    with running_operator(namespace):
        create_ftj(cluster, namespace, gpu_job("restarted"))
        cluster.wait_for(lambda: cluster.get("job", "restarted", namespace), "Job created")
    # The first operator is gone. Make it look as if it had died right after creating the children:
    # no status, none of kopf's annotations, so the next operator sees a brand-new object.
    job_uid = cluster.get("job", "restarted", namespace)["metadata"]["uid"]
    ftj = get_ftj(cluster, namespace, "restarted")
    kopf_keys = [k for k in ftj["metadata"].get("annotations", {}) if k.startswith("kopf.kubetune.io/")]
    assert kopf_keys, ftj["metadata"]
    patch_ftj(cluster, namespace, "restarted", {"metadata": {"annotations": dict.fromkeys(kopf_keys)}})
    patch_ftj(cluster, namespace, "restarted", {"status": None}, subresource="status")
    assert not (get_ftj(cluster, namespace, "restarted").get("status") or {}).get("conditions")

    with running_operator(namespace):
        wait_condition(cluster, namespace, "restarted", "Admitted")
        running_rank0(cluster, namespace, "restarted")
        wait_condition(cluster, namespace, "restarted", "Running")
    assert cluster.get("job", "restarted", namespace)["metadata"]["uid"] == job_uid
    for kind, path in (("configmaps", "restarted-trainer-config"), ("services", "restarted-workers")):
        items = cluster.api("GET", f"/api/v1/namespaces/{namespace}/{kind}")[1]["items"]
        assert [i["metadata"]["name"] for i in items if i["metadata"]["name"].startswith("restarted")] == [path]
    assert len(cluster.get("jobs", namespace=namespace)["items"]) == 1
    assert len(job_pods(cluster, namespace, "restarted")) == 1


def test_a_running_job_keeps_its_admission_across_a_restart(cluster, namespace, env):
    with running_operator(namespace):
        create_ftj(cluster, namespace, gpu_job("steady"))
        running_rank0(cluster, namespace, "steady")
        before = wait_condition(cluster, namespace, "steady", "Running")
    # While no operator runs, something changes the job's admission (here: its stated model size;
    # a newer planner would do the same). The resumed operator must not fail a running job.
    status, _ = cluster.api("PATCH", ftj_path(namespace, "steady"), {"metadata": {"annotations": {
        "kubetune.io/model-params": "700B"}}}, content_type="application/merge-patch+json")  # fmt: skip
    assert status == 200
    with running_operator(namespace):
        time.sleep(2)  # resume handler + a few resync rounds
        after = get_ftj(cluster, namespace, "steady")
    assert after["status"]["phase"] == "Running" and not cond(after, "Failed")
    assert cond(after, "Admitted") == cond(before, "Admitted")


def test_deleting_the_finetunejob_garbage_collects_everything_and_a_lost_job_is_recreated(cluster, namespace, operator):
    create_ftj(cluster, namespace, gpu_job("short-lived"))
    running_rank0(cluster, namespace, "short-lived")
    wait_condition(cluster, namespace, "short-lived", "Running")
    assert not get_ftj(cluster, namespace, "short-lived")["metadata"].get("finalizers")

    # A Job deleted by hand under a running FineTuneJob is created again.
    old_uid = cluster.get("job", "short-lived", namespace)["metadata"]["uid"]
    cluster.kubectl("delete", "job", "short-lived", "-n", namespace, "--wait=false")
    cluster.wait_for(lambda: (cluster.get("job", "short-lived", namespace) or {"metadata": {"uid": old_uid}})
                     ["metadata"]["uid"] != old_uid, "the Job created again")  # fmt: skip

    status, _ = cluster.api("DELETE", ftj_path(namespace, "short-lived"))
    assert status == 200
    assert get_ftj(cluster, namespace, "short-lived") is None  # no finalizer held it back
    cluster.wait_for(
        lambda: not any(children(cluster, namespace, "short-lived").values()),
        "ConfigMap, Service and Job garbage-collected",
        timeout=60,
    )
    cluster.wait_for(lambda: not job_pods(cluster, namespace, "short-lived"), "pods gone", timeout=60)

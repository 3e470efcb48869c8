"""The operator against hostile input, on the real control plane of tests/cluster/harness.py: what a
FineTuneJob's author, or its pods, can send the operator must end in a condition with a reason,
never in an exception loop or a stalled status.

* rank 0's termination message nested 2,000 deep: the job leaves Running (the result is unusable,
  so the adapter is assumed at its known path, and the condition says why);
* rank 0 reporting an adapter outside the job's output: Failed, reason UntrustedResult;
* annotation kubetune.io/model-params "1e999": admitted without the memory check, with a note;
* an image outside the operator's allow-list: not admitted, no Job created;
* a metrics endpoint that drips bytes: the scrape gives up at its deadline and says so;
* the training pods' NetworkPolicy as rendered is accepted by the API server.

Each test runs its own operator (in-process, kopf.testing.KopfRunner) watching only its namespace.
Rank 0's metrics come from a server on 127.0.0.1 named in the annotation kubetune.io/metrics-url.
"""

from __future__ import annotations

import time

import pytest
from kopf.testing import KopfRunner

from kubetune.api import FineTuneJob
from kubetune_operator.config import OperatorConfig
from kubetune_operator.finetunejob.render import render_network_policy
from kubetune_operator.handlers import REGISTRY
from kubetune_operator.scrape import METRICS_URL_ANNOTATION
from kubetune_operator.state import ALLOW_METRICS_URL_ENV
from tests.hostile_http import drip, endpoint

pytestmark = pytest.mark.cluster

FTJ_API = "/apis/kubetune.io/v1alpha1"
INDEX = "batch.kubernetes.io/job-completion-index"
WAIT = 30


def cpu_job(name: str, annotations: dict | None = None, **spec) -> dict:
    """A CPU-only FineTuneJob reading from s3:// and hf:// (no claims to bind)."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"uri": "s3://datasets/chat.jsonl", "format": "chat"},
            "hyperparameters": {"maxSteps": 10, "globalBatchSize": 8},
            "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "1Gi"},
            "output": {"uri": f"s3://adapters/{name}"},
            **spec,
        },
    }


def ftj_path(ns: str, name: str = "") -> str:
    return f"{FTJ_API}/namespaces/{ns}/finetunejobs" + (f"/{name}" if name else "")


def create(cluster, ns: str, obj: dict) -> None:
    code, body = cluster.api("POST", ftj_path(ns), obj)
    assert code == 201, body


def cond(obj: dict | None, type_: str) -> dict:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def wait_condition(cluster, ns: str, name: str, type_: str, status: str = "True", timeout: float = WAIT) -> dict:
    def check():
        code, obj = cluster.api("GET", ftj_path(ns, name))
        return obj if code == 200 and cond(obj, type_).get("status") == status else None

    return cluster.wait_for(check, f"FineTuneJob {ns}/{name}: {type_}={status}", timeout=timeout)


def running_rank0(cluster, ns: str, name: str) -> dict:
    def check():
        pods = cluster.pods(ns, f"kubetune.io/job={name}")
        live = [p for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
        return next((p for p in live if p["metadata"]["annotations"].get(INDEX) == "0"), None)

    return cluster.wait_for(check, f"rank 0 of {ns}/{name} Running", timeout=WAIT)


@pytest.fixture
def operator(cluster, crds, namespace, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.setenv("KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS", "1")
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "kubetune/trainer:test")
    monkeypatch.setenv("KUBETUNE_OPERATOR_NAMESPACE", namespace)
    monkeypatch.setenv(ALLOW_METRICS_URL_ENV, "1")
    with KopfRunner(["run", "--standalone", "--namespace", namespace], registry=REGISTRY, timeout=90) as runner:
        yield runner
    assert runner.exception is None, runner.output[-5000:]
    assert "Traceback" not in runner.output, runner.output[-5000:]


def test_a_termination_message_nested_2000_deep_does_not_wedge_the_job(cluster, namespace, operator):
    create(cluster, namespace, cpu_job("deep"))
    cluster.succeed_pod_with_message(namespace, running_rank0(cluster, namespace, "deep"), "[" * 2000 + "]" * 2000)
    done = wait_condition(cluster, namespace, "deep", "Succeeded")
    assert done["status"]["phase"] == "Succeeded"
    assert "nested deeper than" in cond(done, "Succeeded")["message"]


def test_an_adapter_reported_outside_the_output_fails_the_job_as_untrusted(cluster, namespace, operator):
    create(cluster, namespace, cpu_job("liar"))
    message = '{"phase":"Succeeded","adapter":{"uri":"pvc://payroll-db-data/"},"metrics":{"evalLoss":1e999}}'
    cluster.succeed_pod_with_message(namespace, running_rank0(cluster, namespace, "liar"), message)
    failed = wait_condition(cluster, namespace, "liar", "Failed")
    assert cond(failed, "Failed")["reason"] == "UntrustedResult"
    assert "payroll-db-data" in cond(failed, "Failed")["message"] and "adapter" not in failed["status"]


@pytest.mark.parametrize("params", ["1e999", "nan", "9" * 400])
def test_a_hostile_model_params_annotation_is_admitted_with_a_note(cluster, namespace, operator, params):
    name = "params"
    create(cluster, namespace, cpu_job(name, {"kubetune.io/model-params": params}))
    admitted = wait_condition(cluster, namespace, name, "Admitted")
    assert "not a parameter count" in cond(admitted, "Admitted")["message"]


def test_an_image_outside_the_allow_list_is_not_admitted(cluster, namespace, operator):
    create(cluster, namespace, cpu_job("miner", image="docker.io/evil/miner:latest"))
    refused = wait_condition(cluster, namespace, "miner", "Admitted", "False")
    assert refused["status"]["phase"] == "Failed"
    assert "'docker.io/evil/miner:latest' is not allowed" in cond(refused, "Failed")["message"]
    assert "config.allowedImages" in cond(refused, "Failed")["message"]
    time.sleep(1)  # a Job, had one been made, would be there by now
    code, _ = cluster.api("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/miner")
    assert code == 404


def test_a_dripping_metrics_endpoint_is_cut_off_at_the_deadline(cluster, namespace, operator):
    with endpoint(lambda handler, stop: drip(handler, stop, seconds=60)) as url:
        create(cluster, namespace, cpu_job("drip", {METRICS_URL_ANNOTATION: url}))
        running_rank0(cluster, namespace, "drip")
        started = time.monotonic()

        def noted():
            code, obj = cluster.api("GET", ftj_path(namespace, "drip"))
            message = cond(obj, "Running").get("message", "") if code == 200 else ""
            return obj if "training metrics unavailable" in message else None

        obj = cluster.wait_for(noted, "the Running condition to tell of the failed scrape", timeout=20)
        assert "within" in cond(obj, "Running")["message"]
        assert time.monotonic() - started < 20


def test_the_api_server_accepts_the_training_network_policy(cluster, namespace):
    job = FineTuneJob.model_validate({**cpu_job("np"), "metadata": {"name": "np", "namespace": namespace, "uid": "u"}})
    policy = render_network_policy(job, OperatorConfig(operator_namespace="kubetune-system"))
    path = f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies?dryRun=All&fieldValidation=Strict"
    code, body = cluster.api("POST", path, policy)
    assert code == 201, body
    assert body["spec"]["ingress"] == policy["spec"]["ingress"]

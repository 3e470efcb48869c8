"""The operator image against the real control plane (tests/cluster/harness.py): the container
runs `kubetune operator` with a kubeconfig, as the chart's Deployment does with its service account,
and a FineTuneJob applied with the API becomes its ConfigMap, Service and Indexed Job, with status.

The control plane's nodes are kwok's, so the Job's pods are not run here; the pods themselves are
run in the trainer image by test_images.py."""

from __future__ import annotations

import uuid

import pytest
import yaml

from .conftest import OPERATOR_IMAGE, REPO, docker

pytestmark = pytest.mark.e2e

API = "/apis/kubetune.io/v1alpha1"


def cpu_tiny(name: str) -> dict:
    """examples/cpu-one-pod.yaml's FineTuneJob."""
    docs = yaml.safe_load_all((REPO / "examples" / "cpu-one-pod.yaml").read_text())
    [doc] = [d for d in docs if d and d["kind"] == "FineTuneJob"]
    doc["metadata"] = {"name": name}
    return doc


@pytest.fixture
def operator_container(cluster, crds, namespace):  # noqa: F811
    """`kubetune operator -n NAMESPACE` in the operator image, on the host's network (the API server
    listens on 127.0.0.1), with the test cluster's kubeconfig mounted read-only."""
    name = f"kubetune-e2e-operator-{uuid.uuid4().hex[:8]}"
    cluster.kubeconfig.chmod(0o644)  # read by the image's user; the file holds a test cluster's credentials
    docker(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "-v",
        f"{cluster.kubeconfig}:/etc/kubetune/kubeconfig:ro",
        "-e",
        "KUBECONFIG=/etc/kubetune/kubeconfig",
        OPERATOR_IMAGE,
        "operator",
        "-n",
        namespace,
        "--metrics-port",
        "0",
    )
    yield name
    logs = docker("logs", "--tail", "60", name, check=False)
    docker("rm", "-f", name, check=False)
    print(f"\noperator container logs (last 60 lines):\n{logs.stdout}{logs.stderr}")


def test_the_operator_image_reconciles_a_finetunejob(cluster, namespace, operator_container):  # noqa: F811
    status, body = cluster.api("POST", f"{API}/namespaces/{namespace}/finetunejobs", cpu_tiny("tiny"))
    assert status == 201, body
    job = cluster.wait_for(lambda: cluster.get("job", "tiny", namespace), "the Indexed Job", timeout=60)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    assert cluster.get("configmap", "tiny-trainer-config", namespace)
    assert cluster.get("service", "tiny-workers", namespace)

    def admitted():
        ftj = cluster.api("GET", f"{API}/namespaces/{namespace}/finetunejobs/tiny")[1]
        conditions = {c["type"]: c for c in (ftj.get("status") or {}).get("conditions") or []}
        return ftj if conditions.get("Admitted", {}).get("status") == "True" else None

    ftj = cluster.wait_for(admitted, "the FineTuneJob Admitted by the containerised operator", timeout=60)
    assert ftj["status"]["plan"]["worldSize"] >= 1
    assert docker("inspect", "-f", "{{.State.Status}}", operator_container).stdout.strip() == "running"

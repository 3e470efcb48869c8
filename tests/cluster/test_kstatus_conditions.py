"""Ready, Reconciling and Stalled as a kstatus reader (Flux, kpt) sees them: read back through the
API server from FineTuneJobs the operator handles on the control plane of tests/cluster/harness.py,
each at the object's current generation (a spec edit moves them along), and none of them the
subject of an Event of its own."""

from __future__ import annotations

import pytest

from tests.cluster.test_operator import (
    cond,
    create_ftj,
    events_for,
    gpu_job,
    patch_ftj,
    running_operator,
    running_rank0,
    wait_condition,
    wait_status,
)

pytestmark = pytest.mark.cluster

KSTATUS = ("Ready", "Reconciling", "Stalled")


@pytest.fixture
def kstatus_operator(cluster, crds, namespace, monkeypatch):
    """The operator in-process, watching only this test's namespace (as in test_operator.py)."""
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "kubetune/trainer:test")
    with running_operator(namespace) as runner:
        yield runner


def three(obj: dict) -> dict[str, tuple[str, str]]:
    return {t: (cond(obj, t).get("status", ""), cond(obj, t).get("reason", "")) for t in KSTATUS}


def current(obj: dict) -> bool:
    """Each of the three written for the object's generation, as is status.observedGeneration."""
    generation = obj["metadata"]["generation"]
    status = obj.get("status") or {}
    return status.get("observedGeneration") == generation and all(
        cond(obj, t).get("observedGeneration") == generation for t in KSTATUS
    )


def no_events_of_their_own(cluster, namespace: str, name: str) -> None:
    messages = [e.get("message", "") for e in events_for(cluster, namespace, name)]
    assert messages and not [m for m in messages if m.split("=")[0] in KSTATUS], messages


def test_a_running_job_is_reconciling_then_suspended_at_the_new_generation(cluster, namespace, kstatus_operator):
    create_ftj(cluster, namespace, gpu_job("watched"))
    running_rank0(cluster, namespace, "watched")
    running = wait_condition(cluster, namespace, "watched", "Reconciling", reason="Running")
    assert three(running) == {"Ready": ("False", "Running"), "Reconciling": ("True", "Running"),
                              "Stalled": ("False", "Running")}  # fmt: skip
    assert current(running) and running["metadata"]["generation"] == 1
    types = [c["type"] for c in running["status"]["conditions"]]
    assert [t for t in types if t not in KSTATUS] == ["Admitted", "Running"] and set(KSTATUS) <= set(types)

    patch_ftj(cluster, namespace, "watched", {"spec": {"runPolicy": {"suspend": True}}})
    suspended = wait_status(
        cluster,
        namespace,
        "watched",
        lambda o: cond(o, "Ready").get("reason") == "Suspended" and current(o),
        "Ready=False (Suspended) at generation 2",
    )
    assert suspended["metadata"]["generation"] == 2
    assert three(suspended)["Reconciling"] == ("False", "Suspended") and three(suspended)["Stalled"][0] == "False"
    no_events_of_their_own(cluster, namespace, "watched")


def test_a_refused_job_is_stalled_with_the_refusals_reason(cluster, namespace, kstatus_operator):
    create_ftj(cluster, namespace, gpu_job("too-big", model="hf://meta-llama/Llama-3.1-70B", method="full"))
    refused = wait_condition(cluster, namespace, "too-big", "Stalled", reason="InsufficientGpuMemory")
    assert three(refused) == {"Ready": ("False", "InsufficientGpuMemory"), "Reconciling": ("False", "Failed"),
                              "Stalled": ("True", "InsufficientGpuMemory")}  # fmt: skip
    assert current(refused)
    assert cond(refused, "Stalled")["message"] == cond(refused, "Failed")["message"]
    no_events_of_their_own(cluster, namespace, "too-big")

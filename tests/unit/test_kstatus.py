"""Ready, Reconciling and Stalled on both kinds, the conditions kstatus readers (Flux, kpt, and
anything built on sigs.k8s.io/cli-utils/pkg/kstatus) look at: every FineTuneJob phase and reason
and every AdapterDeployment situation gives the expected three, with observedGeneration current and
lastTransitionTime moving only on a flip; kstatus's own rules (`kstatus` below, after cli-utils
v0.37.2's `status.Compute`) read each of them as Current, InProgress or Failed; and none of the
three posts an Event of its own."""

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune.api.adapterdeployment import AdapterDeploymentStatus
from kubetune.api.finetunejob import FineTuneJobStatus
from kubetune_operator import conditions as c
from kubetune_operator.adapterdeployment import status as ads
from kubetune_operator.adapterdeployment.adapters import Replica, Wanted
from kubetune_operator.finetunejob import status as s
from kubetune_operator.writes import write_status
from tests.unit.test_status import RESULT, admitted, complete, derive, ftj, job_cond, pod, workload

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(minutes=1)
CURRENT, IN_PROGRESS, FAILED = "Current", "InProgress", "Failed"


# --- kstatus's rules -----------------------------------------------------------------------------


def kstatus(generation: int, status: dict[str, Any]) -> str:
    """kstatus's reading of a custom resource (cli-utils, pkg/kstatus/status: `Compute`, with
    `checkGenericProperties`, `checkGeneration` and `checkReadyCondition`). status.observedGeneration
    other than metadata.generation is InProgress; then the first condition in the list that is
    Reconciling=True gives InProgress and Stalled=True gives Failed; failing those, a Ready condition
    decides (True: Current, False or Unknown: InProgress); no condition of these is Current.
    (Terminating, from a deletionTimestamp, does not concern status.)"""
    if "observedGeneration" in status and status["observedGeneration"] != generation:
        return IN_PROGRESS
    for condition in status.get("conditions") or []:
        if condition["type"] == c.RECONCILING and condition["status"] == c.TRUE:
            return IN_PROGRESS
        if condition["type"] == c.STALLED and condition["status"] == c.TRUE:
            return FAILED
    for condition in status.get("conditions") or []:
        if condition["type"] == c.READY and condition["status"] in (c.FALSE, c.UNKNOWN):
            return IN_PROGRESS
        if condition["type"] == c.READY and condition["status"] == c.TRUE:
            return CURRENT
    return CURRENT


def three(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {t: (cond["status"], cond["reason"]) for t in c.KSTATUS_TYPES if (cond := c.find(status["conditions"], t))}


def assert_conventions(generation: int, status: dict[str, Any]) -> None:
    """What every status written must hold: all three present, once each, at the current
    generation, with a timestamp; never Ready and Stalled both True, nor Stalled and Reconciling
    (kstatus would read whichever comes first); Ready=True and Reconciling=False is Current.
    (An AdapterDeployment serving everything while replicas are added is Ready and Reconciling.)"""
    types = [x["type"] for x in status["conditions"]]
    assert all(types.count(t) == 1 for t in c.KSTATUS_TYPES), types
    for type_ in c.KSTATUS_TYPES:
        condition = c.find(status["conditions"], type_)
        assert condition["observedGeneration"] == generation and condition["lastTransitionTime"], condition
        assert condition["reason"] and condition["message"], condition
    got = three(status)
    assert not (got[c.STALLED][0] == c.TRUE and got[c.RECONCILING][0] == c.TRUE), got
    if got[c.READY][0] == c.TRUE:
        assert got[c.STALLED][0] == c.FALSE
        if got[c.RECONCILING][0] == c.FALSE:
            assert kstatus(generation, status) == CURRENT
    assert len(status["conditions"]) <= 16  # the CRD's maxItems


# --- FineTuneJob ---------------------------------------------------------------------------------


def refused(reason: str, generation: int = 2) -> dict[str, Any]:
    return s.apply_admission({}, False, reason, f"refused: {reason}\ndetail", None, generation, T0)


def failed_job(reason: str = "BackoffLimitExceeded", message: str = "") -> dict[str, Any]:
    crashed = pod(phase="Failed", terminated={"exitCode": 1, "finishedAt": "2026-01-02T03:30:00Z", "message": message})
    wl = workload(conditions=[job_cond("Failed", reason, "Job has reached the specified backoff limit")], failed=3)
    return derive(admitted(), wl=wl, pods=[crashed])


def ftj_cases() -> dict[str, tuple[dict[str, Any], dict[str, tuple[str, str]], str]]:
    """name: (status, expected Ready/Reconciling/Stalled as (status, reason), kstatus's reading)."""
    pending = pod(phase="Pending", scheduled="0/3 nodes: Insufficient nvidia.com/gpu")
    running = derive(admitted(), wl=workload(active=1), pods=[pod()])
    suspended = derive(running, job=ftj(suspend=True), wl=workload(suspend=True), now=T1)
    untrusted = complete('{"phase": "Succeeded", "adapter": {"uri": "pvc://payroll-db-data/"}}')
    trainer_error = '{"phase": "Failed", "reason": "InvalidInput", "message": "row 3 is not chat"}'
    cases = {
        "admitted": (
            s.apply_admission({}, True, "Admitted", "fits on 1 GPU", {"worldSize": 1}, 1, T0),
            {c.READY: (c.FALSE, "Admitted"), c.RECONCILING: (c.TRUE, "Admitted"), c.STALLED: (c.FALSE, "Admitted")},
            IN_PROGRESS,
        ),
        "pods pending": (
            derive(admitted(), wl=workload(), pods=[pending]),
            {c.READY: (c.FALSE, "Admitted"), c.RECONCILING: (c.TRUE, "Admitted"), c.STALLED: (c.FALSE, "Admitted")},
            IN_PROGRESS,
        ),
        "running": (
            running,
            {c.READY: (c.FALSE, "Running"), c.RECONCILING: (c.TRUE, "Running"), c.STALLED: (c.FALSE, "Running")},
            IN_PROGRESS,
        ),
        "suspended": (
            suspended,
            {c.READY: (c.FALSE, "Suspended"), c.RECONCILING: (c.FALSE, "Suspended"), c.STALLED: (c.FALSE, "Suspended")},
            IN_PROGRESS,  # from Ready=False: kstatus has no Suspended reading
        ),
        "queued in kueue": (
            derive(admitted(), job=ftj(queue="gpus"), wl=workload(suspend=True)),
            {c.READY: (c.FALSE, "Queued"), c.RECONCILING: (c.TRUE, "Queued"), c.STALLED: (c.FALSE, "Suspended")},
            IN_PROGRESS,
        ),
        "succeeded": (
            complete(json.dumps(RESULT)),
            {c.READY: (c.TRUE, "Succeeded"), c.RECONCILING: (c.FALSE, "Succeeded"), c.STALLED: (c.FALSE, "Succeeded")},
            CURRENT,
        ),
        "backoff limit": (
            failed_job(),
            {
                c.READY: (c.FALSE, "BackoffLimitExceeded"),
                c.RECONCILING: (c.FALSE, "Failed"),
                c.STALLED: (c.TRUE, "BackoffLimitExceeded"),
            },
            FAILED,
        ),
        "trainer's reason": (
            failed_job(message=trainer_error),
            {
                c.READY: (c.FALSE, "InvalidInput"),
                c.RECONCILING: (c.FALSE, "Failed"),
                c.STALLED: (c.TRUE, "InvalidInput"),
            },
            FAILED,
        ),
        "untrusted result": (
            untrusted,
            {
                c.READY: (c.FALSE, "UntrustedResult"),
                c.RECONCILING: (c.FALSE, "Failed"),
                c.STALLED: (c.TRUE, "UntrustedResult"),
            },
            FAILED,
        ),
    }
    for reason in s.ADMISSION_REASONS:
        expected = {c.READY: (c.FALSE, reason), c.RECONCILING: (c.FALSE, "Failed"), c.STALLED: (c.TRUE, reason)}
        cases[f"refused {reason}"] = (refused(reason, generation=1), expected, FAILED)
    return cases


@pytest.mark.parametrize("name", list(ftj_cases()))
def test_every_finetunejob_state_gives_ready_reconciling_and_stalled(name):
    status, expected, reading = ftj_cases()[name]
    assert three(status) == expected
    assert kstatus(1, status) == reading
    assert_conventions(1, status)
    FineTuneJobStatus.model_validate(status)  # the CRD's schema takes them (reason pattern, maxItems)


def test_finetunejob_conditions_keep_their_own_and_add_three():
    status = derive(admitted(), wl=workload(active=1), pods=[pod()])
    assert [x["type"] for x in status["conditions"]] == [c.ADMITTED, c.RUNNING, c.READY, c.RECONCILING, c.STALLED]
    assert status["phase"] == "Running"


def test_ready_says_why_a_job_waits():
    pending = pod(phase="Pending", scheduled="0/3 nodes: Insufficient nvidia.com/gpu")
    status = derive(admitted(), wl=workload(), pods=[pending])
    assert "Insufficient nvidia.com/gpu" in c.find(status["conditions"], c.READY)["message"]
    assert c.find(status["conditions"], c.STALLED)["message"] == c.find(status["conditions"], c.READY)["message"]
    failed = refused("InsufficientGpuMemory")
    assert c.find(failed["conditions"], c.STALLED)["message"].startswith("refused: InsufficientGpuMemory")


def test_a_refused_job_readmitted_after_a_spec_change_is_no_longer_stalled():
    first = refused("InsufficientGpuMemory", generation=1)
    again = s.apply_admission(first, True, "Admitted", "fits", {"worldSize": 1}, 2, T1)
    assert three(again)[c.STALLED] == (c.FALSE, "Admitted") and three(again)[c.RECONCILING][0] == c.TRUE
    assert kstatus(2, again) == IN_PROGRESS
    assert_conventions(2, again)


def test_finetunejob_generation_and_transition_times():
    first = derive(admitted(), wl=workload(active=1), pods=[pod()], now=T0)
    later = derive(first, job=ftj(generation=4), wl=workload(active=1), pods=[pod()], now=T1)
    for type_ in c.KSTATUS_TYPES:  # no flip: the time stays, the generation follows the spec
        before, after = c.find(first["conditions"], type_), c.find(later["conditions"], type_)
        assert after["observedGeneration"] == 4 and after["lastTransitionTime"] == before["lastTransitionTime"]
    assert kstatus(4, later) == IN_PROGRESS and kstatus(5, later) == IN_PROGRESS

    done_at = T1 + timedelta(hours=1)
    finished = pod(phase="Failed", terminated={"exitCode": 1, "finishedAt": "2026-01-02T04:00:00Z"})
    wl = workload(conditions=[job_cond("Failed", "BackoffLimitExceeded", "limit")], failed=3)
    done = derive(later, job=ftj(generation=4), wl=wl, pods=[finished], now=done_at)
    flipped = {t: c.find(done["conditions"], t)["lastTransitionTime"] for t in c.KSTATUS_TYPES}
    assert flipped[c.STALLED] == flipped[c.RECONCILING] == c.timestamp(done_at)
    assert flipped[c.READY] == c.find(later["conditions"], c.READY)["lastTransitionTime"]  # False before and after


def test_a_status_from_before_these_conditions_gets_them_on_the_next_derivation():
    old = derive(admitted(), wl=workload(active=1), pods=[pod()])
    old["conditions"] = [x for x in old["conditions"] if x["type"] not in c.KSTATUS_TYPES]
    assert three(derive(old, wl=workload(active=1), pods=[pod()]))[c.READY] == (c.FALSE, "Running")


# --- AdapterDeployment ---------------------------------------------------------------------------


def observed(wanted, replicas, *, ready=1, want=1, existing=None, updated=None, seen=True, generation=3):
    existing = want if existing is None else existing
    updated = want if updated is None else updated
    return ads.Observed("support", "ml", 8000, generation, want, existing, ready, updated, seen, wanted, replicas, T0)


A = Wanted("a", "pvc://adapters/a")
LOADED_A = Replica("pod-0", "http://x", loaded={"a": "pvc://adapters/a"})


def ad_cases() -> dict[str, tuple[dict[str, Any], dict[str, tuple[str, str]], str]]:
    empty = Replica("pod-1", "http://y", loaded={})
    refusing = Replica("pod-0", "http://x", loaded={}, failed={"a": ("pvc://adapters/a", "too big for the GPU")})
    rejected = Wanted("a", rejected="evalLoss.delta 0.4 > 0.1")
    waiting = Wanted("b", pending="waiting for FineTuneJob j to succeed", reason="WaitingForJob")
    job_failed = Wanted("b", pending="FineTuneJob j failed: OOM", reason="JobFailed")
    untrusted = Wanted("a", problem="pvc://payroll-db-data/ is not under the job's spec.output.uri")
    settled = {c.RECONCILING: (c.FALSE, "Stable"), c.STALLED: (c.FALSE, "AsExpected")}
    stalled = {c.RECONCILING: (c.FALSE, "Stalled")}
    return {
        "serving every adapter": (
            ads.derive_status({}, observed([A], [LOADED_A])),
            {c.READY: (c.TRUE, "Ready"), **settled},
            CURRENT,
        ),
        "no replica ready": (
            ads.derive_status({}, observed([A], [], ready=0)),
            {c.READY: (c.FALSE, "Unavailable"), c.RECONCILING: (c.TRUE, "ReplicasUpdating"), **stalled_false()},
            IN_PROGRESS,
        ),
        "rolling out": (
            ads.derive_status({}, observed([A], [LOADED_A], want=2, updated=1)),
            {c.READY: (c.TRUE, "Ready"), c.RECONCILING: (c.TRUE, "ReplicasUpdating"), **stalled_false()},
            IN_PROGRESS,
        ),
        "deployment not yet observed": (
            ads.derive_status({}, observed([A], [LOADED_A], seen=False)),
            {c.READY: (c.FALSE, "ReplicasUpdating"), c.RECONCILING: (c.TRUE, "ReplicasUpdating"), **stalled_false()},
            IN_PROGRESS,
        ),
        "loading on one of two": (
            ads.derive_status({}, observed([A], [LOADED_A, empty], ready=2, want=2)),
            {c.READY: (c.FALSE, "AdaptersLoading"), c.RECONCILING: (c.TRUE, "AdaptersChanging"), **stalled_false()},
            IN_PROGRESS,
        ),
        "waiting for a FineTuneJob": (
            ads.derive_status({}, observed([A, waiting], [LOADED_A])),
            {c.READY: (c.FALSE, "WaitingForJob"), c.RECONCILING: (c.TRUE, "WaitingForJob"), **stalled_false()},
            IN_PROGRESS,
        ),
        "its FineTuneJob failed": (
            ads.derive_status({}, observed([A, job_failed], [LOADED_A])),
            {c.READY: (c.FALSE, "JobFailed"), **stalled, c.STALLED: (c.TRUE, "JobFailed")},
            FAILED,
        ),
        "a load refused": (
            ads.derive_status({}, observed([A], [refusing])),
            {c.READY: (c.FALSE, "AdapterFailed"), **stalled, c.STALLED: (c.TRUE, "AdapterFailed")},
            FAILED,
        ),
        "an untrusted source": (
            ads.derive_status({}, observed([untrusted], [empty])),
            {c.READY: (c.FALSE, "UntrustedAdapterSource"), **stalled, c.STALLED: (c.TRUE, "UntrustedAdapterSource")},
            FAILED,
        ),
        "a rejected adapter": (
            ads.derive_status({}, observed([rejected], [empty])),
            {c.READY: (c.FALSE, "AdapterRejected"), **stalled, c.STALLED: (c.TRUE, "AdapterRejected")},
            FAILED,
        ),
        "a rejected adapter still loaded": (  # Progressing (unloading), yet it needs a person: Stalled wins
            ads.derive_status({}, observed([rejected], [LOADED_A])),
            {c.READY: (c.FALSE, "AdapterRejected"), **stalled, c.STALLED: (c.TRUE, "AdapterRejected")},
            FAILED,
        ),
        "a replica does not answer": (  # Degraded, but it may come back by itself
            ads.derive_status({}, observed([A], [LOADED_A, Replica("pod-1", "http://y", error="refused")], ready=2)),
            {c.READY: (c.TRUE, "Ready"), **settled},
            CURRENT,
        ),
        "refused: image not allowed": (
            ads.refused_status({}, 3, "image evil/x is not allowed by the operator", T0),
            {c.READY: (c.FALSE, "NotAllowed"), **stalled, c.STALLED: (c.TRUE, "NotAllowed")},
            FAILED,
        ),
        "refused: invalid spec": (
            ads.refused_status(ads.derive_status({}, observed([A], [LOADED_A])), 3, "runtime vllm needs a GPU", T0),
            {c.READY: (c.FALSE, "InvalidSpec"), **stalled, c.STALLED: (c.TRUE, "InvalidSpec")},
            FAILED,
        ),
    }


def stalled_false() -> dict[str, tuple[str, str]]:
    return {c.STALLED: (c.FALSE, "AsExpected")}


@pytest.mark.parametrize("name", list(ad_cases()))
def test_every_adapterdeployment_situation_gives_ready_reconciling_and_stalled(name):
    status, expected, reading = ad_cases()[name]
    assert three(status) == expected
    assert kstatus(3, status) == reading
    assert_conventions(3, status)
    AdapterDeploymentStatus.model_validate(status)


def test_adapterdeployment_conditions_keep_their_own_and_add_three():
    status = ads.derive_status({}, observed([A], [LOADED_A]))
    own = [ads.AVAILABLE, ads.PROGRESSING, ads.ADAPTERS_READY, ads.DEGRADED]
    assert [x["type"] for x in status["conditions"]] == [*own, *c.KSTATUS_TYPES]


def test_adapterdeployment_generation_and_transition_times():
    first = ads.derive_status({}, observed([A], [LOADED_A], generation=3))
    again = ads.derive_status(first, replace(observed([A], [LOADED_A], generation=5), now=T1))
    for type_ in c.KSTATUS_TYPES:
        before, after = c.find(first["conditions"], type_), c.find(again["conditions"], type_)
        assert after["observedGeneration"] == 5 and after["lastTransitionTime"] == before["lastTransitionTime"]
    assert kstatus(5, again) == CURRENT and kstatus(6, again) == IN_PROGRESS  # the next spec: not yet observed

    refusing = Replica("pod-0", "http://x", loaded={}, failed={"a": ("pvc://adapters/a", "too big")})
    broken = ads.derive_status(again, replace(observed([A], [refusing], generation=5), now=T1))
    ready, stalled = c.find(broken["conditions"], c.READY), c.find(broken["conditions"], c.STALLED)
    assert ready["lastTransitionTime"] == stalled["lastTransitionTime"] == c.timestamp(T1)


# --- Events --------------------------------------------------------------------------------------


class Recorder:
    """The two calls write_status makes, recorded."""

    def __init__(self):
        self.events: list[tuple[str, str, str]] = []
        self.patches: list[dict[str, Any]] = []

    def merge_patch(self, path, body):
        self.patches.append(body)

    def post_event(self, involved, type_, reason, message):
        self.events.append((type_, reason, message))


def body(kind: str, status: dict[str, Any]) -> dict[str, Any]:
    meta = {"name": "support-bot", "namespace": "ml", "resourceVersion": "7", "generation": 1}
    return {"kind": kind, "metadata": meta, "status": status}


def test_ready_reconciling_and_stalled_post_no_events_of_their_own():
    client = Recorder()
    start = s.apply_admission({}, True, "Admitted", "fits", {"worldSize": 1}, 1, T0)
    assert write_status(client, body("FineTuneJob", {}), start, lambda change: change.warning)
    assert [e[1] for e in client.events] == ["Admitted"]  # Reconciling=True appeared: no Event for it

    client.events.clear()
    assert write_status(client, body("FineTuneJob", start), failed_job(), lambda change: change.warning)
    # Stalled flipped too: only Failed's Event (Running=False was already False)
    assert [e[:2] for e in client.events] == [("Warning", "BackoffLimitExceeded")]
    assert c.find(client.patches[-1]["status"]["conditions"], c.STALLED)["status"] == c.TRUE

    client.events.clear()
    status = ads.derive_status({}, observed([A], [LOADED_A]))
    write_status(client, body("AdapterDeployment", {}), status, ads.is_warning)
    assert {e[2].split("=")[0] for e in client.events} == {ads.AVAILABLE, ads.ADAPTERS_READY}


@pytest.mark.parametrize(("name", "reading"), [("succeeded", CURRENT), ("backoff limit", FAILED)])
def test_a_finished_job_acknowledges_a_later_spec_edit(name, reading):
    """Finished, then its spec edited (generation 2): the run is not revived and no reason
    changes, but the edit is acknowledged, so kstatus does not read the job as InProgress forever."""
    status, three_before, _ = ftj_cases()[name]
    assert kstatus(2, status) == IN_PROGRESS  # what readers would see without the acknowledgement
    acknowledged = s.acknowledge_generation(status, 2)
    assert kstatus(2, acknowledged) == reading
    assert three(acknowledged) == three(status) and acknowledged["phase"] == status["phase"]
    assert_conventions(2, acknowledged)
    before = {x["type"]: x["lastTransitionTime"] for x in status["conditions"]}
    assert {x["type"]: x["lastTransitionTime"] for x in acknowledged["conditions"]} == before
    assert s.acknowledge_generation(acknowledged, 2) == acknowledged  # nothing more to write
    assert status["conditions"][0]["observedGeneration"] == 1  # the input is not modified

"""Why pods do not run, from what Kubernetes says (operator/kubetune_operator/stuck.py): a table of
recorded pods and Events, as the Job controller, the scheduler and the kubelet write them, for every
reason, with whether only a person can clear it; which facts are too old to count; the limits on
what is quoted; and the same diagnosis on a FineTuneJob's Running condition and an
AdapterDeployment's Available and Degraded conditions, Stalled included, with Events read only
while pods do not all run."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune_operator import conditions as c
from kubetune_operator import k8s, stuck
from kubetune_operator.adapterdeployment import status as ads
from kubetune_operator.config import OperatorConfig
from kubetune_operator.finetunejob import handlers as ftjh
from kubetune_operator.finetunejob import reconcile as ftjr
from kubetune_operator.finetunejob import status as s
from kubetune_operator.state import OperatorState
from tests.unit.test_status import admitted, derive, ftj, workload

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
JOB_CREATED = "2026-01-02T03:00:00Z"
PRIORITY = 'Error creating: pods "support-bot-0-x7k2p" is forbidden: no PriorityClass with name training-high was found'
QUOTA = (
    'Error creating: pods "support-bot-0-x7k2p" is forbidden: exceeded quota: gpus, requested: '
    "requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=8, limited: requests.nvidia.com/gpu=8"
)
NO_PVC = (
    '0/3 nodes are available: persistentvolumeclaim "adapters" not found. preemption: 0/3 nodes are '
    "available: 3 Preemption is not helpful for scheduling."
)
NO_NODE = (
    "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 2 node(s) had untolerated "
    "taint {nvidia.com/gpu: present}. preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling."
)
BUSY = (
    "0/3 nodes are available: 1 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }, "
    "2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 1 Preemption is not helpful for "
    "scheduling, 2 No preemption victims found for incoming pod."
)


# --- recorded objects ----------------------------------------------------------------------------


def job(uid: str = "j-1", created: str = JOB_CREATED) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "support-bot", "namespace": "ml", "uid": uid, "creationTimestamp": created},
            "spec": {"parallelism": 1, "completions": 1}, "status": {"startTime": created}}  # fmt: skip


def event(reason: str, message: str, kind: str = "Job", name: str = "support-bot", uid: str = "j-1",
          last: str = "2026-01-02T03:00:05Z", **extra: Any) -> dict[str, Any]:  # fmt: skip
    """A core/v1 Event as the Job controller (record.EventRecorder) writes it."""
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{name}.18a2b3c4d5e6f708", "namespace": "ml", "creationTimestamp": last},
        "involvedObject": {"kind": kind, "namespace": "ml", "name": name, "uid": uid},
        "reason": reason, "message": message, "type": "Warning", "count": 4,
        "firstTimestamp": "2026-01-02T03:00:01Z", "lastTimestamp": last, **extra,
    }  # fmt: skip


def new_event(reason: str, message: str, kind: str, name: str, uid: str, when: str) -> dict[str, Any]:
    """An events.k8s.io/v1 Event read through core/v1 (the scheduler's, the autoscaler's): no
    lastTimestamp, an eventTime with microseconds."""
    return {
        "metadata": {"name": f"{name}.18a2b3c4d5e6f709", "namespace": "ml"},
        "involvedObject": {"kind": kind, "namespace": "ml", "name": name, "uid": uid},
        "reason": reason, "message": message, "type": "Normal", "eventTime": when, "lastTimestamp": None,
        "reportingComponent": "cluster-autoscaler",
    }  # fmt: skip


def pod(name: str = "support-bot-0-x7k2p", phase: str = "Pending", index: str | None = "0",
        created: str = "2026-01-02T03:00:01Z", scheduled: str | None = None, containers: Any = None,
        ready: bool = False, node: str | None = None, uid: str | None = None) -> dict[str, Any]:  # fmt: skip
    annotations = {stuck.COMPLETION_INDEX: index} if index is not None else {}
    meta = {"name": name, "namespace": "ml", "uid": uid or f"uid-{name}", "creationTimestamp": created,
            "annotations": annotations}  # fmt: skip
    conditions = []
    if scheduled is not None:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": scheduled})
    elif node:
        conditions.append({"type": "PodScheduled", "status": "True"})
    conditions.append({"type": "Ready", "status": "True" if ready else "False"})
    status: dict[str, Any] = {"phase": phase, "conditions": conditions}
    if containers is not None:
        status["containerStatuses"] = containers
    return {"metadata": meta, "spec": {"nodeName": node} if node else {}, "status": status}


def waiting(reason: str, message: str = "", restarts: int = 0, last: dict | None = None) -> list[dict[str, Any]]:
    state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
    status = {"name": "trainer", "ready": False, "restartCount": restarts, "image": "ghcr.io/x/trainer:1",
              "state": state}  # fmt: skip
    if last is not None:
        status["lastState"] = {"terminated": last}
    return [status]


def terminated(reason: str, code: int, message: str = "") -> dict[str, Any]:
    return {"exitCode": code, "reason": reason, "message": message, "startedAt": "2026-01-02T03:00:03Z",
            "finishedAt": "2026-01-02T03:01:00Z"}  # fmt: skip


RUNNING = pod(phase="Running", ready=True, node="gpu-node-a",
              containers=[{"name": "trainer", "ready": True, "state": {"running": {}}}])  # fmt: skip
MOUNTING = pod(node="gpu-node-a", containers=waiting("ContainerCreating"))


# (controller, pods, events) → (reason, needs a person, words the message must hold)
CASES: dict[str, tuple[Any, list, list, tuple[str, bool, tuple[str, ...]]]] = {
    "a missing PriorityClass: the Job controller's FailedCreate": (
        job(), [], [event("FailedCreate", PRIORITY)],
        ("FailedCreate", True, ("Job controller cannot create pods", "no PriorityClass with name training-high",
                                 'pods "support-bot-0-x7k2p"')),
    ),
    "an exceeded quota frees up when other work ends": (
        job(), [], [event("FailedCreate", QUOTA)],
        ("FailedCreate", False, ("exceeded quota", "waiting for the namespace's quota")),
    ),
    "a missing PVC: the scheduler says not found": (
        job(), [pod(scheduled=NO_PVC)], [],
        ("Unschedulable", True, ("pod support-bot-0-x7k2p cannot be scheduled", 'persistentvolumeclaim "adapters"')),
    ),
    "no node matches the selector, tolerations or affinity": (
        job(), [pod(scheduled=NO_NODE)], [],
        ("Unschedulable", True, ("didn't match Pod's node affinity/selector", "change spec.resources")),
    ),
    "no node matches, but an autoscaler is adding one": (
        job(), [pod(scheduled=NO_NODE)],
        [new_event("TriggeredScaleUp", "pod triggered scale-up: [{gpu-pool 0->1 (max: 4)}]", "Pod",
                   "support-bot-0-x7k2p", "uid-support-bot-0-x7k2p", "2026-01-02T03:00:09.123456Z")],
        ("Unschedulable", False, ("an autoscaler is adding a node", "gpu-pool 0->1")),
    ),
    "insufficient GPUs: the cluster is busy": (
        job(), [pod(scheduled=BUSY)], [],
        ("Unschedulable", False, ("2 Insufficient nvidia.com/gpu", "waiting for capacity")),
    ),
    "a missing Secret key: CreateContainerConfigError": (
        job(), [pod(node="gpu-node-a", containers=waiting("CreateContainerConfigError",
                                                           "couldn't find key token in Secret ml/hf-token"))], [],
        ("CreateContainerConfigError", True, ("container trainer", "couldn't find key token in Secret ml/hf-token")),
    ),
    "a missing ConfigMap volume: the kubelet's FailedMount": (
        job(), [MOUNTING],
        [event("FailedMount", 'MountVolume.SetUp failed for volume "config" : configmap "support-bot-config" not '
               "found", kind="Pod", name="support-bot-0-x7k2p", uid="uid-support-bot-0-x7k2p")],
        ("FailedMount", True, ("cannot mount its volumes", 'configmap "support-bot-config" not found')),
    ),
    "a slow attach is not a person's to fix": (
        job(), [MOUNTING],
        [event("FailedMount", "Unable to attach or mount volumes: unmounted volumes=[data]: timed out waiting "
               "for the condition", kind="Pod", name="support-bot-0-x7k2p", uid="uid-support-bot-0-x7k2p")],
        ("FailedMount", False, ("timed out",)),
    ),
    "an image that cannot be pulled: ErrImagePull": (
        job(), [pod(node="gpu-node-a", containers=waiting(
            "ErrImagePull", 'failed to pull and unpack image "ghcr.io/x/trainer:nope": not found'))], [],
        ("ErrImagePull", True, ("container trainer: ErrImagePull", "trainer:nope")),
    ),
    "and then ImagePullBackOff": (
        job(), [pod(node="gpu-node-a", containers=waiting(
            "ImagePullBackOff", 'Back-off pulling image "ghcr.io/x/trainer:nope"'))], [],
        ("ImagePullBackOff", True, ("Back-off pulling image",)),
    ),
    "a malformed image: InvalidImageName": (
        job(), [pod(node="gpu-node-a", containers=waiting(
            "InvalidImageName", 'Failed to apply default image tag "Trainer:Latest": invalid reference format'))],
        [], ("InvalidImageName", True, ("invalid reference format",)),
    ),
    "a crash loop tells the last termination": (
        None, [pod(phase="Running", index=None, node="cpu-node", containers=waiting(
            "CrashLoopBackOff", "back-off 40s restarting failed container=serve", restarts=3,
            last=terminated("Error", 1, "ValueError: --max-lora-rank must be a power of two")))], [],
        ("CrashLoopBackOff", True, ("keeps crashing, restarted 3 times", "last exit 1 (Error)",
                                    "ValueError: --max-lora-rank")),
    ),
    "out of memory, as the pod ended (restartPolicy Never)": (
        job(), [pod(phase="Failed", node="gpu-node-a", containers=[
            {"name": "trainer", "state": {"terminated": terminated("OOMKilled", 137)}}])], [],
        ("OOMKilled", True, ("ran out of memory (exit 137 (OOMKilled))", "spec.resources.memory")),
    ),
    "out of memory at the last restart, crash-looping since": (
        None, [pod(phase="Running", index=None, node="cpu-node", containers=waiting(
            "CrashLoopBackOff", "back-off", restarts=2, last=terminated("OOMKilled", 137)))], [],
        ("OOMKilled", True, ("ran out of memory",)),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_every_reason_kubernetes_gives(name):
    controller, pods, events, (reason, person, words) = CASES[name]
    found = stuck.diagnose(controller, pods, events)
    assert found is not None, name
    assert (found.reason, found.needs_person) == (reason, person), found
    for word in words:
        assert word in found.message, (word, found.message)
    assert "\n" not in found.message and len(found.message) <= stuck.MESSAGE_LIMIT
    assert found.reason in stuck.REASONS and (person or found.reason in stuck.SOMETIMES_STALLED)


def test_nothing_to_say_about_pods_that_run_or_start():
    assert stuck.diagnose(job(), [RUNNING], []) is None
    assert stuck.diagnose(job(), [], []) is None  # the Job controller has not got to it yet
    assert stuck.diagnose(job(), [MOUNTING], []) is None  # starting, nothing said against it
    assert stuck.diagnose(job(), [pod(phase="Succeeded", node="gpu-node-a")], []) is None
    # a Normal Event from the controller is no failure
    assert stuck.diagnose(job(), [], [event("SuccessfulCreate", "Created pod: support-bot-0-x7k2p")]) is None


def test_old_facts_do_not_count():
    # The pod the controller created after it failed: the FailedCreate is over.
    later_pod = pod(created="2026-01-02T03:00:10Z", containers=waiting("ContainerCreating"), node="gpu-node-a")
    assert stuck.diagnose(job(), [later_pod], [event("FailedCreate", PRIORITY, last="2026-01-02T03:00:05Z")]) is None
    # Same second: it may still be failing (the other pods of the Job).
    same = pod(created="2026-01-02T03:00:05Z", containers=waiting("ContainerCreating"), node="gpu-node-a")
    assert stuck.diagnose(job(), [same], [event("FailedCreate", PRIORITY)]).reason == "FailedCreate"
    # A namesake Job's Events (deleted and created again): another uid, or from before this one.
    assert stuck.diagnose(job(), [], [event("FailedCreate", PRIORITY, uid="j-0")]) is None
    recreated = job(created="2026-01-02T03:10:00Z")
    assert stuck.diagnose(recreated, [], [event("FailedCreate", PRIORITY, uid="")]) is None
    # Another object's Event.
    assert stuck.diagnose(job(), [], [event("FailedCreate", PRIORITY, name="other", uid="")]) is None
    # An earlier attempt of the same completion index, failed: history; the new attempt runs.
    oom = pod("support-bot-0-old", phase="Failed", created="2026-01-02T03:00:01Z",
              containers=[{"name": "trainer", "state": {"terminated": terminated("OOMKilled", 137)}}])  # fmt: skip
    retry = {**RUNNING, "metadata": {**RUNNING["metadata"], "creationTimestamp": "2026-01-02T03:02:00Z"}}
    assert stuck.diagnose(job(), [oom, retry], []) is None
    assert stuck.diagnose(job(), [oom], []).reason == "OOMKilled"
    # A pod being deleted says nothing about the workload now.
    deleting = pod(scheduled=NO_PVC)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-02T03:05:00Z"
    assert stuck.diagnose(job(), [deleting], []) is None


def test_the_newest_event_is_told():
    older = event("FailedCreate", PRIORITY, last="2026-01-02T03:00:05Z")
    newer = event("FailedCreate", QUOTA, last="2026-01-02T03:00:09Z")
    assert "exceeded quota" in stuck.diagnose(job(), [], [newer, older]).message
    assert "exceeded quota" in stuck.diagnose(job(), [], [older, newer]).message
    # events.k8s.io/v1 time (MicroTime) against core/v1 time: the second counts, not the format
    assert stuck.event_time(new_event("X", "", "Pod", "p", "u", "2026-01-02T03:00:09.5Z")) == "2026-01-02T03:00:09"


def test_what_needs_a_person_is_told_first():
    busy = pod("support-bot-1-aaaaa", index="1", scheduled=BUSY, created="2026-01-02T03:00:04Z")
    no_pvc = pod("support-bot-0-bbbbb", index="0", scheduled=NO_PVC, created="2026-01-02T03:00:01Z")
    found = stuck.diagnose(job(), [busy, no_pvc], [])
    assert (found.reason, found.needs_person) == ("Unschedulable", True) and "support-bot-0-bbbbb" in found.message
    # Of two that need nobody, the newest pod's.
    other = pod("support-bot-0-ccccc", index="0", scheduled=BUSY, created="2026-01-02T03:00:01Z")
    assert "support-bot-1-aaaaa" in stuck.diagnose(job(), [other, busy], []).message


def test_what_others_wrote_is_bounded_and_one_line():
    flood = "line one\nline two\t" + "x" * 100_000
    found = stuck.diagnose(job(), [], [event("FailedCreate", flood)])
    assert found is not None and "\n" not in found.message and "\t" not in found.message
    assert len(found.message) <= stuck.MESSAGE_LIMIT and found.message.endswith("...")
    assert "line one line two" in found.message
    # Junk where dicts belong is no fact, never an exception.
    junk_pod = {"metadata": "x", "status": {"conditions": "y", "containerStatuses": [1, None, "z"]}}
    assert stuck.diagnose(job(), [junk_pod, 7], [None, "event", {"reason": 3, "involvedObject": []}]) is None  # type: ignore[list-item]
    weird = pod(node="n", containers=waiting("ErrImagePull"))
    weird["status"]["containerStatuses"][0]["state"]["waiting"]["message"] = {"not": "text"}
    assert stuck.diagnose(job(), [weird], []).message.endswith("container trainer: ErrImagePull")


def test_events_are_read_only_for_pods_whose_status_cannot_say():
    busy = pod("b", scheduled=BUSY, created="2026-01-02T03:00:09Z")
    no_pvc = pod("p", scheduled=NO_PVC, created="2026-01-02T03:00:08Z")
    pulling = pod("i", node="n", containers=waiting("ErrImagePull"), created="2026-01-02T03:00:07Z")
    selector = pod("s", scheduled=NO_NODE, created="2026-01-02T03:00:06Z", index="1")
    mounting = pod("m", node="n", containers=waiting("ContainerCreating"), created="2026-01-02T03:00:05Z", index="2")
    mounting2 = pod("m2", node="n", created="2026-01-02T03:00:04Z", index="3")
    assert stuck.pods_worth_events([busy, no_pvc, pulling, RUNNING]) == []
    assert stuck.pods_worth_events([mounting, selector, mounting2]) == ["s", "m"]  # newest first, at most 2


def test_a_deployments_replica_failure_is_its_replicasets_failed_create():
    deployment = {
        "metadata": {"name": "support", "namespace": "ml", "uid": "d-1", "creationTimestamp": JOB_CREATED},
        "status": {"conditions": [
            {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
            {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": PRIORITY.replace(
                "Error creating: ", ""), "lastUpdateTime": "2026-01-02T03:00:03Z"},
        ]},
    }  # fmt: skip
    found = stuck.diagnose(deployment, [], stuck.replica_failure_events(deployment))
    assert (found.reason, found.needs_person) == ("FailedCreate", True)
    assert found.message.startswith("the ReplicaSet controller cannot create pods: pods")
    deployment["status"]["conditions"][1]["status"] = "False"  # resolved
    assert stuck.replica_failure_events(deployment) == []


# --- FineTuneJob ---------------------------------------------------------------------------------


def ftj_status(pods=(), events=(), current=None, now=T0):
    return (
        derive(current or admitted(), wl=job(), pods=list(pods), now=now)
        if not events
        else s.derive_status(current or admitted(), s.Context(ftj(), job(), list(pods), now, "", list(events)))
    )


def three(status):
    return {t: (status_of := c.find(status["conditions"], t))["status"] + "/" + status_of["reason"]
            for t in (c.RUNNING, c.READY, c.RECONCILING, c.STALLED)}  # fmt: skip


def test_a_job_whose_pods_cannot_be_created_is_stalled_with_the_controllers_words():
    st = ftj_status(events=[event("FailedCreate", PRIORITY)])
    running = c.find(st["conditions"], c.RUNNING)
    assert running["message"].startswith("0/1 pods running; the Job controller cannot create pods: Error creating")
    assert "no PriorityClass with name training-high was found" in running["message"]
    assert three(st) == {c.RUNNING: "False/FailedCreate", c.READY: "False/FailedCreate",
                         c.RECONCILING: "False/Stalled", c.STALLED: "True/FailedCreate"}  # fmt: skip
    assert c.find(st["conditions"], c.STALLED)["message"] == running["message"] and st["phase"] == "Admitted"
    # Once the class exists, the pods come and run: no longer stalled, and no Event is read then.
    later = derive(st, wl={**job(), "status": {"active": 1}}, pods=[RUNNING], now=T0 + timedelta(minutes=1))
    assert three(later)[c.STALLED] == "False/Running" and three(later)[c.RUNNING] == "True/PodsRunning"


@pytest.mark.parametrize(
    "pods, reason, stalled",
    [
        ([pod(scheduled=NO_PVC)], "Unschedulable", True),
        ([pod(scheduled=BUSY)], "Unschedulable", False),
        ([pod(node="n", containers=waiting("ImagePullBackOff", "Back-off pulling image"))], "ImagePullBackOff", True),
        ([pod(phase="Failed", node="n", containers=[{"name": "trainer", "state": {
            "terminated": terminated("OOMKilled", 137)}}])], "OOMKilled", True),
        ([pod(node="n", containers=waiting("ContainerCreating"))], "PodsPending", False),
    ],
)  # fmt: skip
def test_the_running_reason_is_kubernetes_own_and_only_a_persons_is_stalled(pods, reason, stalled):
    st = ftj_status(pods)
    assert three(st)[c.RUNNING] == f"False/{reason}"
    assert three(st)[c.STALLED] == (f"True/{reason}" if stalled else "False/Admitted")
    assert three(st)[c.RECONCILING].startswith("False" if stalled else "True")


def test_admission_restating_the_conditions_keeps_a_diagnosed_stall():
    """The whole reconcile records admission again (no pods read there): a stall the diagnosis
    found stands until the next derivation says otherwise, whether its reason always or only
    sometimes needs a person."""
    for pods in ([pod(scheduled=NO_PVC)], [pod(node="n", containers=waiting("ErrImagePull"))]):
        st = ftj_status(pods)
        again = s.apply_admission(st, True, "Admitted", "ok", None, 1, T0 + timedelta(minutes=1))
        assert c.find(again["conditions"], c.STALLED) == c.find(st["conditions"], c.STALLED)
    waits = ftj_status([pod(scheduled=BUSY)])
    again = s.apply_admission(waits, True, "Admitted", "ok", None, 1, T0 + timedelta(minutes=1))
    assert three(again)[c.STALLED] == "False/Admitted"


def test_a_job_with_pods_pending_is_polled_every_round():
    pending = ftj_status([pod(scheduled=BUSY)])
    entry = s.tracked({}, pending)
    assert entry.phase == "Admitted" and entry.pods_pending
    index = {("ml", "support-bot"): [entry]}
    assert ftjh.needs_poll(index, ("ml", "support-bot")) is True
    running = derive(admitted(), wl=workload(active=1), pods=[RUNNING])
    assert s.tracked({}, running).pods_pending is False
    assert ftjh.needs_poll({("ml", "x"): [s.tracked({}, admitted())]}, ("ml", "x")) is False  # no Job yet


class Api:
    """k8s.Client as the status refresh uses it: objects by path, lists by path, calls recorded."""

    def __init__(self, objects: dict[str, Any], lists: dict[str, list], forbidden: bool = False):
        self.objects, self.lists, self.forbidden = objects, lists, forbidden
        self.calls: list[str] = []

    def get(self, path):
        self.calls.append(path)
        return self.objects.get(path)

    def list(self, path, label_selector=""):
        self.calls.append(path)
        if self.forbidden and "/events" in path:
            raise k8s.ApiError(403, "Forbidden", "events is forbidden")
        return self.lists.get(path, [])

    def merge_patch(self, path, body):
        self.calls.append("PATCH " + path)
        self.patched = body
        return {}

    def post_event(self, involved, type_, reason, message):
        self.calls.append(f"EVENT {reason}")


def refresh(pods: list, events: list, forbidden: bool = False) -> Api:
    body = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {**ftj().metadata.model_dump(by_alias=True, exclude_none=True), "resourceVersion": "3"},
            "spec": ftj().spec.model_dump(by_alias=True, exclude_none=True), "status": admitted()}  # fmt: skip
    owned = job(uid="j-1")
    owned["metadata"]["ownerReferences"] = [{"kind": "FineTuneJob", "uid": "u-1", "controller": True}]
    api = Api(
        {k8s.kubetune_path("FineTuneJob", "ml", "support-bot"): body, ftjr.job_path("ml", "support-bot"): owned},
        {k8s.pods_path("ml"): pods, k8s.events_path("ml", "Job", "support-bot"): events},
        forbidden,
    )
    state = OperatorState(OperatorConfig(), client=api)  # type: ignore[arg-type]
    ftjr.refresh_status(state, ("ml", "support-bot"), scrape_metrics=False)
    return api


def test_events_are_read_only_while_pods_do_not_all_run():
    healthy = refresh([RUNNING], [])
    assert not [call for call in healthy.calls if "/events" in call]
    stuck_job = refresh([], [event("FailedCreate", PRIORITY, last="2026-01-02T03:00:05Z")])
    assert [call for call in stuck_job.calls if "/events" in call] == [k8s.events_path("ml", "Job", "support-bot")]
    assert "fieldSelector=involvedObject.kind%3DJob%2CinvolvedObject.name%3Dsupport-bot" in k8s.events_path(
        "ml", "Job", "support-bot"
    )
    running = c.find(stuck_job.patched["status"]["conditions"], c.RUNNING)
    assert running["reason"] == "FailedCreate" and "training-high" in running["message"]
    # An operator that may not list Events says less, and goes on.
    refused = refresh([], [], forbidden=True)
    assert c.find(refused.patched["status"]["conditions"], c.RUNNING)["reason"] == "PodsPending"


# --- AdapterDeployment ---------------------------------------------------------------------------


def observed(diagnosis, ready=0, replicas=1):
    return ads.Observed("support", "ml", 8000, 2, replicas, replicas, ready, replicas, True, [], [], T0, diagnosis)


def ad_three(status):
    return {t: (x := c.find(status["conditions"], t))["status"] + "/" + x["reason"]
            for t in (ads.AVAILABLE, ads.DEGRADED, c.STALLED, c.RECONCILING)}  # fmt: skip


def test_an_adapterdeployment_whose_image_cannot_be_pulled_is_degraded_and_stalled():
    serving = pod("support-7d9f-abcde", index=None, node="cpu-node",
                  containers=waiting("ErrImagePull", 'pull access denied for "kubetune/serve:nope"'))  # fmt: skip
    st = ads.derive_status(None, observed(stuck.diagnose(None, [serving], [])))
    assert ad_three(st) == {ads.AVAILABLE: "False/ErrImagePull", ads.DEGRADED: "True/ErrImagePull",
                            c.STALLED: "True/ErrImagePull", c.RECONCILING: "False/Stalled"}  # fmt: skip
    available = c.find(st["conditions"], ads.AVAILABLE)["message"]
    assert available.startswith("0 of 1 replicas ready; pod support-7d9f-abcde container trainer: ErrImagePull")
    assert ads.is_warning(c.Transition(ads.DEGRADED, c.TRUE, "ErrImagePull", ""))


def test_a_rollout_stuck_on_a_crash_loop_is_degraded_while_old_replicas_serve():
    crashing = pod("support-new-abcde", phase="Running", index=None, node="cpu-node", containers=waiting(
        "CrashLoopBackOff", "back-off", restarts=4, last=terminated("Error", 2, "unknown flag --foo")))  # fmt: skip
    st = ads.derive_status(None, observed(stuck.diagnose(None, [RUNNING, crashing], []), ready=1))
    assert ad_three(st)[ads.AVAILABLE] == "True/ReplicasReady"
    assert ad_three(st)[ads.DEGRADED] == "True/CrashLoopBackOff" and ad_three(st)[c.STALLED] == "True/CrashLoopBackOff"
    assert "unknown flag --foo" in c.find(st["conditions"], c.STALLED)["message"]


def test_a_replica_waiting_for_gpus_is_not_degraded():
    st = ads.derive_status(None, observed(stuck.diagnose(None, [pod(index=None, scheduled=BUSY)], [])))
    assert ad_three(st) == {ads.AVAILABLE: "False/Unschedulable", ads.DEGRADED: "False/Healthy",
                            c.STALLED: "False/AsExpected", c.RECONCILING: "True/ReplicasUpdating"}  # fmt: skip
    assert "waiting for capacity" in c.find(st["conditions"], ads.AVAILABLE)["message"]
    # and without a diagnosis, as before
    assert ad_three(ads.derive_status(None, observed(None)))[ads.AVAILABLE] == "False/NoReadyReplicas"

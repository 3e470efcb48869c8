"""Why a workload's pods do not run, in one line, from what Kubernetes already says: pure functions
over the wire form (pods and core/v1 Events as dicts), no API calls, no clock.

Kubernetes spreads the answer over three places, and nobody reads most of them: the Job or
ReplicaSet controller records pods it could not create only in an Event (reason FailedCreate; a
Deployment restates its ReplicaSet's in its ReplicaFailure condition, `replica_failure_events`), the
scheduler writes why a pod fits no node into the pod's PodScheduled condition, and the kubelet
writes a container's troubles into its status (waiting reasons, the last termination) or, for
volumes, into an Event on the pod (FailedMount). `diagnose` reads all three and returns one
`Diagnosis` whose reason is the Kubernetes reason itself: FailedCreate, Unschedulable, FailedMount,
CreateContainerConfigError, ErrImagePull, ImagePullBackOff, InvalidImageName, ErrImageNeverPull,
CrashLoopBackOff, OOMKilled.

Which need a person (`needs_person`: the kinds' Stalled condition). The rule: a person is needed
when the same spec in the same cluster can never get further by waiting, only by someone changing
the spec or creating what it names.

* Always (`ALWAYS_STALLED`): an image that cannot be pulled or is malformed (ErrImagePull,
  ImagePullBackOff, InvalidImageName, ErrImageNeverPull: a wrong name, tag or pull secret; a
  registry outage is the rare exception and ends in a retry the kubelet makes anyway), a Secret,
  ConfigMap or key the container needs that is missing (CreateContainerConfigError), a container
  that keeps crashing (CrashLoopBackOff) or ran out of memory (OOMKilled): the same spec does the
  same again.
* Depending on what was said (`SOMETIMES_STALLED`):
  - FailedCreate: the API server refused the pod (a missing PriorityClass, Pod Security, an
    admission webhook, an invalid pod) needs a person; an exceeded ResourceQuota does not (other
    workloads of the namespace finish and free it).
  - Unschedulable: a missing object the pod names (`persistentvolumeclaim "x" not found`) needs a
    person, and so does a pod no node can take whatever runs on them (every node excluded by its
    node selector, affinity or taints) unless a cluster autoscaler said it is adding a node for it
    (an Event TriggeredScaleUp or Nominated on the pod: GPU node pools often scale from zero). A
    pod that some node would take once resources free up (`Insufficient nvidia.com/gpu`, too many
    pods), or one waiting for a claim to bind or for nodes to register, does not: the cluster is
    busy, running work finishes, an autoscaler may add nodes; the message says so.
  - FailedMount: a volume whose Secret, ConfigMap or claim is not found needs a person; a mount that
    timed out (a slow attach) does not.

Which facts count. Only the workload's current pods: not those being deleted, and for a Job only
the newest pod of each completion index (an older attempt's failure is history). Only Events
about the object they are read for (its uid, where both say one) that are no older than it and,
for a controller's FailedCreate, no older than its newest current pod (a pod created since means
the controller got through), the newest first. Events and pod statuses are written by others:
every text taken from them is made one line and clipped (`quoted`), and nothing in them is
trusted to have the type the API promises.

When several pods are stuck, the first diagnosis that needs a person wins (it is what to act on),
else the first one; controller Events come first, then the pods, newest first.
"""

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

QUOTE_LIMIT = 300  # characters of any one text taken from a pod status or an Event
MESSAGE_LIMIT = 600  # characters of a whole diagnosis message
MAX_POD_EVENT_READS = 2  # pods whose Events a caller reads (one API call each), newest first
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

FAILED_CREATE = "FailedCreate"
UNSCHEDULABLE = "Unschedulable"
FAILED_MOUNT = "FailedMount"
OOM_KILLED = "OOMKilled"
CRASH_LOOP = "CrashLoopBackOff"
IMAGE_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
WAITING_REASONS = (*IMAGE_REASONS, "CreateContainerConfigError", CRASH_LOOP)

ALWAYS_STALLED = frozenset({*WAITING_REASONS, OOM_KILLED})
SOMETIMES_STALLED = frozenset({FAILED_CREATE, UNSCHEDULABLE, FAILED_MOUNT})
REASONS = ALWAYS_STALLED | SOMETIMES_STALLED

# Events of a cluster autoscaler (Kubernetes' cluster-autoscaler, Karpenter) saying a node is coming.
SCALE_UP_EVENTS = ("TriggeredScaleUp", "Nominated")
# What the scheduler says of nodes that would take the pod once something frees up or binds.
_CAPACITY = re.compile(
    r"Insufficient |Too many pods|unbound immediate PersistentVolumeClaims|no nodes available|0/0 nodes", re.I
)
_MISSING = re.compile(r"\bnot found\b", re.I)
_QUOTA = re.compile(r"exceeded quota", re.I)
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


@dataclass(frozen=True)
class Diagnosis:
    """Why the workload's pods do not run: a Kubernetes reason, one bounded line naming the pod (or
    the controller's words, which name it), and whether only a person can change it."""

    reason: str
    message: str
    needs_person: bool


# --- reading untrusted dicts ---------------------------------------------------------------------


def mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def items(value: Any) -> list[Mapping[str, Any]]:
    return [x for x in value if isinstance(x, Mapping)] if isinstance(value, list) else []


def text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def quoted(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """A text from a pod status or an Event, as one line of at most `limit` characters."""
    line = " ".join(text(value).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def moment(value: Any) -> str:
    """An RFC 3339 time cut to the second ("" when it is none), so that metav1.Time and MicroTime
    compare as strings."""
    match = _TIME.match(text(value))
    return match.group(0) if match else ""


def name_of(obj: Mapping[str, Any]) -> str:
    return quoted(mapping(obj.get("metadata")).get("name"), 253)


def uid_of(obj: Mapping[str, Any]) -> str:
    return text(mapping(obj.get("metadata")).get("uid"))


def created(obj: Mapping[str, Any]) -> str:
    return moment(mapping(obj.get("metadata")).get("creationTimestamp"))


def condition(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    for found in items(mapping(obj.get("status")).get("conditions")):
        if found.get("type") == type_:
            return found
    return {}


# --- pods ----------------------------------------------------------------------------------------


def phase(pod: Mapping[str, Any]) -> str:
    return text(mapping(pod.get("status")).get("phase")) or "Pending"


def is_deleting(pod: Mapping[str, Any]) -> bool:
    return bool(mapping(pod.get("metadata")).get("deletionTimestamp"))


def is_ready(pod: Mapping[str, Any]) -> bool:
    return phase(pod) == "Running" and condition(pod, "Ready").get("status") == "True"


def completion_index(pod: Mapping[str, Any]) -> str | None:
    meta = mapping(pod.get("metadata"))
    value = mapping(meta.get("annotations")).get(COMPLETION_INDEX) or mapping(meta.get("labels")).get(COMPLETION_INDEX)
    return value if isinstance(value, str) else None


def current_pods(pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pods that say how the workload is now, newest first: none being deleted, and of a Job's
    pods only the newest of each completion index (pods without one all count)."""
    live = sorted((p for p in pods if isinstance(p, Mapping) and not is_deleting(p)), key=created, reverse=True)
    seen: set[str] = set()
    out = []
    for pod in live:
        index = completion_index(pod)
        if index is not None:
            if index in seen:
                continue
            seen.add(index)
        out.append(pod)
    return out


def stuck_pods(pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Current pods that neither serve (Running and Ready) nor finished well, newest first."""
    return [p for p in current_pods(pods) if not is_ready(p) and phase(p) != "Succeeded"]


def container_statuses(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Init containers first (the others wait for them), then the containers."""
    status = mapping(pod.get("status"))
    return items(status.get("initContainerStatuses")) + items(status.get("containerStatuses"))


def is_scheduled(pod: Mapping[str, Any]) -> bool:
    return bool(mapping(pod.get("spec")).get("nodeName")) or condition(pod, "PodScheduled").get("status") == "True"


def pods_worth_events(pods: Iterable[Mapping[str, Any]], limit: int = MAX_POD_EVENT_READS) -> list[str]:
    """The stuck pods whose Events may say what their status does not, newest first, at most
    `limit` (one API call each): a pod placed on a node whose containers have no waiting reason
    yet (a volume that does not mount shows only in an Event), and an unschedulable one (a cluster
    autoscaler says in an Event that it adds a node)."""
    names = []
    for pod in stuck_pods(pods):
        if phase(pod) != "Pending" or container_diagnosis(pod) is not None:
            continue
        said = text(condition(pod, "PodScheduled").get("message"))
        if is_scheduled(pod) or not (_MISSING.search(said) or _CAPACITY.search(said)):
            names.append(name_of(pod))
    return [n for n in names if n][:limit]


# --- Events --------------------------------------------------------------------------------------


def event_time(event: Mapping[str, Any]) -> str:
    """When an Event last happened: core/v1 (lastTimestamp) or events.k8s.io/v1 (series, eventTime)."""
    series = mapping(event.get("series"))
    times = (series.get("lastObservedTime"), event.get("lastTimestamp"), event.get("eventTime"),
             event.get("firstTimestamp"), mapping(event.get("metadata")).get("creationTimestamp"))  # fmt: skip
    return max((moment(t) for t in times), default="")


def about(event: Mapping[str, Any], obj: Mapping[str, Any], since: str = "") -> bool:
    """Whether `event` concerns `obj` as it is now: its name (and uid, where both say one), and
    not older than the object nor than `since`."""
    involved = mapping(event.get("involvedObject"))
    if involved.get("name") != mapping(obj.get("metadata")).get("name"):
        return False
    uid, event_uid = uid_of(obj), text(involved.get("uid"))
    if uid and event_uid and uid != event_uid:
        return False
    when = event_time(event)
    return bool(when) and when >= max(created(obj), since)


def newest(events: Iterable[Mapping[str, Any]], reasons: Sequence[str]) -> Mapping[str, Any] | None:
    found = [e for e in events if isinstance(e, Mapping) and e.get("reason") in reasons]
    return max(found, key=event_time) if found else None


def replica_failure_events(deployment: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A Deployment's ReplicaFailure condition (its ReplicaSet could not create pods; the
    Deployment controller copies the ReplicaSet's words and removes it once creation works) in
    the shape of the FailedCreate Event it restates, about the Deployment."""
    failure = condition(deployment, "ReplicaFailure")
    if failure.get("status") != "True":
        return []
    meta = mapping(deployment.get("metadata"))
    when = failure.get("lastUpdateTime") or failure.get("lastTransitionTime")
    return [{
        "reason": text(failure.get("reason")) or FAILED_CREATE, "message": failure.get("message"),
        "involvedObject": {"kind": "ReplicaSet", "name": meta.get("name"), "uid": meta.get("uid")},
        "lastTimestamp": when,
    }]  # fmt: skip


# --- the diagnoses -------------------------------------------------------------------------------


def failed_create(
    controller: Mapping[str, Any], events: Iterable[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]]
) -> Diagnosis | None:
    """The controller's newest FailedCreate about itself, unless a current pod was created since."""
    since = max((created(p) for p in pods), default="")
    event = newest((e for e in events if about(e, controller, since)), (FAILED_CREATE,))
    if event is None:
        return None
    kind = quoted(mapping(event.get("involvedObject")).get("kind"), 40) or "workload"
    said = quoted(event.get("message"))
    if _QUOTA.search(text(event.get("message"))):
        message = f"the {kind} controller cannot create pods: {said}; waiting for the namespace's quota to free up"
        return Diagnosis(FAILED_CREATE, message, False)
    return Diagnosis(FAILED_CREATE, f"the {kind} controller cannot create pods: {said}", True)


def last_termination(status: Mapping[str, Any]) -> Mapping[str, Any]:
    return mapping(mapping(status.get("lastState")).get("terminated"))


def exit_text(terminated: Mapping[str, Any]) -> str:
    code = terminated.get("exitCode")
    shown = f"exit {code}" if isinstance(code, int) and not isinstance(code, bool) else "exit ?"
    reason = quoted(terminated.get("reason"), 60)
    words = quoted(terminated.get("message"))
    return f"{shown}" + (f" ({reason})" if reason else "") + (f": {words}" if words else "")


def container_diagnosis(pod: Mapping[str, Any]) -> Diagnosis | None:
    """OOMKilled (now or at the last termination), else a waiting reason that needs a person."""
    name = name_of(pod)
    statuses = container_statuses(pod)
    for status in statuses:
        state = mapping(status.get("state"))
        for terminated in (mapping(state.get("terminated")), last_termination(status)):
            if terminated.get("reason") == OOM_KILLED and not state.get("running"):
                container = quoted(status.get("name"), 63)
                message = (f"pod {name} container {container} ran out of memory ({exit_text(terminated)}); "
                           "give it more memory (spec.resources.memory) or less to hold")  # fmt: skip
                return Diagnosis(OOM_KILLED, message, True)
    for status in statuses:
        waiting = mapping(mapping(status.get("state")).get("waiting"))
        reason = text(waiting.get("reason"))
        if reason not in WAITING_REASONS:
            continue
        container = quoted(status.get("name"), 63)
        if reason == CRASH_LOOP:
            restarts = status.get("restartCount")
            times = f", restarted {restarts} times" if isinstance(restarts, int) else ""
            last = last_termination(status)
            detail = f"; last {exit_text(last)}" if last else ""
            return Diagnosis(reason, f"pod {name} container {container} keeps crashing{times}{detail}", True)
        said = quoted(waiting.get("message"))
        return Diagnosis(reason, f"pod {name} container {container}: {reason}" + (f": {said}" if said else ""), True)
    return None


def unschedulable(pod: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> Diagnosis | None:
    """The scheduler's words from PodScheduled=False, and whether waiting can help (module doc)."""
    scheduled = condition(pod, "PodScheduled")
    if scheduled.get("status") != "False" or scheduled.get("reason") != UNSCHEDULABLE:
        return None
    said = text(scheduled.get("message"))
    message = f"pod {name_of(pod)} cannot be scheduled: {quoted(said) or 'no node fits it'}"
    if _MISSING.search(said):
        return Diagnosis(UNSCHEDULABLE, f"{message}; create what it names, or change the spec", True)
    if _CAPACITY.search(said):
        message += "; waiting for capacity: running pods may finish or an autoscaler may add nodes"
        return Diagnosis(UNSCHEDULABLE, message, False)
    scale_up = newest((e for e in events if about(e, pod)), SCALE_UP_EVENTS)
    if scale_up is not None:
        return Diagnosis(UNSCHEDULABLE, f"{message}; an autoscaler is adding a node: {quoted(scale_up.get('message'))}",
                         False)  # fmt: skip
    hint = "no node takes it (node selector, affinity or taints): change spec.resources or add such a node"
    return Diagnosis(UNSCHEDULABLE, f"{message}; {hint}", True)


def failed_mount(pod: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> Diagnosis | None:
    """The kubelet's newest FailedMount about the pod, while it has not started."""
    if phase(pod) != "Pending":
        return None
    event = newest((e for e in events if about(e, pod)), (FAILED_MOUNT,))
    if event is None:
        return None
    said = text(event.get("message"))
    message = f"pod {name_of(pod)} cannot mount its volumes: {quoted(said)}"
    return Diagnosis(FAILED_MOUNT, message, bool(_MISSING.search(said)))


def pod_diagnosis(pod: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> Diagnosis | None:
    return container_diagnosis(pod) or unschedulable(pod, events) or failed_mount(pod, events)


def clipped(diagnosis: Diagnosis) -> Diagnosis:
    message = quoted(diagnosis.message, MESSAGE_LIMIT)
    return Diagnosis(diagnosis.reason, message, diagnosis.needs_person)


def diagnose(
    controller: Mapping[str, Any] | None,
    pods: Iterable[Mapping[str, Any]],
    events: Iterable[Mapping[str, Any]] = (),
) -> Diagnosis | None:
    """Why the workload's pods do not run, or None when nothing Kubernetes said explains it (pods
    starting, or all of them running). `controller`: the Job or Deployment that makes the pods
    (its FailedCreate Events count; None: none do); `events`: core/v1 Events about it and its
    pods, in any order (`replica_failure_events` for a Deployment)."""
    said = [e for e in events if isinstance(e, Mapping)]
    current = current_pods(pods)
    found = [failed_create(controller, said, current)] if controller is not None else []
    found += [pod_diagnosis(p, said) for p in stuck_pods(current)]
    candidates = [d for d in found if d is not None]
    if not candidates:
        return None
    return clipped(next((d for d in candidates if d.needs_person), candidates[0]))

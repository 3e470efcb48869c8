"""kopf handlers of FineTuneJob: each one reconciles the whole object (admission, children, status).

create/resume: admit and apply the ConfigMap, Service and Job. Changes to spec.runPolicy.suspend,
activeDeadlineSeconds and ttlSecondsAfterFinished are patched onto the Job; a change of
spec.resources or spec.image (allowed only while suspended) re-plans and replaces the suspended Job.
A change of the Job or of one of its pods asks for the status to be derived again, through the
operator's runner (`state.KeyedRunner`): after `EVENT_DELAY`, one refresh per burst of events, never
two at once for one FineTuneJob, so the pod and Job events of many jobs starting together cost a
status read or two each, and never hold the threads kopf runs the admissions in. There is
deliberately no on-delete handler: the children are garbage-collected through their owner
references, and without one kopf adds no finalizer. The index feeds the resync loop (`RESYNC`).
"""

from collections.abc import Mapping
from typing import Any

import kopf

from kubetune.api.common import GROUP, VERSION
from kubetune.api.kinds import FINETUNEJOB

from .. import metrics
from ..conditions import PENDING
from ..registry import REGISTRY
from ..render_common import LABEL_COMPONENT, LABEL_MANAGED_BY
from ..resync import Resync
from ..state import Key, OperatorState, operator_state
from .reconcile import reconcile_finetunejob, reconcile_status
from .render import COMPONENT, JOB_LABEL
from .status import Tracked, tracked

FTJ = (GROUP, VERSION, FINETUNEJOB.plural)
BACKOFF = 5  # seconds between retries of a failed handler (kopf's default is 60)
EVENT_DELAY = 1.0  # seconds a child's event waits for the rest of its burst before the refresh
OURS = {LABEL_MANAGED_BY: "kubetune", LABEL_COMPONENT: COMPONENT, JOB_LABEL: kopf.PRESENT}


def _reconcile(body: kopf.Body, memo: kopf.Memo, reason: Any) -> None:
    """The whole reconcile, counted by what caused it; the resync then leaves the job alone for a
    while (its status was just derived)."""
    state = operator_state(memo)
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    trigger = str(getattr(reason, "value", reason) or "handler")  # kopf.Reason: create, resume, update
    metrics.RECONCILE_TRIGGERS.labels(kind=FINETUNEJOB.kind, trigger=trigger).inc()
    reconcile_finetunejob(state, namespace, name, seen=dict(body))
    state.work.touched((FINETUNEJOB.kind, namespace, name))


@kopf.on.resume(*FTJ, registry=REGISTRY, backoff=BACKOFF)
@kopf.on.create(*FTJ, registry=REGISTRY, backoff=BACKOFF)
def admit_finetunejob(body: kopf.Body, memo: kopf.Memo, reason: Any = None, **_: Any) -> None:
    _reconcile(body, memo, reason)


@kopf.on.update(*FTJ, field="spec.runPolicy.suspend", registry=REGISTRY, backoff=BACKOFF)
def suspend_changed(body: kopf.Body, memo: kopf.Memo, reason: Any = None, **_: Any) -> None:
    """true: the Job is suspended (Kubernetes deletes its pods; checkpoints stay on the volume);
    false: it resumes and the trainer continues from its last checkpoint."""
    _reconcile(body, memo, reason)


@kopf.on.update(*FTJ, field="spec.runPolicy.activeDeadlineSeconds", registry=REGISTRY, backoff=BACKOFF)
@kopf.on.update(*FTJ, field="spec.runPolicy.ttlSecondsAfterFinished", registry=REGISTRY, backoff=BACKOFF)
def limits_changed(body: kopf.Body, memo: kopf.Memo, reason: Any = None, **_: Any) -> None:
    _reconcile(body, memo, reason)


@kopf.on.update(*FTJ, field="spec.resources", registry=REGISTRY, backoff=BACKOFF)
@kopf.on.update(*FTJ, field="spec.image", registry=REGISTRY, backoff=BACKOFF)
def workload_changed(body: kopf.Body, memo: kopf.Memo, reason: Any = None, **_: Any) -> None:
    """Re-plan; the suspended Job is replaced by one with the new pods."""
    _reconcile(body, memo, reason)


# --- the objects a FineTuneJob owns --------------------------------------------------------------


def refresh_later(state: OperatorState, namespace: str, name: str) -> None:
    """Ask the runner for a status refresh of FineTuneJob `name`, coalesced with the others of its
    burst (and with a reconcile in flight: one more runs after it)."""
    state.work.request(
        (FINETUNEJOB.kind, namespace, name),
        lambda: reconcile_status(state, namespace, name),
        trigger="event",
        delay=EVENT_DELAY,
    )


def _refresh(body: kopf.Body, memo: kopf.Memo) -> None:
    state: OperatorState | None = getattr(memo, "operator", None)
    meta = body["metadata"]
    name = (meta.get("labels") or {}).get(JOB_LABEL)
    if state is not None and name:
        refresh_later(state, meta["namespace"], name)


@kopf.on.event("batch", "v1", "jobs", labels=OURS, registry=REGISTRY)
async def job_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _refresh(body, memo)


@kopf.on.event("", "v1", "pods", labels=OURS, registry=REGISTRY)
async def pod_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _refresh(body, memo)


# --- the resync ----------------------------------------------------------------------------------


@kopf.index(*FTJ, registry=REGISTRY)
def finetunejobs(namespace: str, name: str, spec: kopf.Spec, status: kopf.Status, **_: Any) -> dict[Key, Tracked]:
    """(namespace, name) → its phase and GPUs, for the resync loop and the operator's gauges."""
    return {(namespace, name): tracked(dict(spec), dict(status))}


def _entries(index: Mapping[Key, Any]) -> list[tuple[Key, Tracked]]:
    return [(key, entry) for key, store in index.items() for entry in store]


def due(index: Mapping[Key, Any]) -> list[Key]:
    """The admitted, unfinished FineTuneJobs: their status is re-derived and rank 0's metrics
    scraped. One still Pending has not been admitted yet (its create handler does that, and a
    status refresh of it would find nothing to derive)."""
    return sorted({key for key, entry in _entries(index) if not entry.finished and entry.phase != PENDING})


def needs_poll(index: Mapping[Key, Any], key: Key) -> bool:
    """A running job's metrics are seen only by polling rank 0, and why an admitted job's pods do
    not run (a Job controller that cannot create them) may show only in Events, which are not
    watched; every other phase changes only through events of the job and its children."""
    return any(entry.phase == "Running" or entry.pods_pending for entry in index.get(key) or ())


def tick(state: OperatorState, index: Mapping[Key, Any], seconds: float) -> None:
    """Jobs by phase, the GPU-hours the running ones held since the last round, and what the
    succeeded ones' evaluations measured."""
    entries = [entry for _, entry in _entries(index)]
    metrics.set_phase_counts(entry.phase for entry in entries)
    metrics.set_evaluations((key, entry.evaluation) for key, entry in _entries(index) if entry.evaluation)
    running_gpus = sum(entry.gpus for entry in entries if entry.phase == "Running")
    metrics.GPU_HOURS.inc(running_gpus * seconds / 3600)


def _resync(state: OperatorState, namespace: str, name: str) -> None:
    reconcile_status(state, namespace, name, scrape=True)


RESYNC = Resync(FINETUNEJOB.kind, "finetunejobs", due, _resync, tick, needs_poll)

"""kopf handlers of FineTuneJob: each one reconciles the whole object (admission, children, status).

create/resume: admit and apply the ConfigMap, Service and Job. Changes to spec.runPolicy.suspend,
activeDeadlineSeconds and ttlSecondsAfterFinished are patched onto the Job; a change of
spec.resources or spec.image (allowed only while suspended) re-plans and replaces the suspended Job.
Every change of the Job or of one of its pods re-derives the status. There is deliberately no
on-delete handler: the children are garbage-collected through their owner references, and without
one kopf adds no finalizer. The index feeds the resync loop (`RESYNC`).
"""

from collections.abc import Mapping
from typing import Any

import kopf

from kubetune.api.common import GROUP, VERSION
from kubetune.api.kinds import FINETUNEJOB

from .. import metrics
from ..registry import REGISTRY
from ..render_common import LABEL_COMPONENT, LABEL_MANAGED_BY
from ..resync import Resync
from ..state import Key, OperatorState, operator_state
from .reconcile import reconcile_finetunejob, reconcile_status
from .render import COMPONENT, JOB_LABEL
from .status import Tracked, tracked

FTJ = (GROUP, VERSION, FINETUNEJOB.plural)
BACKOFF = 5  # seconds between retries of a failed handler (kopf's default is 60)
OURS = {LABEL_MANAGED_BY: "kubetune", LABEL_COMPONENT: COMPONENT, JOB_LABEL: kopf.PRESENT}


def _reconcile(body: kopf.Body, memo: kopf.Memo) -> None:
    reconcile_finetunejob(operator_state(memo), body["metadata"]["namespace"], body["metadata"]["name"])


@kopf.on.resume(*FTJ, registry=REGISTRY, backoff=BACKOFF)
@kopf.on.create(*FTJ, registry=REGISTRY, backoff=BACKOFF)
def admit_finetunejob(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _reconcile(body, memo)


@kopf.on.update(*FTJ, field="spec.runPolicy.suspend", registry=REGISTRY, backoff=BACKOFF)
def suspend_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """true: the Job is suspended (Kubernetes deletes its pods; checkpoints stay on the volume);
    false: it resumes and the trainer continues from its last checkpoint."""
    _reconcile(body, memo)


@kopf.on.update(*FTJ, field="spec.runPolicy.activeDeadlineSeconds", registry=REGISTRY, backoff=BACKOFF)
@kopf.on.update(*FTJ, field="spec.runPolicy.ttlSecondsAfterFinished", registry=REGISTRY, backoff=BACKOFF)
def limits_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _reconcile(body, memo)


@kopf.on.update(*FTJ, field="spec.resources", registry=REGISTRY, backoff=BACKOFF)
@kopf.on.update(*FTJ, field="spec.image", registry=REGISTRY, backoff=BACKOFF)
def workload_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Re-plan; the suspended Job is replaced by one with the new pods."""
    _reconcile(body, memo)


# --- the objects a FineTuneJob owns --------------------------------------------------------------


def _refresh(body: kopf.Body, memo: kopf.Memo) -> None:
    state: OperatorState | None = getattr(memo, "operator", None)
    meta = body["metadata"]
    name = (meta.get("labels") or {}).get(JOB_LABEL)
    if state is not None and name:
        reconcile_status(state, meta["namespace"], name)


@kopf.on.event("batch", "v1", "jobs", labels=OURS, registry=REGISTRY)
def job_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _refresh(body, memo)


@kopf.on.event("", "v1", "pods", labels=OURS, registry=REGISTRY)
def pod_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _refresh(body, memo)


# --- the resync ----------------------------------------------------------------------------------


@kopf.index(*FTJ, registry=REGISTRY)
def finetunejobs(namespace: str, name: str, spec: kopf.Spec, status: kopf.Status, **_: Any) -> dict[Key, Tracked]:
    """(namespace, name) → its phase and GPUs, for the resync loop and the operator's gauges."""
    return {(namespace, name): tracked(dict(spec), dict(status))}


def _entries(index: Mapping[Key, Any]) -> list[tuple[Key, Tracked]]:
    return [(key, entry) for key, store in index.items() for entry in store]


def due(index: Mapping[Key, Any]) -> list[Key]:
    """The unfinished FineTuneJobs: their status is re-derived and rank 0's metrics scraped."""
    return sorted({key for key, entry in _entries(index) if not entry.finished})


def tick(state: OperatorState, index: Mapping[Key, Any], seconds: float) -> None:
    """Jobs by phase, and the GPU-hours the running ones held since the last round."""
    entries = [entry for _, entry in _entries(index)]
    metrics.set_phase_counts(entry.phase for entry in entries)
    running_gpus = sum(entry.gpus for entry in entries if entry.phase == "Running")
    metrics.GPU_HOURS.inc(running_gpus * seconds / 3600)


def _resync(state: OperatorState, namespace: str, name: str) -> None:
    reconcile_status(state, namespace, name, scrape=True)


RESYNC = Resync(FINETUNEJOB.kind, "finetunejobs", due, _resync, tick)

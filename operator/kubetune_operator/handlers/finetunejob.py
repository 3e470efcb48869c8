"""kopf handlers of FineTuneJob: each one reconciles the whole object (admission, children, status).

create/resume: admit and create the ConfigMap, Service and Job. Changes to spec.runPolicy.suspend,
activeDeadlineSeconds and ttlSecondsAfterFinished are patched onto the Job; a change of
spec.resources (allowed only while suspended) re-plans and replaces the suspended Job. There is
deliberately no on-delete handler: the children are garbage-collected through their owner
references, and without one kopf adds no finalizer.
"""

from typing import Any

import kopf

from . import REGISTRY
from .reconcile import reconcile_finetunejob

FTJ = ("kubetune.io", "v1alpha1", "finetunejobs")
BACKOFF = 5  # seconds between retries of a failed handler (kopf's default is 60)


def _reconcile(body: kopf.Body, memo: kopf.Memo) -> None:
    reconcile_finetunejob(memo.runtime, body["metadata"]["namespace"], body["metadata"]["name"])


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


@kopf.on.event(*FTJ, registry=REGISTRY)
def track(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:  # noqa: A002 - kopf's name
    runtime = getattr(memo, "runtime", None)
    if runtime is not None:
        runtime.tracker.observe(type, dict(body))

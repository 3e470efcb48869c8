"""kopf event handlers of the objects a FineTuneJob owns: every change of its Job or of one of
the Job's pods re-derives the FineTuneJob's status. Watching handlers store nothing on the
objects they watch (no annotations, no finalizers)."""

from typing import Any

import kopf

from ..render.common import LABEL_COMPONENT, LABEL_MANAGED_BY
from ..render.finetunejob import COMPONENT, JOB_LABEL
from . import REGISTRY
from .reconcile import reconcile_status

OURS = {LABEL_MANAGED_BY: "kubetune", LABEL_COMPONENT: COMPONENT, JOB_LABEL: kopf.PRESENT}


def _refresh(body: kopf.Body, memo: kopf.Memo) -> None:
    runtime = getattr(memo, "runtime", None)
    meta = body["metadata"]
    name = (meta.get("labels") or {}).get(JOB_LABEL)
    if runtime is not None and name:
        reconcile_status(runtime, meta["namespace"], name)


@kopf.on.event("batch", "v1", "jobs", labels=OURS, registry=REGISTRY)
def job_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _refresh(body, memo)


@kopf.on.event("", "v1", "pods", labels=OURS, registry=REGISTRY)
def pod_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _refresh(body, memo)

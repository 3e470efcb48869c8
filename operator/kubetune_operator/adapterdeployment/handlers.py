"""kopf handlers of AdapterDeployment: create, resume and a change of the spec run the whole reconcile
(`reconcile.py`); the index feeds the resync loop (`RESYNC`), which repeats it every
`metricsScrapeIntervalSeconds` for every AdapterDeployment not still in flight from the round
before: adapters resolved from their FineTuneJobs, loaded and unloaded on each ready replica,
status refreshed. No on-delete handler and
no finalizer: owner references let the garbage collector remove the Secret, NetworkPolicy,
ConfigMap, Service, Deployment, HorizontalPodAutoscaler and PodDisruptionBudget. A `kubectl scale`
or an autoscaler's write to /scale changes spec.replicas, so it reaches the spec handler like any edit.
"""

from collections.abc import Mapping
from typing import Any

import kopf

from kubetune.api.common import GROUP, VERSION
from kubetune.api.kinds import ADAPTERDEPLOYMENT

from .. import metrics
from ..registry import REGISTRY
from ..resync import Resync
from ..state import Key, OperatorState, operator_state
from .reconcile import forget, memories, reconcile_adapterdeployment

ADEP = (GROUP, VERSION, ADAPTERDEPLOYMENT.plural)
BACKOFF = 5  # seconds between retries of a failed handler (kopf's default is 60)


@kopf.on.resume(*ADEP, registry=REGISTRY, backoff=BACKOFF)
@kopf.on.create(*ADEP, registry=REGISTRY, backoff=BACKOFF)
@kopf.on.update(*ADEP, field="spec", registry=REGISTRY, backoff=BACKOFF)
def adapterdeployment_changed(body: kopf.Body, memo: kopf.Memo, reason: Any = None, **_: Any) -> None:
    trigger = str(getattr(reason, "value", reason))  # kopf.Reason: create, resume, update
    metrics.RECONCILE_TRIGGERS.labels(kind=ADAPTERDEPLOYMENT.kind, trigger=trigger).inc()
    reconcile_adapterdeployment(operator_state(memo), body["metadata"]["namespace"], body["metadata"]["name"])


# --- the resync ----------------------------------------------------------------------------------


@kopf.index(*ADEP, registry=REGISTRY)
def adapterdeployments(namespace: str, name: str, **_: Any) -> dict[Key, bool]:
    """(namespace, name) of every AdapterDeployment, for the resync loop."""
    return {(namespace, name): True}


def due(index: Mapping[Key, Any]) -> list[Key]:
    return sorted(index)


def tick(state: OperatorState, index: Mapping[Key, Any], seconds: float) -> None:
    """Forget what the replicas of AdapterDeployments that are gone said (refused loads, errors)."""
    for key in [key for key in [*state.refused_loads, *memories(state)] if key not in index]:
        forget(state, key)


RESYNC = Resync(ADAPTERDEPLOYMENT.kind, "adapterdeployments", due, reconcile_adapterdeployment, tick)

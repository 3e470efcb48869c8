"""kopf handlers of AdapterDeployment: create, resume and a change of the spec run the whole reconcile
(`reconcile.py`); the index feeds the resync loop (`RESYNC`), which repeats it every
`metricsScrapeIntervalSeconds` for every AdapterDeployment: adapters resolved from their
FineTuneJobs, loaded and unloaded on each ready replica, status refreshed. No on-delete handler and
no finalizer: owner references let the garbage collector remove the ConfigMap, Service and
Deployment.
"""

from collections.abc import Mapping
from typing import Any

import kopf

from kubetune.api.common import GROUP, VERSION
from kubetune.api.kinds import ADAPTERDEPLOYMENT

from ..registry import REGISTRY
from ..resync import Resync
from ..state import Key, OperatorState, operator_state
from .reconcile import reconcile_adapterdeployment

ADEP = (GROUP, VERSION, ADAPTERDEPLOYMENT.plural)
BACKOFF = 5  # seconds between retries of a failed handler (kopf's default is 60)


@kopf.on.resume(*ADEP, registry=REGISTRY, backoff=BACKOFF)
@kopf.on.create(*ADEP, registry=REGISTRY, backoff=BACKOFF)
@kopf.on.update(*ADEP, field="spec", registry=REGISTRY, backoff=BACKOFF)
def adapterdeployment_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    reconcile_adapterdeployment(operator_state(memo), body["metadata"]["namespace"], body["metadata"]["name"])


# --- the resync ----------------------------------------------------------------------------------


@kopf.index(*ADEP, registry=REGISTRY)
def adapterdeployments(namespace: str, name: str, **_: Any) -> dict[Key, bool]:
    """(namespace, name) of every AdapterDeployment, for the resync loop."""
    return {(namespace, name): True}


def due(index: Mapping[Key, Any]) -> list[Key]:
    return sorted(index)


def tick(state: OperatorState, index: Mapping[Key, Any], seconds: float) -> None:
    """Forget the refused loads of AdapterDeployments that are gone."""
    for key in [key for key in list(state.refused_loads) if key not in index]:
        state.refused_loads.pop(key, None)


RESYNC = Resync(ADAPTERDEPLOYMENT.kind, "adapterdeployments", due, reconcile_adapterdeployment, tick)

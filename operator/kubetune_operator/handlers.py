"""Every kopf handler of the operator, registered in `REGISTRY`: the operator's own (login, startup,
cleanup) here, and, imported from their folders, those of FineTuneJob and AdapterDeployment.

`kubetune operator` runs them with `kopf.run(registry=REGISTRY)` (`main.py`); tests run them
in-process with `kopf.testing.KopfRunner(["run", "--standalone", ...], registry=REGISTRY)`.

No handler needs a finalizer (there is no on-delete work: owner references let the garbage
collector remove the children), and periodic work runs in the operator's own resync loop
(`resync.py`) rather than a kopf timer, because kopf puts a finalizer on every object a timer or
daemon watches; a kubetune object can therefore always be deleted, operator running or not.
"""

import asyncio
import logging
from typing import Any

import kopf

from . import k8s, resync
from .adapterdeployment import handlers as adapterdeployment
from .finetunejob import handlers as finetunejob
from .registry import REGISTRY
from .state import OperatorState

KOPF_PREFIX = "kopf.kubetune.io"
CONSISTENCY_TIMEOUT = 30.0  # seconds
HANDLER_THREADS = 4
RESYNCED = (finetunejob.RESYNC, adapterdeployment.RESYNC)

log = logging.getLogger("kubetune.operator")

__all__ = ["REGISTRY", "configure"]


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf's state lives in annotations under our own prefix (status is a strict schema, and
    the status subresource is ours); no finalizer is ever needed (see the module docstring);
    only warnings become Kubernetes Events (transitions are posted explicitly)."""
    settings.persistence.finalizer = f"{KOPF_PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=KOPF_PREFIX)
    settings.posting.level = logging.WARNING
    settings.peering.standalone = True
    # Threads for the sync handlers (admissions, spec changes). On a small control plane more of
    # them only queue at the API server: each reconcile then takes longer, none finishes sooner.
    settings.execution.max_workers = HANDLER_THREADS
    # After kopf patches its own annotations it waits for the event that shows them before it
    # runs the create/update handlers again. Under load (hundreds of objects at once) the watch
    # stream lags more than kopf's 5 s default, and a stale event would run the creation twice.
    settings.persistence.consistency_timeout = CONSISTENCY_TIMEOUT


@kopf.on.login(registry=REGISTRY)
def login(**_: Any) -> kopf.ConnectionInfo:
    """The same credentials as our own client: service account, else KUBECONFIG, else ~/.kube/config."""
    return kopf.ConnectionInfo(**k8s.connection_info(k8s.load_configuration()))


@kopf.on.startup(registry=REGISTRY)
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    """The operator's state in the memo, and one resync loop per kind, fed by the kind's index
    (kopf passes the indices to startup handlers by name)."""
    configure(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per scrape otherwise
    try:
        state = OperatorState.from_environment()
    except ValueError as error:  # a misconfigured operator stops here, not in its first reconcile
        raise kopf.PermanentError(str(error)) from None
    memo.operator = state
    state.tasks = [resync.start(state, part, kwargs[part.index]) for part in RESYNCED]
    log.info(
        "kubetune operator: scrape/resync every %ss, trainer metrics port %s",
        state.interval,
        state.config.trainer_metrics_port,
    )


@kopf.on.cleanup(registry=REGISTRY)
async def stop(memo: kopf.Memo, **_: Any) -> None:
    state: OperatorState | None = getattr(memo, "operator", None)
    if state is None:
        return
    for task in state.tasks:
        task.cancel()
    for task in state.tasks:
        try:
            await task
        except asyncio.CancelledError:
            pass
    await state.work.close()
    state.client.close()

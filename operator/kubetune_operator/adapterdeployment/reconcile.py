"""AdapterDeployment reconcile: read, call the pure core (adapters, render, status), write.

One pass, the same from a handler and from the resync loop: resolve the `fromJob` adapters, apply
the adapters ConfigMap, the Service and the Deployment (server-side apply: an unchanged object is
left as it is, so the replicas do not restart), ask every ready replica what it has loaded, load
what is missing and unload what is no longer wanted, and write the status when it changed, with an
Event per condition that flipped. A load a replica refused is not retried there for the same URI.
"""

import logging
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from kubetune.api.adapterdeployment import AdapterDeployment
from kubetune.api.kinds import ADAPTERDEPLOYMENT, FINETUNEJOB

from .. import k8s, metrics
from ..render_common import RenderError, is_terminating
from ..replicas import ReplicaClient, ReplicaError
from ..state import Key, OperatorState
from ..writes import ensure_child, write_status
from .adapters import (
    Action,
    Replica,
    Wanted,
    adapters_from_models,
    digests_from_models,
    plan_actions,
    replica_urls,
    resolve,
    with_runtime_path,
)
from .render import adapter_path, label_selector, render_adapterdeployment
from .status import Observed, derive_status, is_warning

KIND = ADAPTERDEPLOYMENT.kind
log = logging.getLogger("kubetune.operator")


def reconcile_adapterdeployment(state: OperatorState, namespace: str, name: str) -> None:
    """The whole reconcile, counted and timed, under the object's lock."""
    with metrics.reconcile_observed(KIND) as outcome:
        try:
            with state.locks.hold(KIND, (namespace, name)):
                reconcile(state, (namespace, name))
        except kopf.TemporaryError:
            outcome["result"] = "retry"
            raise
        outcome["result"] = "ok"


# --- reading -------------------------------------------------------------------------------------


def parse(body: dict[str, Any]) -> AdapterDeployment | None:
    try:
        return AdapterDeployment.model_validate(
            {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}
        )
    except ValidationError as error:
        log.warning("AdapterDeployment %s does not parse: %s", body["metadata"].get("name"), error)
        return None


def fetch_jobs(client: k8s.Client, namespace: str, spec: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """The FineTuneJobs the `fromJob` adapters name (None: absent)."""
    names = {a["fromJob"] for a in spec.get("adapters") or [] if a.get("fromJob")}
    return {name: client.get(k8s.kubetune_path(FINETUNEJOB.kind, namespace, name)) for name in sorted(names)}


# --- the reconcile -------------------------------------------------------------------------------


def reconcile(state: OperatorState, key: Key) -> None:
    namespace, name = key
    client = state.client
    body = client.get(k8s.kubetune_path(KIND, namespace, name))
    if body is None or is_terminating(body):
        state.refused_loads.pop(key, None)
        return
    obj = parse(body)
    if obj is None:
        return
    spec_wire = body.get("spec") or {}
    wanted = [
        with_runtime_path(w, obj.spec.runtime)
        for w in resolve(spec_wire.get("adapters") or [], fetch_jobs(client, namespace, spec_wire))
    ]
    from_jobs = {a["name"] for a in spec_wire.get("adapters") or [] if a.get("fromJob")}
    try:
        objects = render_adapterdeployment(
            obj, state.config, {w.name: w.uri for w in wanted if w.uri and w.name in from_jobs}
        )
    except RenderError as error:
        log.warning("%s", error)
        return
    uid = body["metadata"]["uid"]
    ensure_child(client, objects.adapters, uid, KIND)  # the replicas follow the mounted file; no restarts
    ensure_child(client, objects.service, uid, KIND)
    deployment = ensure_child(client, objects.deployment, uid, KIND)

    pods = client.list(k8s.pods_path(namespace), label_selector(name))
    port = obj.spec.service.port
    known = state.refused_loads.get(key, {})
    replicas = [
        Replica(pod, url, failed=dict(known.get(pod, {})))
        for pod, url in replica_urls(body, pods, port, state.allow_metrics_url)
    ]
    sync_replicas(obj.spec.runtime, wanted, replicas)
    names = {r.name for r in replicas}
    state.refused_loads[key] = {r.name: r.failed for r in replicas if r.failed} | {
        pod: failed
        for pod, failed in known.items()
        if pod not in names and any(p["metadata"]["name"] == pod for p in pods)
    }

    dep_status = deployment.get("status") or {}
    dep_meta = deployment.get("metadata") or {}
    observed = Observed(
        name=name, namespace=namespace, port=port, generation=body["metadata"].get("generation"),
        replicas=obj.spec.replicas, existing=int(dep_status.get("replicas") or 0),
        ready=int(dep_status.get("readyReplicas") or 0), updated=int(dep_status.get("updatedReplicas") or 0),
        deployment_observed=int(dep_status.get("observedGeneration") or 0) >= int(dep_meta.get("generation") or 0),
        wanted=wanted, replica_views=replicas, now=datetime.now(UTC),
    )  # fmt: skip
    try:
        write_status(client, body, derive_status(body.get("status"), observed), is_warning)
    except k8s.ApiError as error:
        if error.status != 409:
            raise  # 409: changed meanwhile; the next pass derives it again


# --- talking to replicas -------------------------------------------------------------------------


def sync_replicas(runtime: str, wanted: list[Wanted], replicas: list[Replica]) -> None:
    """Ask each replica what it has loaded, then load and unload what `plan_actions` says; the
    outcome is recorded in the `Replica` views."""
    with ReplicaClient() as http:
        for replica in replicas:
            try:
                models = http.models(replica.url)
            except ReplicaError as error:
                replica.error = f"GET /v1/models: {error}"
                continue
            replica.loaded = adapters_from_models(models)
            replica.digests = digests_from_models(models)
        by_name = {r.name: r for r in replicas}
        for action in plan_actions(wanted, replicas):
            try:
                execute(http, runtime, by_name[action.replica], action)
            except ReplicaError as error:
                log.info("%s %s on %s failed: %s", action.verb, action.adapter, action.replica, error)


def execute(http: ReplicaClient, runtime: str, replica: Replica, action: Action) -> None:
    assert replica.loaded is not None
    if action.verb == "unload":
        answer = http.unload(replica.url, action.adapter)
        if answer.ok or answer.status == 404:
            replica.loaded.pop(action.adapter, None)
        else:
            replica.unload_failed[action.adapter] = answer.message
        return
    try:
        path = adapter_path(runtime, action.uri)
    except RenderError as error:
        replica.failed[action.adapter] = (action.uri, str(error))
        return
    answer = http.load(replica.url, action.adapter, path)
    if answer.ok:
        replica.loaded[action.adapter] = path  # as the runtime reports it in /v1/models
        replica.failed.pop(action.adapter, None)
    elif 400 <= answer.status < 500:
        replica.failed[action.adapter] = (action.uri, answer.message)
    else:  # 5xx: transient (e.g. the base model still loading); tried again next pass
        log.info("loading %s on %s: HTTP %s %s", action.adapter, replica.name, answer.status, answer.message)

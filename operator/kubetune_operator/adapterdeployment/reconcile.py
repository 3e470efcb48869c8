"""AdapterDeployment reconcile: read, call the pure core (adapters, render, status), write.

One pass, the same from a handler and from the resync loop: resolve the `fromJob` and merged adapters
(a merge's sources are resolved like adapters; see adapters.py), apply
the admin-key Secret, the NetworkPolicy, the adapters ConfigMap, the Service and the Deployment
(server-side apply: an unchanged object is left as it is, so the replicas do not restart), the
HorizontalPodAutoscaler and PodDisruptionBudget where they apply (deleted where they no longer do),
ask every ready replica what it has loaded, load what is missing and unload what is no longer
wanted, tell why serving pods do not run (`stuck.diagnose`: from the pods as listed and the
Deployment's ReplicaFailure condition, plus the Events of a pending pod or two whose status
cannot say; with every pod ready, no extra API call), and write the status when it changed,
with an Event per condition that flipped and a Warning Event (reason AdapterRejected) per adapter
that became Rejected (its FineTuneJob's evaluation fails a `require` rule;
`status.newly_rejected`): posted once the status saying so is written, so a later pass, reading
it back, posts none for the same reason.

A load a replica refused (see runtime.py: a 4xx that cannot change, a 404 that lasted, 5xx that
repeat) is not retried there for the same URI until the AdapterDeployment's spec changes (its
generation): what the replica said stays the adapter's Failed message meanwhile. (A change of
spec.replicas, by `kubectl scale` or the autoscaler, is a new generation too.)

Every call to a replica is bounded (`runtime.py`), and carries the admin key derived for this
object (`keys.py`); the Secret holding it is written, never read.

The reconcile never writes the AdapterDeployment's spec: spec.replicas belongs to the user, or to the
HorizontalPodAutoscaler when `spec.autoscaling` is set, and the Deployment follows whatever it says.
"""

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from kubetune.api.adapterdeployment import AdapterDeployment
from kubetune.api.kinds import ADAPTERDEPLOYMENT, FINETUNEJOB

from .. import k8s, keys, metrics, stuck
from ..render_common import RenderError, is_terminating, owned_by
from ..state import Key, OperatorState
from ..writes import ensure_child, write_status
from . import runtime
from .adapters import (
    ADAPTER_REJECTED,
    Action,
    Replica,
    Retry,
    Wanted,
    adapters_from_models,
    digests_from_models,
    job_names,
    job_sources,
    plan_actions,
    replica_urls,
    resolve,
    with_runtime_path,
)
from .render import (
    adapter_path,
    autoscaler_name,
    disruption_budget_name,
    label_selector,
    render_adapterdeployment,
)
from .runtime import ReplicaClient, ReplicaError
from .status import Observed, derive_status, is_warning, newly_rejected, refused_status

KIND = ADAPTERDEPLOYMENT.kind
log = logging.getLogger("kubetune.operator")
OPERATOR_NAMESPACE_ENV = "POD_NAMESPACE"
ACTIONS_BUDGET = 20.0  # seconds of loads and unloads per pass before the rest waits for the next
# REST paths of the children's kinds that k8s.PLURALS does not name.
CHILD_API = {
    "Secret": ("api/v1", "secrets"),
    "NetworkPolicy": ("apis/networking.k8s.io/v1", "networkpolicies"),
    "HorizontalPodAutoscaler": ("apis/autoscaling/v2", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("apis/policy/v1", "poddisruptionbudgets"),
}


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
    """The FineTuneJobs the `fromJob` adapters and merge sources name (None: absent)."""
    names = job_names(spec.get("adapters") or [])
    return {name: client.get(k8s.kubetune_path(FINETUNEJOB.kind, namespace, name)) for name in sorted(names)}


# --- the reconcile -------------------------------------------------------------------------------


def reconcile(state: OperatorState, key: Key) -> None:
    namespace, name = key
    client = state.client
    body = client.get(k8s.kubetune_path(KIND, namespace, name))
    if body is None or is_terminating(body):
        forget(state, key)
        return
    obj = parse(body)
    if obj is None:
        return
    spec_wire = body.get("spec") or {}
    spec_adapters = spec_wire.get("adapters") or []
    jobs = fetch_jobs(client, namespace, spec_wire)
    wanted = [with_runtime_path(w, obj.spec.runtime) for w in resolve(spec_adapters, jobs, obj.spec.runtime)]
    from_jobs = {a["name"] for a in spec_adapters if a.get("fromJob") or a.get("merge") is not None}
    try:
        objects = render_adapterdeployment(
            obj,
            state.config,
            {w.name: w.uri for w in wanted if w.uri and w.name in from_jobs},
            job_sources(spec_adapters, jobs),
            operator_namespace(state.config),
        )
    except RenderError as error:
        log.warning("%s", error)
        write_refusal(client, body, error)
        return
    uid = body["metadata"]["uid"]
    apply_secret(client, objects.admin_key)
    if objects.network_policy is not None:
        ensure_other_child(client, objects.network_policy, uid)
    ensure_child(client, objects.adapters, uid, KIND)  # the replicas follow the mounted file; no restarts
    ensure_child(client, objects.service, uid, KIND)
    deployment = ensure_child(client, objects.deployment, uid, KIND)
    ensure_or_remove(client, "HorizontalPodAutoscaler", autoscaler_name(name), namespace, objects.autoscaler, uid)
    ensure_or_remove(
        client, "PodDisruptionBudget", disruption_budget_name(name), namespace, objects.disruption_budget, uid
    )

    pods = client.list(k8s.pods_path(namespace), label_selector(name))
    by_pod = {p["metadata"]["name"]: p for p in pods}
    port = obj.spec.service.port
    generation = int(body["metadata"].get("generation") or 0)
    memory = remembered(state, key, generation)
    replicas = [
        Replica(pod, url, failed=dict(memory.refused.get(pod, {})), retries=dict(memory.retries.get(pod, {})))
        for pod, url in replica_urls(body, pods, port, state.allow_metrics_url)
    ]
    admin_key = keys.admin_key(state.config, namespace, name, uid)
    load_deadline = float(getattr(state.config, "adapter_load_timeout_seconds", runtime.LOAD_DEADLINE))
    http = ReplicaClient(admin_key, load_deadline, runtime.QUERY_DEADLINE)
    sync_replicas(obj.spec.runtime, wanted, replicas, http)
    remember(state, key, memory, replicas, by_pod)

    dep_status = deployment.get("status") or {}
    dep_meta = deployment.get("metadata") or {}
    observed = Observed(
        name=name, namespace=namespace, port=port, generation=body["metadata"].get("generation"),
        replicas=obj.spec.replicas, existing=int(dep_status.get("replicas") or 0),
        ready=int(dep_status.get("readyReplicas") or 0), updated=int(dep_status.get("updatedReplicas") or 0),
        deployment_observed=int(dep_status.get("observedGeneration") or 0) >= int(dep_meta.get("generation") or 0),
        wanted=wanted, replica_views=replicas, now=datetime.now(UTC),
        stuck=replicas_stuck(client, deployment, pods),
    )  # fmt: skip
    desired = derive_status(body.get("status"), observed)
    try:
        write_status(client, body, desired, is_warning)
    except k8s.ApiError as error:
        if error.status != 409:
            raise  # 409: changed meanwhile; the next pass derives it again
        return
    post_rejections(client, body, newly_rejected((body.get("status") or {}).get("adapters"), desired["adapters"]))


def replicas_stuck(
    client: k8s.Client, deployment: dict[str, Any], pods: list[dict[str, Any]]
) -> stuck.Diagnosis | None:
    """Why serving pods do not run, if Kubernetes says: their statuses, the Deployment's
    ReplicaFailure condition, and the Events of the pending pods whose status cannot say (read
    only for those, so a Deployment whose pods all run costs no call). Events the operator may not
    list are left out."""
    events = stuck.replica_failure_events(deployment)
    namespace = (deployment.get("metadata") or {}).get("namespace", "")
    for pod in stuck.pods_worth_events(pods):
        try:
            events += client.list(k8s.events_path(namespace, "Pod", pod))
        except k8s.ApiError as error:
            if error.status != 403:
                raise
            log.info("may not list Events in %s: %s", namespace, error)
            break
    return stuck.diagnose(deployment, pods, events)


def post_rejections(client: k8s.Client, body: dict[str, Any], rejected: list[dict[str, Any]]) -> None:
    """A Warning Event per adapter that became Rejected, with its status message (the failed rules)."""
    for entry in rejected:
        try:
            client.post_event(body, "Warning", ADAPTER_REJECTED, f"adapter {entry['name']}: {entry.get('message', '')}")
        except k8s.ApiError as error:  # an Event is a courtesy; never fail a reconcile over it
            log.warning("could not post an Event for %s: %s", body["metadata"]["name"], error)


def write_refusal(client: k8s.Client, body: dict[str, Any], error: RenderError) -> None:
    """An AdapterDeployment the operator will not serve says why, in its Degraded condition (reason
    NotAllowed for the operator's allow-lists, InvalidSpec otherwise); nothing is created."""
    desired = refused_status(body.get("status"), body["metadata"].get("generation"), str(error), datetime.now(UTC))
    try:
        write_status(client, body, desired, is_warning)
    except k8s.ApiError as error_:
        if error_.status != 409:
            raise


def operator_namespace(config: Any) -> str:
    """The operator's namespace, for the serving NetworkPolicy: the configuration's
    `operator_namespace` where it has one, else POD_NAMESPACE (the chart sets it from the Downward
    API); "" when neither says (then only this namespace's pods are let in)."""
    return str(getattr(config, "operator_namespace", "") or os.environ.get(OPERATOR_NAMESPACE_ENV, "") or "")


# --- writing children the generic helpers cannot -------------------------------------------------


def child_path(obj: dict[str, Any]) -> str:
    prefix, plural = CHILD_API[obj["kind"]]
    return f"/{prefix}/namespaces/{obj['metadata']['namespace']}/{plural}/{obj['metadata']['name']}"


def apply_secret(client: k8s.Client, obj: dict[str, Any]) -> None:
    """Server-side apply of the admin-key Secret. Never read (the operator may not read Secrets):
    the key is derived again when needed, and applying the same data again changes nothing."""
    query = {"fieldManager": k8s.FIELD_MANAGER, "force": "true"}
    client.request("PATCH", child_path(obj), obj, query, k8s.APPLY_PATCH)


def ensure_other_child(client: k8s.Client, obj: dict[str, Any], owner_uid: str) -> dict[str, Any]:
    """`writes.ensure_child` for a kind outside k8s.PLURALS (the NetworkPolicy): a namesake that
    is not this object's is never taken over."""
    path = child_path(obj)
    existing = client.get(path)
    if existing is not None and (is_terminating(existing) or not owned_by(existing, owner_uid)):
        raise kopf.TemporaryError(
            f"{obj['kind']} {obj['metadata']['name']} exists but is not this {KIND}'s; waiting for it to go", delay=3
        )
    query = {"fieldManager": k8s.FIELD_MANAGER, "force": "true"}
    return client.request("PATCH", path, obj, query, k8s.APPLY_PATCH)


UNREADABLE: set[str] = set()  # kinds of optional children the operator was refused reading


def ensure_or_remove(
    client: k8s.Client, kind: str, name: str, namespace: str, obj: dict[str, Any] | None, owner_uid: str
) -> None:
    """Apply the optional child `obj` (`ensure_other_child`), or, when it is None, delete the `kind`
    named `name` if this object owns it: autoscaling removed from the spec, replicas down to one.
    A namesake the AdapterDeployment does not own is never deleted."""
    if obj is not None:
        ensure_other_child(client, obj, owner_uid)
        return
    path = child_path({"kind": kind, "metadata": {"namespace": namespace, "name": name}})
    try:
        existing = client.get(path)
    except k8s.ApiError as error:
        if error.status != 403:
            raise
        # An operator that may not read them (a chart older than this code) cannot have created
        # any: nothing of ours to delete. Said once, not on every pass.
        if kind not in UNREADABLE:
            UNREADABLE.add(kind)
            log.warning("the operator may not read %s objects (%s); update the chart's RBAC", kind, error)
        return
    if existing is None or is_terminating(existing) or not owned_by(existing, owner_uid):
        return
    if client.delete(path, uid=existing["metadata"].get("uid")):
        log.info("deleted %s %s/%s: no longer wanted", kind, namespace, name)


# --- what replicas said, between passes ----------------------------------------------------------


@dataclass
class Memory:
    """Per AdapterDeployment: pod → adapter → (URI, message) of refused loads, and pod → adapter →
    `Retry` of answers that may yet change, both as of `generation` of the spec."""

    generation: int
    refused: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    retries: dict[str, dict[str, Retry]] = field(default_factory=dict)


def memories(state: OperatorState) -> dict[Key, Memory]:
    """The operator's memory of replicas' answers (kept on the state, made on first use)."""
    found: dict[Key, Memory] | None = getattr(state, "adapter_memory", None)
    if found is None:
        found = {}
        state.adapter_memory = found  # type: ignore[attr-defined]
    return found


def remembered(state: OperatorState, key: Key, generation: int) -> Memory:
    """What replicas said before, forgotten when the spec changed since."""
    memory = memories(state).get(key)
    if memory is None or memory.generation != generation:
        memory = Memory(generation)
    return memory


def remember(state: OperatorState, key: Key, memory: Memory, replicas: list[Replica], pods: dict[str, Any]) -> None:
    """Keep what the replicas said for the next pass: those asked now, and pods that exist but were
    not asked (not ready just now); pods that are gone are forgotten."""
    asked = {r.name for r in replicas}
    refused = {p: f for p, f in memory.refused.items() if p not in asked and p in pods}
    errors = {p: e for p, e in memory.retries.items() if p not in asked and p in pods}
    refused.update({r.name: r.failed for r in replicas if r.failed})
    errors.update({r.name: r.retries for r in replicas if r.retries})
    memories(state)[key] = Memory(memory.generation, refused, errors)
    state.refused_loads[key] = refused  # the same refusals, where the rest of the operator looks


def forget(state: OperatorState, key: Key) -> None:
    memories(state).pop(key, None)
    state.refused_loads.pop(key, None)


# --- talking to replicas -------------------------------------------------------------------------


def sync_replicas(runtime_name: str, wanted: list[Wanted], replicas: list[Replica], http: ReplicaClient) -> None:
    """Ask each replica what it has loaded, then load and unload what `plan_actions` says; the
    outcome is recorded in the `Replica` views. No load or unload starts once ACTIONS_BUDGET
    seconds went to them in this pass: a pass lasts at most that plus one load's deadline."""
    for replica in replicas:
        try:
            models = http.models(replica.url)
        except ReplicaError as error:
            replica.error = f"GET /v1/models: {error}"
            continue
        replica.loaded = adapters_from_models(models)
        replica.digests = digests_from_models(models)
    by_name = {r.name: r for r in replicas}
    started = time.monotonic()
    for action in plan_actions(wanted, replicas):
        if time.monotonic() - started > ACTIONS_BUDGET:
            log.info("%s: more loads and unloads left for the next pass", action.replica)
            break
        try:
            execute(http, runtime_name, by_name[action.replica], action)
        except ReplicaError as error:
            log.info("%s %s on %s failed: %s", action.verb, action.adapter, action.replica, error)


def unload(http: ReplicaClient, replica: Replica, adapter: str) -> bool:
    assert replica.loaded is not None
    answer = http.unload(replica.url, adapter)
    if answer.ok or answer.status == 404:
        replica.loaded.pop(adapter, None)
        replica.unload_failed.pop(adapter, None)
        return True
    replica.unload_failed[adapter] = runtime.error_message(answer)
    return False


def execute(http: ReplicaClient, runtime_name: str, replica: Replica, action: Action) -> None:
    assert replica.loaded is not None
    if action.verb == "unload":
        unload(http, replica, action.adapter)
        return
    try:
        path = adapter_path(runtime_name, action.uri)
    except RenderError as error:
        replica.failed[action.adapter] = (action.uri, str(error))
        return
    answer = http.load(replica.url, action.adapter, path)
    verdict = runtime.outcome(answer.status, runtime.error_message(answer) if not answer.ok else "")
    if verdict == runtime.CONFLICT:  # served under this name already: unload, then load once more
        if not unload(http, replica, action.adapter):
            return  # the unload's problem is reported; tried again next pass
        answer = http.load(replica.url, action.adapter, path)
        message = runtime.error_message(answer) if not answer.ok else ""
        verdict = runtime.outcome(answer.status, message)  # a second conflict an unload cannot fix: refused
    record(replica, action, path, answer.status, runtime.error_message(answer) if not answer.ok else "", verdict)


def record(replica: Replica, action: Action, path: str, status: int, message: str, verdict: str) -> None:
    """What a load's answer means for the replica's view (see runtime.py)."""
    assert replica.loaded is not None
    name, uri = action.adapter, action.uri
    said = message or f"HTTP {status}"
    if verdict == runtime.LOADED:
        replica.loaded[name] = path  # as the runtime reports it in /v1/models
        replica.failed.pop(name, None)
        replica.retries.pop(name, None)
    elif verdict == runtime.ACCEPTED:
        replica.retries.pop(name, None)  # loading in the background; /v1/models tells next pass
    elif verdict in (runtime.REFUSED, runtime.CONFLICT):
        replica.failed[name] = (uri, said)
    elif verdict == runtime.NOT_FOUND or runtime.counts_as_server_error(status):
        before = replica.retries.get(name)
        now = time.monotonic()
        retry = (
            Retry(uri, before.count + 1, before.since, said)
            if before is not None and before.uri == uri
            else Retry(uri, 1, now, said)
        )
        replica.retries[name] = retry
        if verdict == runtime.NOT_FOUND and now - retry.since >= runtime.NOT_FOUND_GRACE:
            replica.failed[name] = (uri, said)
        elif verdict != runtime.NOT_FOUND and retry.count >= runtime.SERVER_ERROR_LIMIT:
            replica.failed[name] = (uri, f"the runtime failed {retry.count} times in a row: {said}")
        log.info("loading %s on %s: HTTP %s %s", name, replica.name, status, said)
    else:  # 401/403/429/503/504...: tried again next pass
        log.info("loading %s on %s: HTTP %s %s", name, replica.name, status, said)

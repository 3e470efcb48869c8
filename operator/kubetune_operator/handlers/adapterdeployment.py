"""kopf handlers of AdapterDeployment, and the adapter sync loop.

create/resume/update: apply the adapters ConfigMap, the Service and the Deployment (created once,
409 = exists; patched when the adapters, the rendered pod template, replicas or Service differ), then
sync adapters and status. The sync loop (started here, not a kopf timer: timers force finalizers)
repeats the whole reconcile for every AdapterDeployment each `metricsScrapeIntervalSeconds`: it
resolves `fromJob` adapters, rewrites the adapters ConfigMap, asks every ready replica for
/v1/models over HTTP (http://<podIP>:<port>), loads what is missing and unloads what is no longer
wanted, and writes the status only when it changed.

Testing hook: with the operator's --allow-metrics-url-annotation switch
(KUBETUNE_OPERATOR_ALLOW_METRICS_URL_ANNOTATION=1), the annotation `kubetune.io/replica-urls`
(comma-separated base URLs) replaces the pod IPs of the ready replicas, in pod-name order.
"""

import asyncio
import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import kopf
from pydantic import ValidationError

from kubetune.api.adapterdeployment import AdapterDeployment
from kubetune.api.common import GROUP, VERSION

from .. import adapters as ad_logic
from .. import k8s, metrics
from ..jobsync import is_terminating, owned_by
from ..render.adapterdeployment import (
    SPEC_HASH_ANNOTATION,
    adapter_path,
    label_selector,
    readable_path,
    render_adapterdeployment,
)
from ..render.common import RenderError
from ..status import merge_patch
from . import REGISTRY

KIND = "AdapterDeployment"
ADEP = (GROUP, VERSION, "adapterdeployments")
REPLICA_URLS_ANNOTATION = "kubetune.io/replica-urls"
BACKOFF = 5
QUERY_TIMEOUT = 5.0
LOAD_TIMEOUT = 120.0
log = logging.getLogger("kubetune.operator")

Key = tuple[str, str]


def adep_path(namespace: str, name: str = "") -> str:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/adapterdeployments"
    return f"{base}/{name}" if name else base


def deployment_path(namespace: str, name: str = "") -> str:
    base = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    return f"{base}/{name}" if name else base


def service_path(namespace: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{namespace}/services"
    return f"{base}/{name}" if name else base


@dataclass
class AdapterState:
    """What the operator remembers between syncs: the AdapterDeployments it handled (added by the
    create/resume/update handlers, dropped once gone: no watch-event handler is needed) and, per one
    and per replica (pod), the loads the runtime refused (not retried for the same URI)."""

    keys: set[Key] = field(default_factory=set)
    failures: dict[Key, dict[str, dict[str, tuple[str, str]]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    task: asyncio.Task | None = None

    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self.lock:
            if event_type == "DELETED":
                self.keys.discard(key)
                self.failures.pop(key, None)
            else:
                self.keys.add(key)

    def watched(self) -> list[Key]:
        with self.lock:
            return sorted(self.keys)


def state_of(memo: kopf.Memo) -> AdapterState:
    state = getattr(memo, "adapter_state", None)
    if state is None:
        state = memo.adapter_state = AdapterState()
    return state


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
    names = {a["fromJob"] for a in spec.get("adapters") or [] if a.get("fromJob")}
    return {name: client.get(k8s.finetunejob_path(namespace, name)) for name in sorted(names)}


def is_ready(pod: dict[str, Any]) -> bool:
    if is_terminating(pod) or (pod.get("status") or {}).get("phase") != "Running":
        return False
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def replica_urls(
    body: dict[str, Any], pods: list[dict[str, Any]], port: int, allow_override: bool
) -> list[tuple[str, str]]:
    """(pod name, base URL) of each ready replica."""
    ready = sorted((p for p in pods if is_ready(p)), key=lambda p: p["metadata"]["name"])
    override = ((body.get("metadata") or {}).get("annotations") or {}).get(REPLICA_URLS_ANNOTATION)
    if allow_override and override:
        urls = [u.strip().rstrip("/") for u in override.split(",") if u.strip()]
        return [(p["metadata"]["name"], url) for p, url in zip(ready, urls, strict=False)]
    return [
        (p["metadata"]["name"], f"http://{p['status']['podIP']}:{port}")
        for p in ready
        if (p.get("status") or {}).get("podIP")
    ]


# --- talking to replicas -------------------------------------------------------------------------


def error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:2000] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return str(body)[:2000]


def query(http: httpx.Client, replica: ad_logic.Replica) -> None:
    try:
        response = http.get(f"{replica.url}/v1/models", timeout=QUERY_TIMEOUT)
        response.raise_for_status()
        models = response.json()
        replica.loaded = ad_logic.adapters_from_models(models)
        replica.digests = ad_logic.digests_from_models(models)
    except (httpx.HTTPError, ValueError) as error:
        replica.error = f"GET /v1/models: {error}"


def execute(http: httpx.Client, runtime_kind: str, replica: ad_logic.Replica, action: ad_logic.Action) -> None:
    assert replica.loaded is not None
    try:
        if action.verb == "unload":
            response = http.post(
                f"{replica.url}/v1/unload_lora_adapter", json={"lora_name": action.adapter}, timeout=LOAD_TIMEOUT
            )
            if response.is_success or response.status_code == 404:
                replica.loaded.pop(action.adapter, None)
            else:
                replica.unload_failed[action.adapter] = error_message(response)
            return
        try:
            path = adapter_path(runtime_kind, action.uri)
        except RenderError as error:
            replica.failed[action.adapter] = (action.uri, str(error))
            return
        response = http.post(
            f"{replica.url}/v1/load_lora_adapter",
            json={"lora_name": action.adapter, "lora_path": path},
            timeout=LOAD_TIMEOUT,
        )
        if response.is_success:
            replica.loaded[action.adapter] = path  # as the runtime reports it in /v1/models
            replica.failed.pop(action.adapter, None)
        elif 400 <= response.status_code < 500:
            replica.failed[action.adapter] = (action.uri, error_message(response))
        else:  # 5xx: transient (e.g. the base model still loading); tried again next sync
            log.info(
                "loading %s on %s: HTTP %s %s",
                action.adapter,
                replica.name,
                response.status_code,
                error_message(response),
            )
    except httpx.HTTPError as error:
        log.info("%s %s on %s failed: %s", action.verb, action.adapter, replica.name, error)


# --- the reconcile -------------------------------------------------------------------------------


def with_runtime_path(want: ad_logic.Wanted, runtime_kind: str) -> ad_logic.Wanted:
    """`want` with the path its runtime loads and reports back (vLLM: pvc://C/P → /mnt/pvc/C/P), so
    that an adapter loaded as wanted is recognised as such in /v1/models."""
    if want.uri is None:
        return want
    return dataclasses.replace(want, path=readable_path(runtime_kind, want.uri))


def reconcile_adapterdeployment(runtime: Any, state: AdapterState, namespace: str, name: str) -> None:
    with metrics.reconcile_observed(KIND) as outcome:
        try:
            with runtime.locks.hold((namespace, f"adapterdeployment/{name}")):
                reconcile(runtime, state, (namespace, name))
        except kopf.TemporaryError:
            outcome["result"] = "retry"
            raise
        outcome["result"] = "ok"


def reconcile(runtime: Any, state: AdapterState, key: Key) -> None:
    namespace, name = key
    client: k8s.Client = runtime.client
    body = client.get(adep_path(namespace, name))
    if body is None or is_terminating(body):
        state.observe("DELETED", {"metadata": {"namespace": namespace, "name": name}})
        return
    obj = parse(body)
    if obj is None:
        return
    spec_wire = body.get("spec") or {}
    wanted = [
        with_runtime_path(w, obj.spec.runtime)
        for w in ad_logic.resolve(spec_wire.get("adapters") or [], fetch_jobs(client, namespace, spec_wire))
    ]
    from_jobs = {a["name"] for a in spec_wire.get("adapters") or [] if a.get("fromJob")}
    try:
        objects = render_adapterdeployment(
            obj, runtime.config, {w.name: w.uri for w in wanted if w.uri and w.name in from_jobs}
        )
    except RenderError as error:
        log.warning("%s", error)
        return
    uid = body["metadata"]["uid"]
    apply_adapters_configmap(client, objects.adapters, uid)
    apply_service(client, objects.service, uid)
    deployment = apply_deployment(client, objects.deployment, uid)

    pods = client.list(k8s.pods_path(namespace), label_selector(name))
    port = obj.spec.service.port
    known = state.failures.get(key, {})
    replicas = [
        ad_logic.Replica(pod, url, failed=dict(known.get(pod, {})))
        for pod, url in replica_urls(body, pods, port, runtime.allow_metrics_url)
    ]
    with httpx.Client() as http:
        for replica in replicas:
            query(http, replica)
        by_name = {r.name: r for r in replicas}
        for action in ad_logic.plan_actions(wanted, replicas):
            execute(http, obj.spec.runtime, by_name[action.replica], action)
    state.failures[key] = {r.name: r.failed for r in replicas if r.failed} | {
        pod: failed
        for pod, failed in known.items()
        if pod not in by_name and any(p["metadata"]["name"] == pod for p in pods)
    }

    dep_status = (deployment or {}).get("status") or {}
    dep_meta = (deployment or {}).get("metadata") or {}
    observed = ad_logic.Observed(
        name=name, namespace=namespace, port=port, generation=body["metadata"].get("generation"),
        replicas=obj.spec.replicas, existing=int(dep_status.get("replicas") or 0),
        ready=int(dep_status.get("readyReplicas") or 0), updated=int(dep_status.get("updatedReplicas") or 0),
        deployment_observed=deployment is not None
        and int(dep_status.get("observedGeneration") or 0) >= int(dep_meta.get("generation") or 0),
        wanted=wanted, replica_views=replicas, now=datetime.now(UTC),
    )  # fmt: skip
    write_status(client, body, ad_logic.derive_status(body.get("status"), observed))


def apply_adapters_configmap(client: k8s.Client, configmap: dict[str, Any], uid: str) -> None:
    """Created once, then its data replaced when the wanted adapters change (the replicas follow
    the mounted file; no pod restarts)."""
    meta = configmap["metadata"]
    if client.create(k8s.object_path(configmap), configmap):
        log.info("created ConfigMap %s/%s", meta["namespace"], meta["name"])
        return
    path = k8s.object_path(configmap, meta["name"])
    existing = client.get(path)
    check_ours(existing, uid, "ConfigMap", meta["name"])
    if existing.get("data") != configmap["data"]:
        client.merge_patch(path, {"data": configmap["data"]})
        log.info("updated the adapters of ConfigMap %s/%s", meta["namespace"], meta["name"])


def apply_service(client: k8s.Client, service: dict[str, Any], uid: str) -> None:
    meta = service["metadata"]
    if client.create(service_path(meta["namespace"]), service):
        log.info("created Service %s/%s", meta["namespace"], meta["name"])
        return
    existing = client.get(service_path(meta["namespace"], meta["name"]))
    check_ours(existing, uid, "Service", meta["name"])
    spec = existing["spec"]
    current_ports = [{k: p.get(k) for k in ("name", "port", "targetPort", "protocol")} for p in spec.get("ports") or []]
    if spec.get("type") != service["spec"]["type"] or current_ports != service["spec"]["ports"]:
        client.merge_patch(
            service_path(meta["namespace"], meta["name"]),
            {"spec": {"type": service["spec"]["type"], "ports": service["spec"]["ports"]}},
        )
        log.info("patched Service %s/%s", meta["namespace"], meta["name"])


def apply_deployment(client: k8s.Client, deployment: dict[str, Any], uid: str) -> dict[str, Any] | None:
    meta = deployment["metadata"]
    path = deployment_path(meta["namespace"], meta["name"])
    if client.create(deployment_path(meta["namespace"]), deployment):
        log.info("created Deployment %s/%s", meta["namespace"], meta["name"])
        return client.get(path)
    existing = client.get(path)
    check_ours(existing, uid, "Deployment", meta["name"])
    assert existing is not None
    wanted_hash = meta["annotations"][SPEC_HASH_ANNOTATION]
    if (existing["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION) != wanted_hash:
        spec = deployment["spec"]
        patch = {
            "metadata": {"annotations": {SPEC_HASH_ANNOTATION: wanted_hash}},
            "spec": {"replicas": spec["replicas"], "strategy": spec["strategy"], "template": spec["template"]},
        }
        existing = client.merge_patch(path, patch)
        log.info("patched Deployment %s/%s", meta["namespace"], meta["name"])
    return existing


def check_ours(existing: dict[str, Any] | None, uid: str, kind: str, name: str) -> None:
    if existing is None:
        raise kopf.TemporaryError(f"{kind} {name} vanished while being created; retrying", delay=1)
    if is_terminating(existing) or not owned_by(existing, uid):
        raise kopf.TemporaryError(
            f"{kind} {name} exists but is not this AdapterDeployment's; waiting for it to go", delay=3
        )


def write_status(client: k8s.Client, body: dict[str, Any], desired: dict[str, Any]) -> bool:
    current = body.get("status") or {}
    patch = merge_patch(current, desired)
    if patch is None:
        return False
    meta = body["metadata"]
    request = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": patch}
    try:
        client.merge_patch(adep_path(meta["namespace"], meta["name"]) + "/status", request)
    except k8s.ApiError as error:
        if error.status == 409:  # changed meanwhile: the next sync derives it again
            return False
        raise
    metrics.STATUS_WRITES.inc()
    for change in ad_logic.c.transitions(current.get("conditions"), desired.get("conditions")):
        bad = (change.type == ad_logic.DEGRADED and change.status == "True") or (
            change.type in (ad_logic.AVAILABLE, ad_logic.ADAPTERS_READY) and change.status == "False"
        )
        try:
            client.post_event(
                body,
                "Warning" if bad else "Normal",
                change.reason or change.type,
                f"{change.type}={change.status}: {change.message}",
            )
        except k8s.ApiError as error:
            log.warning("could not post an Event for %s: %s", meta["name"], error)
    return True


# --- kopf ----------------------------------------------------------------------------------------


def _reconcile(body: kopf.Body, memo: kopf.Memo) -> None:
    runtime = getattr(memo, "runtime", None)
    if runtime is None:
        raise kopf.TemporaryError("the operator is starting", delay=1)
    state = state_of(memo)
    state.observe(None, dict(body))
    reconcile_adapterdeployment(runtime, state, body["metadata"]["namespace"], body["metadata"]["name"])


@kopf.on.resume(*ADEP, registry=REGISTRY, backoff=BACKOFF)
@kopf.on.create(*ADEP, registry=REGISTRY, backoff=BACKOFF)
@kopf.on.update(*ADEP, field="spec", registry=REGISTRY, backoff=BACKOFF)
def adapterdeployment_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _reconcile(body, memo)


@kopf.on.startup(registry=REGISTRY)
async def start_adapter_sync(memo: kopf.Memo, **_: Any) -> None:
    state = state_of(memo)
    state.task = asyncio.create_task(sync_loop(memo, state), name="kubetune-adapter-sync")


@kopf.on.cleanup(registry=REGISTRY)
async def stop_adapter_sync(memo: kopf.Memo, **_: Any) -> None:
    state: AdapterState | None = getattr(memo, "adapter_state", None)
    if state is not None and state.task is not None:
        state.task.cancel()
        try:
            await state.task
        except asyncio.CancelledError:
            pass


async def sync_loop(memo: kopf.Memo, state: AdapterState) -> None:
    """Every interval: the whole reconcile of every watched AdapterDeployment (adapters resolved,
    loaded and unloaded on each ready replica, status refreshed). Errors are logged per object."""
    while getattr(memo, "runtime", None) is None:
        await asyncio.sleep(0.1)
    runtime = memo.runtime

    async def one(key: Key) -> None:
        try:
            await asyncio.to_thread(reconcile_adapterdeployment, runtime, state, *key)
        except Exception:  # noqa: BLE001 - one object's trouble must not stop the others
            log.exception("adapter sync of AdapterDeployment %s/%s failed", *key)

    while True:
        await asyncio.sleep(runtime.interval)
        await asyncio.gather(*(one(key) for key in state.watched()))

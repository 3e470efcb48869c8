"""An AdapterDeployment's status from its Deployment and what its replicas report: pure functions.

Conditions: Available (a replica is ready), Progressing (replicas rolling, or adapters loading or
unloading), AdaptersReady (every wanted adapter loaded on every ready replica), Degraded (a load
refused, the replicas serve different weights than the FineTuneJob reported, or a replica does not
answer). `status.adapters` lists each adapter's state; sha256 comes from the FineTuneJob or from
the replicas, and a mismatch fails the adapter.

While replicas are not ready, what Kubernetes says holds them (`stuck.diagnose` over the serving
pods, the Deployment's ReplicaFailure condition and the pods' FailedMount Events) is told: on
Available=False as its reason (FailedCreate, Unschedulable, ErrImagePull, CrashLoopBackOff,
OOMKilled, ...) and message, and, when only a person can clear it, on Degraded=True as well (also
while other replicas serve: a rollout stuck on a bad image), which makes the AdapterDeployment
Stalled. A replica waiting for capacity (Unschedulable for insufficient GPUs) is not Degraded.

Beside them, restating them for kstatus readers (Flux, kpt): Ready (Available, every adapter
Loaded), Reconciling (work in flight that ends by itself) and Stalled (a refused spec, a Failed or
Rejected adapter, a failed FineTuneJob: nothing changes until a person acts); `kstatus_conditions`.

A Rejected adapter (its FineTuneJob's evaluation fails a `require` rule) is not ready: AdaptersReady
is False with reason AdapterRejected (after an untrusted source and a refused load, which point at
something broken). It does not make the AdapterDeployment Degraded: keeping it out is the gate
working, and what is served is what the spec allows; it does make it Stalled (retraining or
changing the rules is a person's call). While replicas still have it loaded (a rule
added after the load) it is being unloaded: Progressing. `newly_rejected` says which adapters
became Rejected since the status as read, for one Warning Event each (reason AdapterRejected).

For the scale subresource (`kubectl scale`, HorizontalPodAutoscalers): `replicas` is the number of
serving pods that exist, ready or not (the Deployment's status.replicas, what a Deployment's own
scale reports as current), and `selector` the label selector of those pods. `readyReplicas` counts
only replicas that are ready AND have every wanted adapter loaded: a replica added by scaling up
counts once its adapters are in.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune.api.merging import is_merge_path

from .. import conditions as c
from ..stuck import REASONS as STUCK_REASONS
from ..stuck import Diagnosis
from .adapters import (
    ADAPTER_REJECTED,
    FAILED,
    JOB_FAILED,
    LOADED,
    LOADING,
    PENDING,
    REJECTED,
    UNLOADING,
    UNSERVABLE,
    UNTRUSTED,
    WAITING_FOR_JOB,
    Replica,
    Wanted,
    has,
)
from .render import label_selector

# Condition types of an AdapterDeployment.
AVAILABLE = "Available"
PROGRESSING = "Progressing"
ADAPTERS_READY = "AdaptersReady"
DEGRADED = "Degraded"


def is_warning(change: c.Transition) -> bool:
    """Which condition flips are posted as Warning Events."""
    if change.type == DEGRADED:
        return change.status == c.TRUE
    return change.type in (AVAILABLE, ADAPTERS_READY) and change.status == c.FALSE


def adapter_statuses(wanted: list[Wanted], replicas: list[Replica]) -> list[dict[str, Any]]:
    """status.adapters, spec order, then adapters still loaded somewhere but no longer wanted."""
    answering = [r for r in replicas if r.loaded is not None]
    out: list[dict[str, Any]] = []
    for want in wanted:
        entry: dict[str, Any] = {"name": want.name}
        if want.problem:  # never sent to a replica: its URI breaks the rules or its job's bounds
            entry.update(state=FAILED, loadedReplicas=0, message=want.problem)
            out.append(entry)
            continue
        if want.rejected:  # its job's evaluation fails a rule: never loaded; unloaded where it still is
            still = sum(1 for r in answering if want.name in (r.loaded or {}))
            entry.update(state=REJECTED, loadedReplicas=still, message=want.rejected)
            out.append(entry)
            continue
        if want.uri is None:
            entry.update(state=PENDING, loadedReplicas=0, message=want.pending)
            out.append(entry)
            continue
        if not is_merge_path(want.uri):  # a merge's path names all its sources: longer than the field holds
            entry["uri"] = want.uri
        served = {r.digests[want.name] for r in answering if has(r, want) and want.name in r.digests}
        sha256 = want.sha256 or (min(served) if len(served) == 1 else None)
        if sha256:
            entry["sha256"] = sha256
        loaded = sum(1 for r in answering if has(r, want))
        entry["loadedReplicas"] = loaded
        refusals = [r.failed[want.name][1] for r in answering if r.failed.get(want.name, ("", ""))[0] == want.uri
                    and not has(r, want)]  # fmt: skip
        different = sorted(served - {sha256}) if sha256 else sorted(served)
        if refusals:
            entry.update(state=FAILED, message=refusals[0])
        elif different:  # the files at the URI were replaced, or replicas loaded it at different times
            expected = f"the FineTuneJob reported {want.sha256[:12]}" if want.sha256 else "the replicas disagree"
            entry.update(
                state=FAILED,
                message=f"replicas serve weights with sha256 {', '.join(d[:12] for d in different)}; {expected}",
            )
        elif not answering:
            entry.update(state=PENDING, message="no ready replica to load it on yet")
        elif loaded == len(answering):
            entry["state"] = LOADED
        else:
            entry.update(state=LOADING, message=f"loaded on {loaded} of {len(answering)} ready replicas")
        out.append(entry)
    wanted_names = {w.name for w in wanted}
    leftovers = sorted({n for r in answering for n in r.loaded or {} if n not in wanted_names})
    for name in leftovers:
        still = sum(1 for r in answering if name in (r.loaded or {}))
        entry = {"name": name, "state": UNLOADING, "loadedReplicas": still}
        problems = [r.unload_failed[name] for r in answering if name in r.unload_failed]
        if problems:
            entry["message"] = problems[0]
        out.append(entry)
    return out


def adapters_ready_reason(states: list[str], waiting_reasons: list[str]) -> str:
    """Why AdaptersReady is False, the most actionable first: an untrusted source, a refused load,
    an adapter its job's evaluation keeps out, a failed job, a job still running, no replica to load
    on, loads under way."""
    if UNTRUSTED in waiting_reasons:
        return UNTRUSTED
    if FAILED in states:
        return "AdapterFailed"
    if REJECTED in states:
        return ADAPTER_REJECTED
    for reason in (JOB_FAILED, WAITING_FOR_JOB):
        if reason in waiting_reasons:
            return reason
    return "AdaptersPending" if PENDING in states else "AdaptersLoading"


@dataclass(frozen=True)
class Observed:
    """What the status is derived from."""

    name: str
    namespace: str
    port: int
    generation: int | None
    replicas: int  # wanted (spec.replicas)
    existing: int  # the Deployment's status.replicas: status.replicas, the scale subresource's current count
    ready: int  # the Deployment's status.readyReplicas
    updated: int  # the Deployment's status.updatedReplicas
    deployment_observed: bool  # the Deployment controller has seen its latest generation
    wanted: list[Wanted]
    replica_views: list[Replica]
    now: datetime
    stuck: Diagnosis | None = None  # why serving pods do not run (`stuck.diagnose`), if Kubernetes says


def derive_status(current: Mapping[str, Any] | None, obs: Observed) -> dict[str, Any]:
    current = current or {}
    adapters = adapter_statuses(obs.wanted, obs.replica_views)
    states = [a["state"] for a in adapters]
    wanted_count = len(obs.wanted)
    loaded_count = sum(1 for a in adapters[:wanted_count] if a["state"] == LOADED)
    answering = [r for r in obs.replica_views if r.loaded is not None]
    complete = sum(1 for r in answering if all(has(r, w) for w in obs.wanted if w.uri is not None
                                                and r.failed.get(w.name, ("", ""))[0] != w.uri))  # fmt: skip
    ready = min(obs.ready, complete) if obs.replica_views else 0
    conds = current.get("conditions")
    gen, now = obs.generation, obs.now

    def put(type_: str, ok: bool, reason: str, message: str) -> None:
        nonlocal conds
        conds = c.set_condition(conds, type_, c.TRUE if ok else c.FALSE, reason, message, gen, now)

    if obs.ready >= 1:
        put(AVAILABLE, True, "ReplicasReady", f"{obs.ready} of {obs.replicas} replicas ready")
    elif obs.stuck is not None:
        put(AVAILABLE, False, obs.stuck.reason, f"0 of {obs.replicas} replicas ready; {obs.stuck.message}")
    else:
        put(AVAILABLE, False, "NoReadyReplicas", f"0 of {obs.replicas} replicas ready")

    rolling = (
        not obs.deployment_observed
        or obs.updated < obs.replicas
        or obs.existing > obs.replicas
        or obs.ready < obs.replicas
    )
    busy = [a["name"] for a in adapters if a["state"] in (LOADING, UNLOADING)
            or (a["state"] == REJECTED and a.get("loadedReplicas"))]  # fmt: skip
    if rolling:
        put(
            PROGRESSING,
            True,
            "ReplicasUpdating",
            f"{obs.ready} of {obs.replicas} replicas ready, {obs.updated} up to date",
        )
    elif busy:
        put(PROGRESSING, True, "AdaptersChanging", "loading or unloading: " + ", ".join(busy))
    else:
        put(PROGRESSING, False, "Stable", "replicas and adapters are as the spec says")

    waiting = [a["name"] for a in adapters[:wanted_count] if a["state"] not in (LOADED, REJECTED)]
    rejected = [a["name"] for a in adapters[:wanted_count] if a["state"] == REJECTED]
    if not waiting and not rejected:
        put(ADAPTERS_READY, True, "AllLoaded", f"{loaded_count}/{wanted_count} adapters loaded on every ready replica")
    else:
        reason = adapters_ready_reason(states, [w.reason for w in obs.wanted if w.uri is None])
        parts = [f"not yet: {', '.join(waiting)}"] if waiting else []
        if rejected:
            parts.append(f"rejected by require rules: {', '.join(rejected)} (see status.adapters)")
        put(ADAPTERS_READY, False, reason, f"{loaded_count}/{wanted_count} loaded; " + "; ".join(parts))

    failed = [f"{a['name']}: {a.get('message', '')}" for a in adapters if a["state"] == FAILED]
    unreachable = [f"{r.name}: {r.error}" for r in obs.replica_views if r.loaded is None]
    if failed:
        # a problem is an untrusted source, unless it is what the runtime cannot serve (a person's choice)
        untrusted = any(w.problem and w.reason != UNSERVABLE for w in obs.wanted)
        put(DEGRADED, True, UNTRUSTED if untrusted else "AdapterFailed", "; ".join(failed + unreachable))
    elif obs.stuck is not None and obs.stuck.needs_person:
        put(DEGRADED, True, obs.stuck.reason, obs.stuck.message)
    elif unreachable:
        put(DEGRADED, True, "ReplicaUnreachable", "; ".join(unreachable))
    else:
        put(DEGRADED, False, "Healthy", "no adapter failed and every ready replica answers")

    conds = kstatus_conditions(conds, adapters, gen, now, obs.deployment_observed)
    status: dict[str, Any] = {
        "conditions": conds,
        "replicas": obs.existing,
        "readyReplicas": ready,
        "endpoint": f"http://{obs.name}.{obs.namespace}.svc:{obs.port}/v1",
        "adapters": adapters,
        "adaptersReady": f"{loaded_count}/{wanted_count}",
        "selector": label_selector(obs.name),
    }
    if gen is not None:
        status["observedGeneration"] = gen
    # Keep fields we do not own (none today) as they are.
    return {**{k: v for k, v in current.items() if k not in status}, **status}


# Why an AdapterDeployment waits on a person: the operator refused its spec (Degraded), an adapter
# cannot be served as named (Failed, untrusted) or its FineTuneJob failed or was rejected by a rule.
REFUSALS = ("NotAllowed", "InvalidSpec")
STALLED_ADAPTER_REASONS = ("AdapterFailed", UNTRUSTED, ADAPTER_REJECTED, JOB_FAILED)


def said(condition: Mapping[str, Any], key: str, default: str) -> str:
    """A condition's reason or message as stored, or `default`: the status may have been edited."""
    value = condition.get(key)
    return value if isinstance(value, str) and value else default


def stalled_reason(conds: c.Conditions, adapters: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(reason, message) when nothing changes until a person acts, else None. A replica that does
    not answer (Degraded, reason ReplicaUnreachable) is not that: it may come back by itself; a
    replica Kubernetes cannot run (Degraded with a `stuck` reason, set only when it needs a
    person: an image that cannot be pulled, a crash loop, a missing claim) is."""
    degraded = c.find(conds, DEGRADED) or {}
    if degraded.get("status") == c.TRUE and degraded.get("reason") in REFUSALS:
        return said(degraded, "reason", "Degraded"), said(degraded, "message", "refused")
    if degraded.get("status") == c.TRUE and degraded.get("reason") in STUCK_REASONS:
        return said(degraded, "reason", "Degraded"), said(degraded, "message", "a replica cannot run")
    stuck = [a for a in adapters if isinstance(a, Mapping) and a.get("state") in (FAILED, REJECTED)]
    if stuck:
        reason = ADAPTER_REJECTED if all(a.get("state") == REJECTED for a in stuck) else "AdapterFailed"
        if degraded.get("status") == c.TRUE and degraded.get("reason") == UNTRUSTED:
            reason = UNTRUSTED
        message = "; ".join(f"adapter {a.get('name')} is {a.get('state')}: {a.get('message', '')}" for a in stuck)
        return reason, message
    ready = c.find(conds, ADAPTERS_READY) or {}
    if ready.get("status") == c.FALSE and ready.get("reason") in STALLED_ADAPTER_REASONS:
        return said(ready, "reason", ADAPTERS_READY), said(ready, "message", "adapters wait on a person")
    return None


def not_ready_reason(conds: c.Conditions, deployment_observed: bool) -> tuple[str, str] | None:
    """(reason, message) while the AdapterDeployment does not serve everything its spec names; None
    when it does: a replica ready, every adapter loaded, the Deployment at the latest spec."""
    available = c.find(conds, AVAILABLE) or {}
    if available.get("status") != c.TRUE:
        reason = said(available, "reason", "") if available.get("reason") in REFUSALS else "Unavailable"
        return reason, said(available, "message", "no replica is ready")
    ready = c.find(conds, ADAPTERS_READY) or {}
    if ready.get("status") != c.TRUE:
        return said(ready, "reason", "AdaptersNotReady"), said(ready, "message", "adapters are not loaded yet")
    if not deployment_observed:
        return "ReplicasUpdating", "the Deployment controller has not yet seen the latest spec"
    return None


def kstatus_conditions(
    conds: c.Conditions | None,
    adapters: list[dict[str, Any]],
    generation: int | None,
    now: datetime,
    deployment_observed: bool = True,
) -> c.Conditions:
    """Ready, Reconciling and Stalled from the other conditions and status.adapters.

    Ready: serving every adapter the spec names, at the Deployment's latest spec (also while
    replicas are added or rolled: Reconciling says so then, and kstatus reads InProgress until they
    are done); else False with what to act on first. Stalled: `stalled_reason`. Reconciling:
    replicas rolling, adapters loading or unloading on ready replicas, or waiting for a FineTuneJob
    still on its way. Stalled and Reconciling are never both True: kstatus takes whichever comes
    first in the list."""
    missing = not_ready_reason(conds or [], deployment_observed)
    stalled = stalled_reason(conds or [], adapters)
    progressing = c.find(conds, PROGRESSING) or {}
    ready_adapters = c.find(conds, ADAPTERS_READY) or {}
    waiting_for_job = ready_adapters.get("reason") == WAITING_FOR_JOB  # even with no replica (scaled to 0)

    def put(type_: str, ok: bool, reason: str, message: str) -> None:
        nonlocal conds
        conds = c.set_condition(conds, type_, c.TRUE if ok else c.FALSE, reason, message, generation, now)

    if missing is None:
        put(c.READY, True, "Ready", "every adapter is loaded on every ready replica")
    else:  # what needs a person first: it is what to act on
        put(c.READY, False, *(stalled or missing))
    if stalled is not None:
        put(c.RECONCILING, False, "Stalled", "waiting on a person: see Stalled")
        put(c.STALLED, True, *stalled)
        return conds or []
    if progressing.get("status") == c.TRUE:
        put(c.RECONCILING, True, said(progressing, "reason", PROGRESSING), said(progressing, "message", "rolling"))
    elif ready_adapters.get("status") == c.FALSE and (c.is_true(conds, AVAILABLE) or waiting_for_job):
        put(
            c.RECONCILING,
            True,
            said(ready_adapters, "reason", "AdaptersPending"),
            said(ready_adapters, "message", "loading"),
        )
    elif not deployment_observed:
        put(c.RECONCILING, True, "ReplicasUpdating", "the Deployment controller has not yet seen the latest spec")
    else:
        put(c.RECONCILING, False, "Stable", "replicas and adapters are as the spec says")
    put(c.STALLED, False, "AsExpected", "nothing waits on a person")
    return conds or []


def newly_rejected(before: Any, after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of `after` (status.adapters) that are Rejected and were not, or were for another
    reason (the job measured again, the rules changed), in `before` (the status as read): what gets
    a Warning Event. An adapter that stays Rejected for the same reason gets none on later passes."""
    previous = {
        a.get("name"): (a.get("state"), a.get("message"))
        for a in (before if isinstance(before, list) else [])
        if isinstance(a, Mapping)
    }
    return [a for a in after if a["state"] == REJECTED and previous.get(a["name"]) != (REJECTED, a.get("message"))]


def refused_status(
    current: Mapping[str, Any] | None, generation: int | None, error: str, now: datetime
) -> dict[str, Any]:
    """The status of an AdapterDeployment the operator refuses to render: Degraded=True with the
    reason (NotAllowed: an image outside the operator's allow-list; InvalidSpec: anything else) and
    the renderer's words, Available=False; other fields kept."""
    reason = "NotAllowed" if "not allowed by the operator" in error else "InvalidSpec"
    status = dict(current or {})
    conditions = status.get("conditions")
    conditions = c.set_condition(conditions, AVAILABLE, c.FALSE, reason, error, generation, now)
    conditions = c.set_condition(conditions, DEGRADED, c.TRUE, reason, error, generation, now)
    stored = status.get("adapters")
    adapters = [a for a in stored if isinstance(a, dict)] if isinstance(stored, list) else []
    status["conditions"] = kstatus_conditions(conditions, adapters, generation, now)
    status["observedGeneration"] = generation
    return status

"""AdapterDeployment adapters: what each replica must load or unload, and the status that follows.

Pure: plain values in, plain values out. The handler resolves the wanted adapters (a `fromJob`
adapter has a URI once its FineTuneJob has Succeeded), asks each ready replica for `/v1/models`,
executes the actions `plan_actions` returns, records the outcome in the `Replica` views, and calls
`derive_status`.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import conditions as c

# Condition types of an AdapterDeployment.
AVAILABLE = "Available"
PROGRESSING = "Progressing"
ADAPTERS_READY = "AdaptersReady"
DEGRADED = "Degraded"

PENDING, LOADING, LOADED, FAILED, UNLOADING = "Pending", "Loading", "Loaded", "Failed", "Unloading"

# Why a `fromJob` adapter has no URI yet (the AdaptersReady reason while it is so).
WAITING_FOR_JOB, JOB_FAILED = "WaitingForJob", "JobFailed"


@dataclass(frozen=True)
class Wanted:
    """An adapter of the spec: its URI once known, else why not (`reason`, `pending` in words)."""

    name: str
    uri: str | None = None
    sha256: str | None = None
    pending: str = ""
    reason: str = ""
    path: str | None = None  # what the runtime is given and reports as `root` (vLLM: a local path); None: the URI

    @property
    def root(self) -> str | None:
        return self.path or self.uri


@dataclass
class Replica:
    """One ready replica as seen by the operator. `loaded`: adapter name → the `root` the runtime
    reports (the path it was given; None when it does not say), None when the replica could not be asked. `failed`:
    adapter name → (URI, the runtime's message) for loads it refused; never retried on this replica
    for the same URI. `error`: why it could not be asked."""

    name: str
    url: str
    loaded: dict[str, str | None] | None = None
    digests: dict[str, str] = field(default_factory=dict)  # adapter name → sha256 of its weights, where told
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)
    unload_failed: dict[str, str] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class Action:
    replica: str
    verb: str  # "load" | "unload"
    adapter: str
    uri: str = ""


def adapters_from_models(models: Mapping[str, Any]) -> dict[str, str | None]:
    """The adapters in a /v1/models answer: the cards with a parent (the base model has none)."""
    return {card["id"]: card.get("root") for card in models.get("data") or [] if card.get("parent")}


def digests_from_models(models: Mapping[str, Any]) -> dict[str, str]:
    """The weights' sha256 of each adapter card that has one (the builtin runtime says; vLLM does not)."""
    return {
        card["id"]: card["sha256"]
        for card in models.get("data") or []
        if card.get("parent") and isinstance(card.get("sha256"), str)
    }


def resolve(spec_adapters: Iterable[Mapping[str, Any]], jobs: Mapping[str, Mapping[str, Any] | None]) -> list[Wanted]:
    """spec.adapters (wire form) → Wanted; `jobs`: FineTuneJob name → the object (None: absent)."""
    out = []
    for adapter in spec_adapters:
        name = adapter["name"]
        if adapter.get("uri"):
            out.append(Wanted(name, adapter["uri"]))
            continue
        job_name = adapter.get("fromJob") or ""
        job = jobs.get(job_name)
        if job is None:
            out.append(
                Wanted(name, pending=f"waiting for FineTuneJob {job_name} to exist and succeed", reason=WAITING_FOR_JOB)
            )
            continue
        status = job.get("status") or {}
        result = status.get("adapter") or {}
        if c.is_true(status.get("conditions"), c.SUCCEEDED) and result.get("uri"):
            out.append(Wanted(name, result["uri"], result.get("sha256")))
        elif c.is_true(status.get("conditions"), c.FAILED):
            failed = c.find(status.get("conditions"), c.FAILED) or {}
            out.append(
                Wanted(
                    name,
                    pending=f"FineTuneJob {job_name} failed: {failed.get('message', '')}".strip(),
                    reason=JOB_FAILED,
                )
            )
        else:
            out.append(Wanted(name, pending=f"waiting for FineTuneJob {job_name} to succeed", reason=WAITING_FOR_JOB))
    return out


def plan_actions(wanted: list[Wanted], replicas: list[Replica]) -> list[Action]:
    """Per replica that answered: unloads first (free slots), then loads. An adapter loaded from
    another URI than wanted is unloaded and loaded again; a load the replica refused for this URI
    is not retried there."""
    by_name = {w.name: w for w in wanted}
    actions: list[Action] = []
    for replica in replicas:
        if replica.loaded is None:
            continue
        for name, root in sorted(replica.loaded.items()):
            want = by_name.get(name)
            if want is None or (want.uri is not None and root is not None and root != want.root):
                actions.append(Action(replica.name, "unload", name))
        for want in wanted:
            if want.uri is None:
                continue
            current = has(replica, want)
            refused = replica.failed.get(want.name, ("", ""))[0] == want.uri
            if not current and not refused:
                actions.append(Action(replica.name, "load", want.name, want.uri))
    return actions


def has(replica: Replica, want: Wanted) -> bool:
    if replica.loaded is None or want.name not in replica.loaded:
        return False
    root = replica.loaded[want.name]
    return root is None or root == want.root


def adapter_statuses(wanted: list[Wanted], replicas: list[Replica]) -> list[dict[str, Any]]:
    """status.adapters, spec order, then adapters still loaded somewhere but no longer wanted."""
    answering = [r for r in replicas if r.loaded is not None]
    out: list[dict[str, Any]] = []
    for want in wanted:
        entry: dict[str, Any] = {"name": want.name}
        if want.uri is None:
            entry.update(state=PENDING, loadedReplicas=0, message=want.pending)
            out.append(entry)
            continue
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
            expected = f"the FineTuneJob reported {sha256[:12]}" if want.sha256 else "the replicas disagree"
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
    """Why AdaptersReady is False, the most actionable first: a refused load, a failed job, a job
    still running, no replica to load on, loads under way."""
    if FAILED in states:
        return "AdapterFailed"
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
    existing: int  # the Deployment's status.replicas
    ready: int  # the Deployment's status.readyReplicas
    updated: int  # the Deployment's status.updatedReplicas
    deployment_observed: bool  # the Deployment controller has seen its latest generation
    wanted: list[Wanted]
    replica_views: list[Replica]
    now: datetime


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
    else:
        put(AVAILABLE, False, "NoReadyReplicas", f"0 of {obs.replicas} replicas ready")

    rolling = (
        not obs.deployment_observed
        or obs.updated < obs.replicas
        or obs.existing > obs.replicas
        or obs.ready < obs.replicas
    )
    busy = [a["name"] for a in adapters if a["state"] in (LOADING, UNLOADING)]
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

    waiting = [a["name"] for a in adapters[:wanted_count] if a["state"] != LOADED]
    if not waiting:
        put(ADAPTERS_READY, True, "AllLoaded", f"{loaded_count}/{wanted_count} adapters loaded on every ready replica")
    else:
        reason = adapters_ready_reason(states, [w.reason for w in obs.wanted if w.uri is None])
        put(ADAPTERS_READY, False, reason, f"{loaded_count}/{wanted_count} loaded; not yet: " + ", ".join(waiting))

    failed = [f"{a['name']}: {a.get('message', '')}" for a in adapters if a["state"] == FAILED]
    unreachable = [f"{r.name}: {r.error}" for r in obs.replica_views if r.loaded is None]
    if failed or unreachable:
        reason = "AdapterFailed" if failed else "ReplicaUnreachable"
        put(DEGRADED, True, reason, "; ".join(failed + unreachable))
    else:
        put(DEGRADED, False, "Healthy", "no adapter failed and every ready replica answers")

    status: dict[str, Any] = {
        "conditions": conds,
        "replicas": obs.existing,
        "readyReplicas": ready,
        "endpoint": f"http://{obs.name}.{obs.namespace}.svc:{obs.port}/v1",
        "adapters": adapters,
        "adaptersReady": f"{loaded_count}/{wanted_count}",
    }
    if gen is not None:
        status["observedGeneration"] = gen
    # Keep fields we do not own (none today) as they are.
    return {**{k: v for k, v in current.items() if k not in status}, **status}

"""AdapterDeployment adapters: which are wanted, which replicas to ask, and what each replica must
load or unload.

Pure: plain values in, plain values out. The reconciler resolves the wanted adapters (a `fromJob`
adapter has a URI once its FineTuneJob has Succeeded), asks each ready replica (`replica_urls`) for
`/v1/models` through `replicas.ReplicaClient`, executes the actions `plan_actions` returns, records
the outcome in the `Replica` views, and derives the status from them (`status.derive_status`).

URIs read from a FineTuneJob are not trusted: anyone who may edit its status (or the trainer's
output) can write `status.adapter.uri`. `resolve` takes one only when it passes the URI rules and
lies under where that job publishes (`contract.adapter_uri(spec.output.uri)`); otherwise the
adapter is Failed with reason UNTRUSTED and nothing of it reaches a replica, a mount or the
allow-list. A spec URI failing the rules (admission should have refused it) is treated alike.

Promotion gates: a `fromJob` adapter may carry `require` rules on what its FineTuneJob measured
(status.evaluation and status.metrics; kubetune.api.evaluation). Once the job has Succeeded, an
adapter failing one is Rejected (`promotion_problem`): never loaded, unloaded where it was (a rule
added after the load), left out of the replicas' adapters file, and its status says which rule
failed, with the value and the bound. A job still running is waited for as without rules: its
measurements are not final until it has Succeeded.

Testing hook: with the operator's --allow-metrics-url-annotation switch
(KUBETUNE_OPERATOR_ALLOW_METRICS_URL_ANNOTATION=1), the annotation `kubetune.io/replica-urls`
(comma-separated base URLs) replaces the pod IPs of the ready replicas, in pod-name order.
"""

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubetune.api.evaluation import Requirement, unmet
from kubetune.contract import adapter_uri

from .. import conditions as c
from ..render_common import is_terminating
from .render import adapter_uri_problem, readable_path, under

REPLICA_URLS_ANNOTATION = "kubetune.io/replica-urls"

# An adapter's state in status.adapters.
PENDING, LOADING, LOADED, FAILED, UNLOADING = "Pending", "Loading", "Loaded", "Failed", "Unloading"
REJECTED = "Rejected"

# Why a `fromJob` adapter has no URI yet (the AdaptersReady reason while it is so).
WAITING_FOR_JOB, JOB_FAILED = "WaitingForJob", "JobFailed"
# Why an adapter is Failed without asking any replica: its URI breaks the rules or lies outside its job's output.
UNTRUSTED = "UntrustedAdapterSource"
# Why an adapter is not loaded although its job Succeeded: the job's evaluation fails a `require` rule.
ADAPTER_REJECTED = "AdapterRejected"
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Wanted:
    """An adapter of the spec: its URI once known, else why not (`reason`, `pending` in words).
    `problem`: why it will not be loaded at all (reason UNTRUSTED); its `uri` is then None.
    `rejected`: why its job's measurements keep it out (reason ADAPTER_REJECTED): its `uri` is then
    None and wherever it is loaded it is unloaded."""

    name: str
    uri: str | None = None
    sha256: str | None = None
    pending: str = ""
    reason: str = ""
    path: str | None = None  # what the runtime is given and reports as `root` (vLLM: a local path); None: the URI
    problem: str = ""
    rejected: str = ""

    @property
    def root(self) -> str | None:
        return self.path or self.uri


@dataclass(frozen=True)
class Retry:
    """Answers to loading one adapter from one URI on one replica that may yet change: how many in
    a row, since when (seconds, monotonic) and the last message."""

    uri: str
    count: int
    since: float
    message: str


@dataclass
class Replica:
    """One ready replica as seen by the operator. `loaded`: adapter name → the `root` the runtime
    reports (the path it was given; None when it does not say), None when the replica could not be asked. `failed`:
    adapter name → (URI, the runtime's message) for loads it refused; never retried on this replica
    for the same URI (the reconciler forgets them when the spec's generation changes).
    `retries`: adapter name → `Retry`, answers that may yet change (a 5xx, a 404 from a replica
    started before the source was allowed). `error`: why it could not be asked."""

    name: str
    url: str
    loaded: dict[str, str | None] | None = None
    digests: dict[str, str] = field(default_factory=dict)  # adapter name → sha256 of its weights, where told
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)
    unload_failed: dict[str, str] = field(default_factory=dict)
    error: str = ""
    retries: dict[str, "Retry"] = field(default_factory=dict)


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


def valid_sha256(value: Any) -> str | None:
    """A status.adapter.sha256 that is 64 lowercase hex digits, else None (not shown, not compared)."""
    return value if isinstance(value, str) and SHA256.match(value) else None


def job_source(job: Mapping[str, Any]) -> str | None:
    """Where a FineTuneJob publishes its adapter, from its spec (contract.adapter_uri of
    spec.output.uri), None when its output URI breaks the rules."""
    output = ((job.get("spec") or {}).get("output") or {}).get("uri")
    if not isinstance(output, str) or adapter_uri_problem(output) is not None:
        return None
    source = adapter_uri(output)
    return source if adapter_uri_problem(source) is None else None


def job_sources(
    spec_adapters: Iterable[Mapping[str, Any]], jobs: Mapping[str, Mapping[str, Any] | None]
) -> dict[str, str]:
    """Adapter name → its FineTuneJob's `job_source`, for each `fromJob` adapter whose job exists
    and has an acceptable output: the builtin runtime's allow-list entry for that adapter."""
    out: dict[str, str] = {}
    for adapter in spec_adapters:
        job = jobs.get(adapter.get("fromJob") or "") if adapter.get("fromJob") else None
        source = job_source(job) if job is not None else None
        if source:
            out[adapter["name"]] = source
    return out


def untrusted_result(job_name: str, job: Mapping[str, Any], uri: Any) -> str:
    """Why a FineTuneJob's status.adapter.uri is not loaded ("" when it may be)."""
    if not isinstance(uri, str):
        return f"FineTuneJob {job_name}: status.adapter.uri is not a string; not loaded"
    problem = adapter_uri_problem(uri)
    if problem:
        return f"FineTuneJob {job_name}: status.adapter.uri {problem}; not loaded"
    source = job_source(job)
    if source is None:
        return f"FineTuneJob {job_name}: spec.output.uri is not an acceptable adapter location; not loaded"
    if not under(uri, source):
        shown = repr(uri[:80])
        return f"FineTuneJob {job_name}: status.adapter.uri {shown} is not under its output {source}; not loaded"
    return ""


def requirements(adapter: Mapping[str, Any]) -> tuple[list[Requirement], list[str]]:
    """An adapter's `require` rules (wire form) as Requirements, and a line for each that does not
    parse (admission refuses those; one that slipped through fails closed: it counts as unmet)."""
    rules, broken = [], []
    raw = adapter.get("require") or []
    for index, rule in enumerate(raw if isinstance(raw, list) else [raw]):
        try:
            rules.append(Requirement.model_validate(rule))
        except ValidationError as error:
            first = error.errors()[0].get("msg", "invalid") if error.errors() else "invalid"
            broken.append(f"require[{index}] is not a valid rule ({str(first)[:200]})")
    return rules, broken


def promotion_problem(job_name: str, adapter: Mapping[str, Any], job_status: Mapping[str, Any]) -> str:
    """Why a Succeeded FineTuneJob's adapter may not be served under `adapter`'s `require` rules, as
    one actionable line ("" when every rule holds, or there are none): each failed rule with the
    metric, the job's value and the bound (`evaluation.unmet`)."""
    rules, broken = requirements(adapter)
    evaluation, metrics = job_status.get("evaluation"), job_status.get("metrics")
    failures = broken + unmet(
        rules,
        evaluation if isinstance(evaluation, Mapping) else None,
        metrics if isinstance(metrics, Mapping) else None,
    )
    if not failures:
        return ""
    advice = "retrain, or relax the rule"
    if any("was not measured" in line for line in failures):
        advice = "enable the job's spec.evaluation and retrain, or relax the rule"
    return f"FineTuneJob {job_name} fails require: " + "; ".join(failures) + f"; not loaded: {advice}"


def resolve(spec_adapters: Iterable[Mapping[str, Any]], jobs: Mapping[str, Mapping[str, Any] | None]) -> list[Wanted]:
    """spec.adapters (wire form) → Wanted; `jobs`: FineTuneJob name → the object (None: absent)."""
    out = []
    for adapter in spec_adapters:
        name = adapter["name"]
        if adapter.get("uri"):
            problem = adapter_uri_problem(adapter["uri"])
            if problem:
                out.append(Wanted(name, reason=UNTRUSTED, problem=f"spec uri {problem}; not loaded"))
            else:
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
        if not isinstance(result, Mapping):
            result = {}
        if c.is_true(status.get("conditions"), c.SUCCEEDED) and result.get("uri"):
            problem = untrusted_result(job_name, job, result["uri"])
            digest = result.get("sha256")
            rejected = "" if problem else promotion_problem(job_name, adapter, status)
            if problem:
                out.append(Wanted(name, reason=UNTRUSTED, problem=problem))
            elif rejected:
                out.append(Wanted(name, reason=ADAPTER_REJECTED, rejected=rejected))
            else:
                out.append(Wanted(name, result["uri"], valid_sha256(digest)))
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
    another URI than wanted is unloaded and loaded again; a Rejected one is unloaded; a load the
    replica refused for this URI is not retried there."""
    by_name = {w.name: w for w in wanted}
    actions: list[Action] = []
    for replica in replicas:
        if replica.loaded is None:
            continue
        for name, root in sorted(replica.loaded.items()):
            want = by_name.get(name)
            if want is None or want.rejected or (want.uri is not None and root is not None and root != want.root):
                actions.append(Action(replica.name, "unload", name))
        for want in wanted:
            if want.uri is None:
                continue
            current = has(replica, want)
            refused = replica.failed.get(want.name, ("", ""))[0] == want.uri
            if not current and not refused:
                actions.append(Action(replica.name, "load", want.name, want.uri))
    return actions


def with_runtime_path(want: Wanted, runtime: str) -> Wanted:
    """`want` with the path its runtime loads and reports back (vLLM: pvc://C/P → /mnt/pvc/C/P), so
    that an adapter loaded as wanted is recognised as such in /v1/models."""
    if want.uri is None:
        return want
    return dataclasses.replace(want, path=readable_path(runtime, want.uri))


def has(replica: Replica, want: Wanted) -> bool:
    if replica.loaded is None or want.name not in replica.loaded:
        return False
    root = replica.loaded[want.name]
    return root is None or root == want.root


# --- the replicas --------------------------------------------------------------------------------


def is_ready(pod: Mapping[str, Any]) -> bool:
    if is_terminating(pod) or (pod.get("status") or {}).get("phase") != "Running":
        return False
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(cond.get("type") == "Ready" and cond.get("status") == "True" for cond in conds)


def replica_urls(
    body: Mapping[str, Any], pods: list[dict[str, Any]], port: int, allow_override: bool
) -> list[tuple[str, str]]:
    """(pod name, base URL) of each ready replica, in pod-name order."""
    ready = sorted((p for p in pods if is_ready(p)), key=lambda p: str(p["metadata"]["name"]))
    override = ((body.get("metadata") or {}).get("annotations") or {}).get(REPLICA_URLS_ANNOTATION)
    if allow_override and override:
        urls = [u.strip().rstrip("/") for u in override.split(",") if u.strip()]
        return [(p["metadata"]["name"], url) for p, url in zip(ready, urls, strict=False)]
    return [
        (p["metadata"]["name"], f"http://{p['status']['podIP']}:{port}")
        for p in ready
        if (p.get("status") or {}).get("podIP")
    ]

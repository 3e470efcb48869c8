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

Merged adapters: an adapter with `merge` is built by the replica from its sources (PEFT's
add_weighted_adapter; the builtin runtime only, admission refuses one for vLLM). Each source is
resolved exactly as an adapter of its own (`resolve_ref`: a `fromJob` source waits for its job, is
checked against where that job publishes and gated by the merged adapter's `require` rules). While a source is
not ready the merged adapter is Pending, and a source that is untrusted or rejected makes it Failed
or Rejected, each with a message naming the source. Once all are ready its `uri` is the merge's
canonical `merge:` path (`kubetune.api.merging.MergePlan`), which names the resolved sources: it is
what the adapters file and the operator's load carry and what the replica reports back, so a change
of sources or weights replaces the adapter like a changed URI.

vLLM serves LoRA adapters only: with runtime vllm, a `fromJob` adapter whose FineTuneJob trains
anything else (`MethodSpec.vllm_problem`) is Failed (reason UNSERVABLE) as soon as its job exists,
instead of failing on every replica after the job has run.

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
from kubetune.api.finetunejob import MethodSpec
from kubetune.api.merging import AdapterMerge, MergePlan
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
# Why a `fromJob` adapter is Failed on runtime vllm: its FineTuneJob trains what vLLM cannot serve.
UNSERVABLE = "RuntimeCannotServe"
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Wanted:
    """An adapter of the spec: its URI once known, else why not (`reason`, `pending` in words).
    `problem`: why it will not be loaded at all (reason UNTRUSTED); its `uri` is then None.
    `rejected`: why its job's measurements keep it out (reason ADAPTER_REJECTED): its `uri` is then
    None and wherever it is loaded it is unloaded. A merged adapter's `uri` is its `merge:` path."""

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
        for key, ref in [(adapter["name"], adapter), *merge_sources(adapter)]:
            job = jobs.get(ref.get("fromJob") or "") if ref.get("fromJob") else None
            source = job_source(job) if job is not None else None
            if source:
                out[key] = source
    return out


def merge_sources(adapter: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(key, source) of a merged adapter's sources (wire form), keyed `NAME.merge.sources[I]`: what
    `job_sources` lists them under; [] for any other adapter."""
    merge = adapter.get("merge")
    sources = merge.get("sources") if isinstance(merge, Mapping) else None
    if not isinstance(sources, list):
        return []
    return [(f"{adapter['name']}.merge.sources[{i}]", s) for i, s in enumerate(sources) if isinstance(s, Mapping)]


def job_names(spec_adapters: Iterable[Mapping[str, Any]]) -> set[str]:
    """The FineTuneJobs the adapters name, their merge sources' too."""
    refs = [ref for adapter in spec_adapters for ref in [adapter, *(s for _, s in merge_sources(adapter))]]
    return {ref["fromJob"] for ref in refs if isinstance(ref.get("fromJob"), str) and ref["fromJob"]}


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


def resolve(
    spec_adapters: Iterable[Mapping[str, Any]],
    jobs: Mapping[str, Mapping[str, Any] | None],
    runtime: str = "builtin",
) -> list[Wanted]:
    """spec.adapters (wire form) → Wanted; `jobs`: FineTuneJob name → the object (None: absent)."""
    out = []
    for adapter in spec_adapters:
        if adapter.get("merge") is not None:
            out.append(resolve_merge(adapter, jobs, runtime))
        else:
            out.append(resolve_ref(adapter["name"], adapter, jobs, runtime))
    return out


def resolve_ref(
    name: str, adapter: Mapping[str, Any], jobs: Mapping[str, Mapping[str, Any] | None], runtime: str = "builtin"
) -> Wanted:
    """One adapter given by `uri` or `fromJob` (an adapter, or a merge's source) → Wanted."""
    if adapter.get("uri"):
        problem = adapter_uri_problem(adapter["uri"])
        if problem:
            return Wanted(name, reason=UNTRUSTED, problem=f"spec uri {problem}; not loaded")
        return Wanted(name, adapter["uri"])
    job_name = adapter.get("fromJob") or ""
    job = jobs.get(job_name)
    if job is None:
        return Wanted(name, pending=f"waiting for FineTuneJob {job_name} to exist and succeed", reason=WAITING_FOR_JOB)
    unservable = runtime_problem(job_name, job, runtime)
    if unservable:
        return Wanted(name, reason=UNSERVABLE, problem=unservable)
    status = job.get("status") or {}
    result = status.get("adapter") or {}
    if not isinstance(result, Mapping):
        result = {}
    if c.is_true(status.get("conditions"), c.SUCCEEDED) and result.get("uri"):
        problem = untrusted_result(job_name, job, result["uri"])
        if problem:
            return Wanted(name, reason=UNTRUSTED, problem=problem)
        rejected = promotion_problem(job_name, adapter, status)
        if rejected:
            return Wanted(name, reason=ADAPTER_REJECTED, rejected=rejected)
        return Wanted(name, result["uri"], valid_sha256(result.get("sha256")))
    if c.is_true(status.get("conditions"), c.FAILED):
        failed = c.find(status.get("conditions"), c.FAILED) or {}
        pending = f"FineTuneJob {job_name} failed: {failed.get('message', '')}".strip()
        return Wanted(name, pending=pending, reason=JOB_FAILED)
    return Wanted(name, pending=f"waiting for FineTuneJob {job_name} to succeed", reason=WAITING_FOR_JOB)


def runtime_problem(job_name: str, job: Mapping[str, Any], runtime: str) -> str:
    """Why `runtime` cannot serve what the FineTuneJob trains ("" when it can, or cannot tell): vLLM
    serves LoRA adapters only (`MethodSpec.vllm_problem`). A method that does not parse (admission
    refuses those) is left to the runtime's own refusal."""
    if runtime != "vllm":
        return ""
    method = (job.get("spec") or {}).get("method")
    try:
        spec = MethodSpec.model_validate(method if isinstance(method, Mapping) else {})
    except ValidationError:
        return ""
    problem = spec.vllm_problem()
    return f"FineTuneJob {job_name}: {problem}; not loaded" if problem else ""


def resolve_merge(adapter: Mapping[str, Any], jobs: Mapping[str, Mapping[str, Any] | None], runtime: str) -> Wanted:
    """A merged adapter: each source resolved as an adapter (`resolve_ref`); its `merge:` path once
    every source is ready, else the first source's problem (Failed), rejection (Rejected) or wait
    (Pending), in that order, each naming the source."""
    name = adapter["name"]
    try:
        merge = AdapterMerge.model_validate(adapter["merge"])
    except ValidationError as error:
        first = error.errors()[0].get("msg", "invalid") if error.errors() else "invalid"
        return Wanted(name, reason=UNTRUSTED, problem=f"spec merge is not valid ({str(first)[:200]}); not loaded")
    if runtime != "builtin":
        return Wanted(name, reason=UNSERVABLE, problem=f"runtime {runtime} cannot merge adapters; use runtime builtin")
    gates = {"require": adapter.get("require") or []}  # the merge's rules, on each fromJob source
    sources = [
        (source_label(i, s), resolve_ref(name, s.to_wire() | gates, jobs, runtime)) for i, s in enumerate(merge.sources)
    ]
    for label, source in sources:
        if source.problem:
            return Wanted(name, reason=source.reason, problem=f"{label}: {source.problem}")
    for label, source in sources:
        if source.rejected:
            return Wanted(name, reason=ADAPTER_REJECTED, rejected=f"{label}: {source.rejected}")
    for label, source in sources:
        if source.uri is None:
            return Wanted(name, pending=f"{label}: {source.pending}", reason=source.reason)
    uris = tuple(source.uri for _, source in sources if source.uri)
    weights = tuple(merge.weights) if merge.weights is not None else None
    plan = MergePlan(merge.method, uris, weights, merge.density)
    return Wanted(name, plan.path)


def source_label(index: int, source: Any) -> str:
    """How a status message names a merge source: its place and what it is."""
    what = f"FineTuneJob {source.from_job}" if source.from_job else repr(str(source.uri)[:80])
    return f"merge.sources[{index}] ({what})"


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

"""FineTuneJob reconciles: read, call the pure core (admission, render, jobsync, status, scrape), write.

* `reconcile_finetunejob`: admission (validation + memory plan), then the ConfigMap, Service and
  Job (server-side apply; an existing Job's mutable fields are merge-patched and a suspended Job
  made for another config is replaced: its pod template cannot change), then the status, unless
  this pass created the Job (its own events and its pods' bring that refresh). Idempotent: a
  re-run after an operator crash changes nothing that is already as it should be.
* `reconcile_status`: the status from the Job and its pods (and, when asked, rank 0's metrics),
  written only when it changed, with a Kubernetes Event for each condition that flipped. While the
  Job's pods do not all run, the Events about the Job (and about a stuck pod or two, when its
  status cannot say: `stuck.pods_worth_events`) are read too: why the Job controller cannot create
  pods is said only there. A job whose pods all run costs no such read.

Both run under the FineTuneJob's lock and retry a write that lost a race (409 Conflict: the
status patch carries the resourceVersion it was derived from).
"""

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import wraps
from typing import Any, NoReturn, TypeVar

import kopf
from pydantic import ValidationError

from kubetune.api.finetunejob import FineTuneJob, TrainingPlan
from kubetune.api.kinds import FINETUNEJOB

from .. import conditions as c
from .. import k8s, metrics, scrape, stuck
from ..render_common import RenderError, is_terminating, owned_by
from ..state import Key, OperatorState, ScrapeFailures
from ..writes import apply_child, existing_child, write_status
from .admission import Admission, admit
from .jobsync import job_patch, needs_replacement
from .render import JOB_LABEL, render_finetunejob
from .status import (
    ADMISSION_REASONS,
    Context,
    acknowledge_generation,
    apply_admission,
    derive_status,
    job_outcome,
    job_suspended,
    pods_wanting,
    running_rank0,
)

KIND = FINETUNEJOB.kind
CONFLICT_RETRIES = 3
log = logging.getLogger("kubetune.operator")
T = TypeVar("T")


class Refused(Exception):
    """Admission refused the job (its status says why): counted, never retried."""


def measured(fn: Callable[..., T]) -> Callable[..., T]:
    """Count the reconcile by result and time it."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with metrics.reconcile_observed(KIND) as outcome:
            try:
                value = fn(*args, **kwargs)
            except Refused:
                outcome["result"] = "refused"
                return None  # type: ignore[return-value]
            except kopf.TemporaryError:
                outcome["result"] = "retry"
                raise
            outcome["result"] = "ok"
            return value

    return wrapper


def retry_conflicts(step: Callable[[], T]) -> T:
    """`step` again (it reads the object afresh) when its write lost a race: 409 Conflict."""
    for attempt in range(CONFLICT_RETRIES):
        try:
            return step()
        except k8s.ApiError as error:
            if error.status != 409 or error.reason != "Conflict" or attempt == CONFLICT_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def job_path(namespace: str, name: str) -> str:
    return k8s.resource_path("batch/v1", "Job", namespace, name)


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- reading -------------------------------------------------------------------------------------


def read_finetunejob(state: OperatorState, key: Key) -> dict[str, Any] | None:
    """The FineTuneJob as stored now, or None when it is gone or being deleted."""
    body = state.client.get(k8s.kubetune_path(KIND, *key))
    if body is None or is_terminating(body):
        return None
    return body


def parse(body: dict[str, Any]) -> tuple[FineTuneJob | None, str]:
    """The object as the API models see it (status left out: it is ours), or why it does not parse."""
    try:
        wire = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}
        return FineTuneJob.model_validate(wire), ""
    except ValidationError as error:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in error.errors()]
        return None, "\n".join(problems)


def is_admitted(status: dict[str, Any]) -> bool:
    return c.is_true(status.get("conditions"), c.ADMITTED)


def is_done(status: dict[str, Any]) -> bool:
    """Finished for good: Succeeded, or Failed for a reason other than admission (a refused job
    is looked at again when its spec changes)."""
    conds = status.get("conditions")
    failed = c.find(conds, c.FAILED) or {}
    refused = failed.get("reason") in ADMISSION_REASONS
    return c.is_true(conds, c.SUCCEEDED) or (failed.get("status") == c.TRUE and not refused)


def workload_of(state: OperatorState, job: FineTuneJob) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The FineTuneJob's own Job (not a namesake) and that Job's pods."""
    meta = job.metadata
    workload = state.client.get(job_path(meta.namespace, meta.name))
    if workload is None or not owned_by(workload, meta.uid):
        return None, []
    uid = workload["metadata"]["uid"]
    selector = f"{JOB_LABEL}={meta.name},batch.kubernetes.io/controller-uid={uid}"
    return workload, state.client.list(k8s.pods_path(meta.namespace), selector)


EVENTS_REFUSED: set[str] = set()  # namespaces where the operator may not list Events (said once)


def events_about(state: OperatorState, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
    """The Events about one object; none when the operator may not list them (a chart whose RBAC
    predates this: the status then says less, and the reconcile goes on)."""
    try:
        return state.client.list(k8s.events_path(namespace, kind, name))
    except k8s.ApiError as error:
        if error.status != 403:
            raise
        if namespace not in EVENTS_REFUSED:
            EVENTS_REFUSED.add(namespace)
            log.warning("the operator may not list Events in %s (%s); update the chart's RBAC", namespace, error)
        return []


def workload_events(state: OperatorState, workload: dict[str, Any], pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Events that may say why the Job's pods do not run; no API call while they all run."""
    if not pods_wanting(workload, pods):
        return []
    meta = workload["metadata"]
    events = events_about(state, meta["namespace"], "Job", meta["name"])
    for pod in stuck.pods_worth_events(pods):
        events += events_about(state, meta["namespace"], "Pod", pod)
    return events


# --- writing -------------------------------------------------------------------------------------


def write(state: OperatorState, body: dict[str, Any], desired: dict[str, Any]) -> bool:
    """Patch status to `desired` if it differs from what `body` holds; an Event per flip (a
    Warning for Failed=True and Admitted=False)."""
    return write_status(state.client, body, desired, lambda change: change.warning)


# --- FineTuneJob: admission and children ---------------------------------------------------------


@measured
def reconcile_finetunejob(state: OperatorState, namespace: str, name: str, seen: dict[str, Any] | None = None) -> None:
    """Admit the job, create what runs it, bring its Job in step, and refresh its status. `seen`:
    the object as the caller's event showed it (see `first_read`)."""
    whole_reconcile(state, (namespace, name), seen)


def whole_reconcile(state: OperatorState, key: Key, seen: dict[str, Any] | None = None) -> None:
    """A Job created by this pass has no pods to report yet: its own events (Job created, pods
    created) ask for the status refresh (`handlers.refresh_later`), so none is done here."""
    reads = iter([first_read(seen)])
    with state.locks.hold(KIND, key):
        outcome = retry_conflicts(lambda: admit_and_create(state, key, next(reads, None)))
        if outcome == ADMITTED_EXISTING:
            status_reconcile(state, key, scrape_metrics=False, recreate=False)


def first_read(seen: dict[str, Any] | None) -> dict[str, Any] | None:
    """The event's body stands for the first read of a job the operator never admitted (its
    creation: the status patch that admits it names that body's resourceVersion, so a stale body
    fails with 409 and is read again); any other job is read afresh."""
    if seen is None or is_admitted(seen.get("status") or {}) or is_terminating(seen):
        return None
    return seen


NOT_ADMITTED, ADMITTED_CREATED, ADMITTED_EXISTING = "not admitted", "Job created", "Job existed"


def admit_and_create(state: OperatorState, key: Key, seen: dict[str, Any] | None = None) -> str:
    """Whether the job is admitted and its objects exist, and whether this pass created its Job;
    raises Refused when admission says no. `seen`: the body to use instead of a first read."""
    body = seen if seen is not None else read_finetunejob(state, key)
    if body is None:
        return NOT_ADMITTED
    current = body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    if is_done(current):  # never revive a finished job (its Job may be gone with its TTL) ...
        acknowledged = acknowledge_generation(current, generation)
        if acknowledged != current:  # ... but say its spec edit was seen
            write(state, body, acknowledged)
        return NOT_ADMITTED
    job, parse_error = parse(body)
    if job is None:
        refuse(state, body, "InvalidSpec", f"the spec cannot run in a cluster:\n{parse_error}", None, generation)
    admission = admit(job, state.config)
    if not admission.admitted:
        admission = recorded_admission(state, job, current) or admission
    plan = admission.plan.to_wire() if admission.plan else None
    if not admission.admitted:
        refuse(state, body, admission.reason, admission.message, plan, generation)
    desired = apply_admission(current, True, admission.reason, admission.message, plan, generation, utcnow())
    write(state, body, desired)
    try:
        created = ensure_children(state, job, admission.plan)
    except RenderError as error:  # admission checks the same things; kept as a last line of defence
        refuse(state, read_finetunejob(state, key) or body, "InvalidSpec", str(error), plan, generation)
    return ADMITTED_CREATED if created else ADMITTED_EXISTING


def recorded_admission(state: OperatorState, job: FineTuneJob, current: dict[str, Any]) -> Admission | None:
    """A job whose Job is running is never refused after the fact (by a newer planner, or an edited
    annotation, seen at an operator restart): its recorded admission stands while it runs."""
    admitted = c.find(current.get("conditions"), c.ADMITTED)
    if not admitted or admitted.get("status") != c.TRUE:
        return None
    workload = state.client.get(job_path(job.metadata.namespace, job.metadata.name))
    if workload is None or not owned_by(workload, job.metadata.uid) or job_suspended(workload) or job_outcome(workload):
        return None
    log.warning(
        "FineTuneJob %s/%s would not be admitted now, but its Job runs: keeping its admission",
        job.metadata.namespace,
        job.metadata.name,
    )
    try:  # status is writable by others: a plan edited into nonsense is no plan
        plan = TrainingPlan.model_validate(current["plan"]) if current.get("plan") else None
    except ValidationError:
        plan = None
    return Admission(True, admitted.get("reason", "Admitted"), admitted.get("message", ""), plan)


def refuse(
    state: OperatorState, body: dict[str, Any], reason: str, message: str, plan: Any, generation: int | None
) -> NoReturn:
    """Record the refusal (Admitted False, Failed True) and stop: the same spec would fail again."""
    desired = apply_admission(body.get("status"), False, reason, message, plan, generation, utcnow())
    write(state, body, desired)
    raise Refused(reason)


def ensure_children(state: OperatorState, job: FineTuneJob, plan: TrainingPlan | None) -> bool:
    """ConfigMap, Service, NetworkPolicy and Job, in that order (the pods mount the one, resolve
    through the other and are born fenced by the third), applied server-side. The NetworkPolicy is
    applied with every Job the operator creates (one call, no read: server-side apply creates or
    restores it). A Job that exists keeps its ConfigMap as it was made (its pods'
    retries read the same trainer config) and gets only its mutable fields patched; a suspended Job
    made for another config is replaced. True when the Job was created."""
    objects = render_finetunejob(job, state.config, plan)
    uid = job.metadata.uid
    workload = existing_child(state.client, objects.job, uid, KIND)
    config_map = existing_child(state.client, objects.config_map, uid, KIND)
    service = existing_child(state.client, objects.service, uid, KIND)
    if workload is not None and needs_replacement(workload, config_map, objects.config_map):
        replace_job(state, workload, objects.config_map, config_map)
    if workload is None or config_map is None:
        apply_child(state.client, objects.config_map, config_map)
    apply_child(state.client, objects.service, service)
    if workload is None:
        if objects.network_policy is not None:
            apply_child(state.client, objects.network_policy, None)
        apply_child(state.client, objects.job, None)
        return True
    patch = job_patch(job, workload, objects.job)
    if patch:
        state.client.merge_patch(k8s.object_path(objects.job, objects.job["metadata"]["name"]), patch)
        log.info("Job %s/%s patched: %s", job.metadata.namespace, job.metadata.name, patch["spec"])
    return False


def replace_job(
    state: OperatorState, workload: dict[str, Any], config_map: dict[str, Any], existing_cm: dict[str, Any] | None
) -> NoReturn:
    """The new trainer config, then the Job goes (its pod template cannot change); the retry
    applies the Job anew from the new spec."""
    meta = workload["metadata"]
    apply_child(state.client, config_map, existing_cm)
    state.client.delete(k8s.object_path(workload, meta["name"]), uid=meta["uid"])
    raise kopf.TemporaryError(f"Job {meta['name']} replaced for the changed spec; creating the new one", delay=1)


# --- status --------------------------------------------------------------------------------------


@measured
def reconcile_status(state: OperatorState, namespace: str, name: str, scrape: bool = False) -> None:
    """Refresh the status from the Job and its pods (+ rank 0's metrics when `scrape`); an admitted
    job whose Job has gone missing (deleted by hand) gets the whole reconcile, which recreates it."""
    status_reconcile(state, (namespace, name), scrape)


def status_reconcile(state: OperatorState, key: Key, scrape_metrics: bool, recreate: bool = True) -> None:
    with state.locks.hold(KIND, key):
        missing = retry_conflicts(lambda: refresh_status(state, key, scrape_metrics))
        if missing and recreate:
            whole_reconcile(state, key)


def refresh_status(state: OperatorState, key: Key, scrape_metrics: bool) -> bool:
    """Derive and write the status; True when the admitted job has no Job (to be created)."""
    body = read_finetunejob(state, key)
    if body is None:
        return False
    current = body.get("status") or {}
    job, _ = parse(body)
    if job is None or not is_admitted(current) or is_done(current):
        return False
    workload, pods = workload_of(state, job)
    if workload is None:
        return True
    failures = state.scrapes.get(key)
    events = workload_events(state, workload, pods)
    ctx = Context(job, workload, pods, utcnow(), failures.note() if failures else "", events)
    desired = derive_status(current, ctx)
    if scrape_metrics and desired.get("phase") == "Running":
        desired = with_metrics(state, key, current, ctx)
    write(state, body, desired)
    return False


def with_metrics(state: OperatorState, key: Key, current: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The derived status with rank 0's latest reading folded in; a failed scrape only changes the
    Running condition's message (and a counter)."""
    port, annotations = state.config.trainer_metrics_port, ctx.job.metadata.annotations
    url = scrape.metrics_url(running_rank0(ctx.pods), port, annotations, state.allow_metrics_url)
    if url is None:
        return derive_status(current, ctx)
    failures = state.scrapes.setdefault(key, ScrapeFailures())
    try:
        reading = scrape.reading_from(scrape.fetch(url, timeout=min(5.0, state.interval)), ctx.now)
    except scrape.ScrapeError as error:
        metrics.SCRAPES.labels(result="error").inc()
        failures.failures += 1
        failures.since = failures.since or c.timestamp(ctx.now)
        failures.error = str(error)
        log.info("scraping %s for %s/%s failed: %s", url, *key, error)
        return derive_status(current, replace(ctx, scrape_note=failures.note()))
    metrics.SCRAPES.labels(result="ok").inc()
    state.scrapes[key] = ScrapeFailures()
    return scrape.apply_reading(derive_status(current, replace(ctx, scrape_note="")), reading)

"""Read, call the pure core, write: the steps every handler is made of.

* `reconcile_finetunejob`: admission (validation + memory plan), then the ConfigMap, Service and
  Job, then the status. Idempotent: an object that already exists (409) counts as created, so a
  re-run after an operator crash creates nothing twice.
* `reconcile_status`: the status from the Job and its pods (and, when asked, rank 0's metrics),
  written only when it changed, with a Kubernetes Event for each condition that flipped.

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

from .. import conditions as c
from .. import k8s, metrics, scrape
from ..admission import Admission, admit
from ..jobsync import is_terminating, job_patch, needs_replacement, owned_by
from ..render import RenderError, render_finetunejob
from ..render.finetunejob import JOB_LABEL
from ..status import (
    ADMISSION_REASONS,
    Context,
    apply_admission,
    derive_status,
    job_outcome,
    job_suspended,
    merge_patch,
    running_rank0,
)
from .runtime import Key, Runtime, ScrapeState

KIND = "FineTuneJob"
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
    for attempt in range(CONFLICT_RETRIES):
        try:
            return step()
        except k8s.ApiError as error:
            if error.status != 409 or error.reason != "Conflict" or attempt == CONFLICT_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- reading -------------------------------------------------------------------------------------


def read_finetunejob(runtime: Runtime, key: Key) -> dict[str, Any] | None:
    """The FineTuneJob as stored now, or None when it is gone or being deleted."""
    body = runtime.client.get(k8s.finetunejob_path(*key))
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


def workload_of(runtime: Runtime, job: FineTuneJob) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The FineTuneJob's own Job (not a namesake) and that Job's pods."""
    meta = job.metadata
    workload = runtime.client.get(k8s.job_path(meta.namespace, meta.name))
    if workload is None or not owned_by(workload, meta.uid):
        return None, []
    uid = workload["metadata"]["uid"]
    selector = f"{JOB_LABEL}={meta.name},batch.kubernetes.io/controller-uid={uid}"
    return workload, runtime.client.list(k8s.pods_path(meta.namespace), selector)


# --- writing -------------------------------------------------------------------------------------


def write_status(runtime: Runtime, body: dict[str, Any], desired: dict[str, Any]) -> bool:
    """Patch status to `desired` if it differs from what `body` holds; post an Event per flip."""
    current = body.get("status") or {}
    patch = merge_patch(current, desired)
    if patch is None:
        return False
    meta = body["metadata"]
    request = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": patch}
    runtime.client.merge_patch(k8s.finetunejob_path(meta["namespace"], meta["name"]) + "/status", request)
    metrics.STATUS_WRITES.inc()
    post_transitions(runtime, body, current.get("conditions"), desired.get("conditions"))
    return True


def post_transitions(runtime: Runtime, body: dict[str, Any], before: Any, after: Any) -> None:
    for change in c.transitions(before, after):
        kind = "Warning" if change.warning else "Normal"
        try:
            message = f"{change.type}={change.status}: {change.message}"
            runtime.client.post_event(body, kind, change.reason or change.type, message)
        except k8s.ApiError as error:  # an Event is a courtesy; never fail a reconcile over it
            log.warning("could not post an Event for %s: %s", body["metadata"]["name"], error)


# --- FineTuneJob: admission and children ---------------------------------------------------------


@measured
def reconcile_finetunejob(runtime: Runtime, namespace: str, name: str) -> None:
    """Admit the job, create what runs it, bring its Job in step, and refresh its status."""
    whole_reconcile(runtime, (namespace, name))


def whole_reconcile(runtime: Runtime, key: Key) -> None:
    with runtime.locks.hold(key):
        if retry_conflicts(lambda: admit_and_create(runtime, key)):
            status_reconcile(runtime, key, scrape_metrics=False, recreate=False)


def admit_and_create(runtime: Runtime, key: Key) -> bool:
    """True when the job is admitted and its objects exist; raises Refused when admission says no."""
    body = read_finetunejob(runtime, key)
    if body is None:
        return False
    current = body.get("status") or {}
    if is_done(current):
        return False  # never revive a finished job (its Job may be gone with its TTL)
    job, parse_error = parse(body)
    generation = (body.get("metadata") or {}).get("generation")
    if job is None:
        refuse(runtime, body, "InvalidSpec", f"the spec cannot run in a cluster:\n{parse_error}", None, generation)
    admission = admit(job)
    if not admission.admitted:
        admission = recorded_admission(runtime, job, current) or admission
    plan = admission.plan.to_wire() if admission.plan else None
    if not admission.admitted:
        refuse(runtime, body, admission.reason, admission.message, plan, generation)
    desired = apply_admission(current, True, admission.reason, admission.message, plan, generation, utcnow())
    write_status(runtime, body, desired)
    try:
        ensure_children(runtime, job, admission.plan)
    except RenderError as error:  # admission checks the same things; kept as a last line of defence
        refuse(runtime, read_finetunejob(runtime, key) or body, "InvalidSpec", str(error), plan, generation)
    return True


def recorded_admission(runtime: Runtime, job: FineTuneJob, current: dict[str, Any]) -> Admission | None:
    """A job whose Job is running is never refused after the fact (by a newer planner, or an edited
    annotation, seen at an operator restart): its recorded admission stands while it runs."""
    admitted = c.find(current.get("conditions"), c.ADMITTED)
    if not admitted or admitted.get("status") != c.TRUE:
        return None
    workload = runtime.client.get(k8s.job_path(job.metadata.namespace, job.metadata.name))
    if workload is None or not owned_by(workload, job.metadata.uid) or job_suspended(workload) or job_outcome(workload):
        return None
    log.warning(
        "FineTuneJob %s/%s would not be admitted now, but its Job runs: keeping its admission",
        job.metadata.namespace,
        job.metadata.name,
    )
    plan = TrainingPlan.model_validate(current["plan"]) if current.get("plan") else None
    return Admission(True, admitted.get("reason", "Admitted"), admitted.get("message", ""), plan)


def refuse(
    runtime: Runtime, body: dict[str, Any], reason: str, message: str, plan: Any, generation: int | None
) -> NoReturn:
    """Record the refusal (Admitted False, Failed True) and stop: the same spec would fail again."""
    desired = apply_admission(body.get("status"), False, reason, message, plan, generation, utcnow())
    write_status(runtime, body, desired)
    raise Refused(reason)


def ensure_children(runtime: Runtime, job: FineTuneJob, plan: TrainingPlan | None) -> None:
    """ConfigMap, Service and Job, in that order (the pods mount the one and resolve through the
    other). Existing ones are kept; the Job's mutable fields are patched; a suspended Job made for
    another config is replaced."""
    objects = render_finetunejob(job, runtime.config, plan)
    config_map = ensure(runtime, objects.config_map, job.metadata.uid)
    ensure(runtime, objects.service, job.metadata.uid)
    existing = ensure(runtime, objects.job, job.metadata.uid)
    if existing is None:
        return
    if needs_replacement(existing, config_map, objects.config_map):
        replace_job(runtime, existing, objects.config_map)
    patch = job_patch(job, existing, objects.job)
    if patch:
        runtime.client.merge_patch(k8s.object_path(objects.job, objects.job["metadata"]["name"]), patch)
        log.info("Job %s/%s patched: %s", job.metadata.namespace, job.metadata.name, patch["spec"])


def ensure(runtime: Runtime, obj: dict[str, Any], uid: str | None) -> dict[str, Any] | None:
    """Create `obj`; None when created, else the existing object, which must be ours."""
    name = obj["metadata"]["name"]
    if runtime.client.create(k8s.object_path(obj), obj):
        log.info("created %s %s/%s", obj["kind"], obj["metadata"]["namespace"], name)
        return None
    existing = runtime.client.get(k8s.object_path(obj, name))
    if existing is None:
        raise kopf.TemporaryError(f"{obj['kind']} {name} vanished while being created; retrying", delay=1)
    if is_terminating(existing) or not owned_by(existing, uid):
        raise kopf.TemporaryError(
            f"{obj['kind']} {name} exists but is not this FineTuneJob's (an earlier namesake's, being "
            "garbage-collected?); waiting for it to go",
            delay=3,
        )
    return existing


def replace_job(runtime: Runtime, existing: dict[str, Any], config_map: dict[str, Any]) -> None:
    """New trainer config, then the Job goes; the retry creates it from the new spec."""
    meta = existing["metadata"]
    config_map_path = k8s.object_path(config_map, config_map["metadata"]["name"])
    runtime.client.merge_patch(config_map_path, {"data": config_map["data"]})
    runtime.client.delete(k8s.job_path(meta["namespace"], meta["name"]), uid=meta["uid"])
    raise kopf.TemporaryError(f"Job {meta['name']} replaced for the changed spec; creating the new one", delay=1)


# --- status --------------------------------------------------------------------------------------


@measured
def reconcile_status(runtime: Runtime, namespace: str, name: str, scrape: bool = False) -> None:
    """Refresh the status from the Job and its pods (+ rank 0's metrics when `scrape`); an admitted
    job whose Job has gone missing (deleted by hand) gets the whole reconcile, which recreates it."""
    status_reconcile(runtime, (namespace, name), scrape)


def status_reconcile(runtime: Runtime, key: Key, scrape_metrics: bool, recreate: bool = True) -> None:
    with runtime.locks.hold(key):
        missing = retry_conflicts(lambda: refresh_status(runtime, key, scrape_metrics))
        if missing and recreate:
            whole_reconcile(runtime, key)


def refresh_status(runtime: Runtime, key: Key, scrape_metrics: bool) -> bool:
    """Derive and write the status; True when the admitted job has no Job (to be created)."""
    body = read_finetunejob(runtime, key)
    if body is None:
        return False
    current = body.get("status") or {}
    job, _ = parse(body)
    if job is None or not is_admitted(current) or is_done(current):
        return False
    workload, pods = workload_of(runtime, job)
    if workload is None:
        return True
    state = runtime.scrapes.get(key)
    ctx = Context(job, workload, pods, utcnow(), state.note() if state else "")
    desired = derive_status(current, ctx)
    if scrape_metrics and desired.get("phase") == "Running":
        desired = with_metrics(runtime, key, current, ctx)
    write_status(runtime, body, desired)
    return False


def with_metrics(runtime: Runtime, key: Key, current: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The derived status with rank 0's latest reading folded in; a failed scrape only changes the
    Running condition's message (and a counter)."""
    port, annotations = runtime.config.trainer_metrics_port, ctx.job.metadata.annotations
    url = scrape.metrics_url(running_rank0(ctx.pods), port, annotations, runtime.allow_metrics_url)
    if url is None:
        return derive_status(current, ctx)
    state = runtime.scrapes.setdefault(key, ScrapeState())
    try:
        reading = scrape.reading_from(scrape.fetch(url, timeout=min(5.0, runtime.interval)), ctx.now)
    except scrape.ScrapeError as error:
        metrics.SCRAPES.labels(result="error").inc()
        state.failures += 1
        state.since = state.since or c.timestamp(ctx.now)
        state.error = str(error)
        log.info("scraping %s for %s/%s failed: %s", url, *key, error)
        return derive_status(current, replace(ctx, scrape_note=state.note()))
    metrics.SCRAPES.labels(result="ok").inc()
    runtime.scrapes[key] = ScrapeState()
    return scrape.apply_reading(derive_status(current, replace(ctx, scrape_note="")), reading)

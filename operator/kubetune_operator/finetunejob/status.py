"""A FineTuneJob's status from its Job and pods: pure functions, no API calls, no clock.

The handlers read the FineTuneJob, its Job and the Job's pods, call `derive_status`, and write
the result only when it differs from what is stored. Admission (the Admitted condition and
`status.plan`) is decided in `admission.py` and recorded by `apply_admission`; this module keeps it as it finds it.

Where the facts come from, the Kubernetes way:
* Running: the Job's pods (all of them Running), Suspended: the Job's `spec.suspend`. While they
  do not all run, the reason is what Kubernetes says holds them (`stuck.diagnose`: the Job
  controller's FailedCreate Events, the scheduler's PodScheduled message, the kubelet's container
  states and FailedMount Events): Running=False with reason FailedCreate, Unschedulable,
  ErrImagePull, OOMKilled, ..., or PodsPending while nothing explains the wait (pods starting).
* Succeeded / Failed: the Job's terminal conditions (Complete, or Failed with the Job's reason:
  BackoffLimitExceeded, PodFailurePolicy, DeadlineExceeded, ...).
* The result: rank 0's termination message, `kubetune.contract.TrainerResult` as JSON, parsed with
  the same model (and its limits) the trainer wrote it with.
* Ready / Reconciling / Stalled, for kstatus readers (Flux, kpt): restated from the conditions
  above by `kstatus_conditions`, in every status this module derives; a Running reason that only a
  person can clear (a missing PriorityClass, PVC or Secret, an image that cannot be pulled, a crash,
  out of memory: `stuck.Diagnosis.needs_person`) makes the job Stalled.
* restarts: the Job's failed count, without pod disruptions (preemption, drain, eviction), or the
  trainer's resumes from a checkpoint as rank 0 reports them, whichever is higher; never lowered.

Nothing read here is trusted blindly. The termination message is rank 0's output: its adapter URI
must pass the same URI rule as a spec (`uri_problem`) and lie under the job's own `spec.output.uri`,
or the job fails with reason UntrustedResult instead of sending that URI on to an AdapterDeployment.
The stored status is read back with the limits the operator writes it with (`readable_status`):
whoever may edit the status subresource could have put anything the CRD's types allow there.
"""

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune.api.finetunejob import FineTuneJob
from kubetune.api.uris import uri_problem
from kubetune.contract import MAX_COUNT, TRAINER_CONTAINER, TrainerResult, adapter_uri

from .. import conditions as c
from .. import stuck
from .render import COMPLETION_INDEX_ANNOTATION as COMPLETION_INDEX

DISRUPTION_TARGET = "DisruptionTarget"
FAILURE_DETAIL_LIMIT = 2000  # characters of a pod's termination message quoted in the Failed condition
UNTRUSTED_RESULT = "UntrustedResult"
RESULT_SCHEMES = ("pvc", "s3", "file")  # and then only under spec.output.uri, which is never file:// in a cluster
MAX_RESTARTS = 2**31 - 1
METRIC_KEYS = ("trainLoss", "evalLoss", "learningRate", "tokensPerSecond", "gpuMemoryGiB")

Status = dict[str, Any]


# --- reading a Job -------------------------------------------------------------------------------


def job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    """The Job's condition of `type_` when it is True."""
    conditions: list[dict[str, Any]] = (job.get("status") or {}).get("conditions") or []
    for condition in conditions:
        if condition.get("type") == type_ and condition.get("status") == c.TRUE:
            return condition
    return None


def job_outcome(job: dict[str, Any]) -> str | None:
    """ "Complete", "Failed", or None while the Job runs (or is suspended)."""
    for type_ in ("Failed", "Complete"):
        if job_condition(job, type_):
            return type_
    return None


def job_suspended(job: dict[str, Any]) -> bool:
    return bool((job.get("spec") or {}).get("suspend"))


def expected_pods(job: dict[str, Any]) -> int:
    spec = job.get("spec") or {}
    return int(spec.get("parallelism") or spec.get("completions") or 1)


def ignores_disruptions(job: dict[str, Any]) -> bool:
    """Whether the Job's podFailurePolicy already leaves disrupted pods out of `status.failed`
    (its Ignore action does not count the pod). Every Job kubetune renders has that rule."""
    for rule in ((job.get("spec") or {}).get("podFailurePolicy") or {}).get("rules") or []:
        if rule.get("action") != "Ignore":
            continue
        for pattern in rule.get("onPodConditions") or []:
            if pattern.get("type") == DISRUPTION_TARGET and pattern.get("status", c.TRUE) == c.TRUE:
                return True
    return False


# --- reading pods --------------------------------------------------------------------------------


def pod_name(pod: dict[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("name", ""))


def pod_phase(pod: dict[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase", "Pending"))


def pod_condition(pod: dict[str, Any], type_: str) -> dict[str, Any] | None:
    conditions: list[dict[str, Any]] = (pod.get("status") or {}).get("conditions") or []
    for condition in conditions:
        if condition.get("type") == type_:
            return condition
    return None


def is_disrupted(pod: dict[str, Any]) -> bool:
    condition = pod_condition(pod, DISRUPTION_TARGET)
    return condition is not None and condition.get("status") == c.TRUE


def is_deleting(pod: dict[str, Any]) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def completion_index(pod: dict[str, Any]) -> str | None:
    meta = pod.get("metadata") or {}
    return (meta.get("annotations") or {}).get(COMPLETION_INDEX) or (meta.get("labels") or {}).get(COMPLETION_INDEX)


def newest_first(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(pods, key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp", "")), reverse=True)


def rank0_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pods of completion index 0 (torchrun's node rank 0), newest first."""
    return newest_first([p for p in pods if completion_index(p) == "0"])


def running_rank0(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Rank 0's live pod, the one serving the trainer's metrics."""
    for pod in rank0_pods(pods):
        if pod_phase(pod) == "Running" and not is_deleting(pod):
            return pod
    return None


def terminated_state(pod: dict[str, Any], container: str = TRAINER_CONTAINER) -> dict[str, Any] | None:
    """The trainer container's `state.terminated` (or the first container's)."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    ordered = [s for s in statuses if s.get("name") == container] + [s for s in statuses if s.get("name") != container]
    for status in ordered:
        terminated: dict[str, Any] | None = (status.get("state") or {}).get("terminated")
        if terminated:
            return terminated
    return None


def termination_message(pod: dict[str, Any]) -> str:
    message = (terminated_state(pod) or {}).get("message")
    return message.strip() if isinstance(message, str) else ""


def restarts(job: dict[str, Any], pods: list[dict[str, Any]]) -> int:
    """Failed attempts that were retried: the Job's `status.failed`, minus pods failed by a
    disruption (preemption, drain, eviction) unless the Job's podFailurePolicy already left them
    out, minus the last attempt of a Job that failed (nothing retried that one)."""
    failed = int((job.get("status") or {}).get("failed") or 0)
    if not ignores_disruptions(job):
        failed -= sum(1 for p in pods if pod_phase(p) == "Failed" and is_disrupted(p))
    if job_outcome(job) == "Failed":
        failed -= 1
    return max(0, failed)


# --- the trainer's result ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportedResult:
    """What rank 0 reported (`TrainerResult`, the trainer's own model), or why nothing usable was found."""

    result: TrainerResult | None
    error: str = ""

    @property
    def adapter(self) -> dict[str, Any]:
        artifact = self.result.adapter if self.result else None
        return artifact.model_dump(by_alias=True, exclude_none=True) if artifact else {}

    @property
    def metrics(self) -> dict[str, float]:
        return self.result.metrics.to_status() if self.result else {}

    @property
    def steps(self) -> int | None:
        return self.result.steps if self.result else None

    @property
    def evaluation(self) -> dict[str, Any]:
        evaluation = self.result.evaluation if self.result else None
        return evaluation.to_status() if evaluation else {}


def parse_result(message: str) -> ReportedResult:
    """The trainer's termination message, tolerating anything: a missing, truncated, oversized or
    non-JSON message, or one that does not match `TrainerResult`, gives no result and `error`."""
    result, error = TrainerResult.parse(message)
    return ReportedResult(result, error)


def untrusted_uri(uri: str, output_uri: str) -> str | None:
    """Why a URI rank 0 reported cannot go into status (one line), or None: it must pass the URI
    rule every spec passes and lie under the job's own output, where the trainer always writes."""
    problem = uri_problem(uri, RESULT_SCHEMES)
    if problem:
        return problem
    base = output_uri.rstrip("/")
    if uri.rstrip("/") != base and not uri.startswith(base + "/"):
        shown = repr(uri[:120]) + ("..." if len(uri) > 120 else "")
        return f"{shown} is not under the job's spec.output.uri {output_uri!r}"
    return None


def result_problem(result: ReportedResult, output_uri: str) -> str | None:
    """Why rank 0's result is not to be trusted, or None (no result at all is not distrust)."""
    artifact = result.result.adapter if result.result else None
    if artifact is None:
        return None
    reported = [("adapter.uri", artifact.uri), ("adapter.mergedUri", artifact.merged_uri)]
    reported += [(f"adapter.gguf[{i}].uri", file.uri) for i, file in enumerate(artifact.gguf or [])]
    for field, uri in reported:
        problem = untrusted_uri(uri, output_uri) if uri is not None else None
        if problem:
            return f"rank 0 reported {field} {problem}"
    return None


def adapter_artifact(result: ReportedResult, output_uri: str) -> dict[str, Any]:
    """status.adapter: the trainer's word, else where the trainer always writes it."""
    artifact = {"uri": result.adapter.get("uri") or adapter_uri(output_uri)}
    for key in ("sizeBytes", "sha256", "mergedUri", "gguf"):
        if key in result.adapter:
            artifact[key] = result.adapter[key]
    return artifact


# --- the conditions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """Everything derive_status needs besides the stored status."""

    job: FineTuneJob
    workload: dict[str, Any] | None  # the batch/v1 Job; None when absent
    pods: list[dict[str, Any]]
    now: datetime
    scrape_note: str = ""  # appended to the Running message while metrics cannot be read
    events: Sequence[dict[str, Any]] = ()  # core/v1 Events about the Job and its stuck pods (read only then)

    @property
    def generation(self) -> int | None:
        return self.job.metadata.generation


def suspended_condition(conds: c.Conditions, ctx: Context) -> c.Conditions:
    """Suspended=True while the Job is suspended (by the user, or waiting in a Kueue queue);
    Suspended=False reason Resumed once it runs again; absent for a job never suspended."""
    assert ctx.workload is not None
    policy = ctx.job.spec.run_policy
    if job_suspended(ctx.workload):
        if policy.suspend or not policy.queue_name:
            message = (
                "spec.runPolicy.suspend is true: the pods are stopped and checkpoints kept; set it to false to resume"
            )
            return c.set_condition(conds, c.SUSPENDED, c.TRUE, "Suspended", message, ctx.generation, ctx.now)
        message = f"waiting for Kueue to admit the Job from LocalQueue {policy.queue_name!r}"
        return c.set_condition(conds, c.SUSPENDED, c.TRUE, "Queued", message, ctx.generation, ctx.now)
    if c.is_true(conds, c.SUSPENDED):
        message = "resumed: the trainer continues from its last complete checkpoint"
        return c.set_condition(conds, c.SUSPENDED, c.FALSE, "Resumed", message, ctx.generation, ctx.now)
    return conds


def waiting_detail(pods: list[dict[str, Any]]) -> str:
    """Why the first pod that is not running waits (unschedulable, image pull, ...)."""
    for pod in newest_first(pods):
        if pod_phase(pod) != "Pending" or is_deleting(pod):
            continue
        scheduled = pod_condition(pod, "PodScheduled")
        if scheduled and scheduled.get("status") == c.FALSE:
            return f"pod {pod_name(pod)} is not scheduled: {scheduled.get('message') or scheduled.get('reason', '')}"
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting")
            if waiting and waiting.get("reason"):
                return f"pod {pod_name(pod)} is waiting: {waiting['reason']} {waiting.get('message', '')}".rstrip()
        return f"pod {pod_name(pod)} is starting"
    return "waiting for the Job controller to create pods"


def live_pods(ctx: Context) -> list[dict[str, Any]]:
    return [p for p in ctx.pods if not is_deleting(p)]


def pods_wanting(workload: dict[str, Any], pods: list[dict[str, Any]]) -> bool:
    """Whether the Job, unfinished and not suspended, has fewer pods Running than it asks for:
    when what holds them is worth reading (its Events) and telling (`stuck_diagnosis`)."""
    if job_outcome(workload) is not None or job_suspended(workload):
        return False
    running = sum(1 for p in pods if pod_phase(p) == "Running" and not is_deleting(p))
    return running < expected_pods(workload)


def stuck_diagnosis(ctx: Context) -> stuck.Diagnosis | None:
    """What Kubernetes says holds the Job's pods, while they do not all run."""
    if ctx.workload is None or not pods_wanting(ctx.workload, ctx.pods):
        return None
    return stuck.diagnose(ctx.workload, live_pods(ctx), ctx.events)


def running_condition(
    conds: c.Conditions, ctx: Context, outcome: str | None, diagnosis: stuck.Diagnosis | None = None
) -> c.Conditions:
    """Running from the Job and its pods; `diagnosis` (`stuck_diagnosis`) gives the reason and
    message while the pods do not all run."""
    assert ctx.workload is not None

    def set_running(status: str, reason: str, message: str) -> c.Conditions:
        return c.set_condition(conds, c.RUNNING, status, reason, message, ctx.generation, ctx.now)

    if outcome == "Complete":
        return set_running(c.FALSE, "Completed", "training finished")
    if outcome == "Failed":
        return set_running(c.FALSE, "JobFailed", "training stopped: the Job failed")
    if job_suspended(ctx.workload):
        return set_running(c.FALSE, "Suspended", "the Job is suspended")
    expected = expected_pods(ctx.workload)
    live = live_pods(ctx)
    running = sum(1 for p in live if pod_phase(p) == "Running")
    if running >= expected:
        message = f"{running}/{expected} pods running"
        return set_running(c.TRUE, "PodsRunning", f"{message}; {ctx.scrape_note}" if ctx.scrape_note else message)
    finished = sum(1 for p in live if pod_phase(p) == "Succeeded")
    if finished and running + finished >= expected:  # the Job controller has not marked it Complete yet
        return set_running(c.TRUE, "Finishing", f"{finished}/{expected} pods finished, {running} running")
    if diagnosis is not None:
        return set_running(c.FALSE, diagnosis.reason, f"{running}/{expected} pods running; {diagnosis.message}")
    return set_running(c.FALSE, "PodsPending", f"{running}/{expected} pods running; {waiting_detail(live)}")


def last_failed_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    failed = [p for p in pods if pod_phase(p) == "Failed" and terminated_state(p)]
    return max(failed, key=lambda p: (terminated_state(p) or {}).get("finishedAt") or "") if failed else None


def failure_detail(pods: list[dict[str, Any]]) -> str:
    """The last failed pod's exit and termination message (the trainer's error, or its log tail)."""
    last = last_failed_pod(pods)
    if last is None:
        return ""
    state = terminated_state(last) or {}
    text = f"last pod {pod_name(last)} exited {state.get('exitCode')} ({state.get('reason') or 'Error'})"
    message = trainer_error(termination_message(last))
    if message:
        text += ": " + c.clip(message, FAILURE_DETAIL_LIMIT)
    return text


def trainer_error(message: str) -> str:
    """The trainer's own words from its termination message (a failed `TrainerResult`) as
    "reason: message"; anything else (a log tail, a crash) as written."""
    result, _ = TrainerResult.parse(message)
    if result is None or not result.message:
        return message
    return f"{result.reason}: {result.message}" if result.reason else result.message


def trainer_reason(pods: list[dict[str, Any]]) -> str | None:
    """The reason the trainer gave for the last failure (InvalidInput, InputUnavailable, ...)."""
    last = last_failed_pod(pods)
    if last is None:
        return None
    result, _ = TrainerResult.parse(termination_message(last))
    return result.reason if result is not None and result.phase == "Failed" else None


def failed_condition(conds: c.Conditions, ctx: Context) -> c.Conditions:
    """Failed=True with the trainer's reason when it gave one (the Job's own reason, e.g.
    PodFailurePolicy or BackoffLimitExceeded, otherwise): the trainer's words first, then the Job's."""
    assert ctx.workload is not None
    failed = job_condition(ctx.workload, "Failed") or {}
    reason = trainer_reason(ctx.pods) or failed.get("reason") or "JobFailed"
    parts = [failure_detail(ctx.pods), failed.get("message") or "the Job failed"]
    message = "; ".join(p for p in parts if p)
    return c.set_condition(conds, c.FAILED, c.TRUE, reason, message, ctx.generation, ctx.now)


def succeeded_result(ctx: Context) -> ReportedResult:
    for pod in rank0_pods(ctx.pods):
        if pod_phase(pod) == "Succeeded":
            return parse_result(termination_message(pod))
    return ReportedResult(None, "rank 0's pod is gone, so its termination message could not be read")


def apply_untrusted(status: Status, ctx: Context, problem: str) -> Status:
    """Failed=True reason UntrustedResult: the run finished, but what it reported is not passed on."""
    message = f"{problem}; the result is not used (the trainer publishes to {adapter_uri(ctx.job.spec.output.uri)})"
    status["conditions"] = c.set_condition(
        status.get("conditions"), c.FAILED, c.TRUE, UNTRUSTED_RESULT, " ".join(message.split()), ctx.generation, ctx.now
    )
    return status


def apply_success(status: Status, ctx: Context) -> Status:
    """Succeeded=True, status.adapter and the final metrics and progress from rank 0's result;
    Failed=True (UntrustedResult) when the result names a location outside the job's output."""
    result = succeeded_result(ctx)
    problem = result_problem(result, ctx.job.spec.output.uri)
    if problem:
        return apply_untrusted(status, ctx, problem)
    adapter = adapter_artifact(result, ctx.job.spec.output.uri)
    message = f"adapter written to {adapter['uri']}"
    if result.error:
        message += f" (assumed: {result.error})"
    if result.evaluation:
        status["evaluation"] = result.evaluation
        summary = evaluation_summary(result.evaluation)
        message += f"; {summary}" if summary else ""
    status["conditions"] = c.set_condition(
        status.get("conditions"), c.SUCCEEDED, c.TRUE, "Completed", message, ctx.generation, ctx.now
    )
    status["adapter"] = adapter
    status["metrics"] = {**(status.get("metrics") or {}), **result.metrics}
    progress = {k: v for k, v in (status.get("progress") or {}).items() if k != "eta"}
    if result.steps is not None:
        progress["step"] = result.steps
        progress.setdefault("totalSteps", result.steps)
    progress["percent"] = 100
    status["progress"] = progress
    return status


def evaluation_readings(evaluation: dict[str, Any] | None) -> dict[str, float]:
    """status.evaluation flattened to the names promotion rules use ("rougeL.delta", "forgettingRatio")."""
    evaluation = evaluation or {}
    readings = {
        f"{name}.{side}": value
        for name, compared in (evaluation.get("metrics") or {}).items()
        if isinstance(compared, dict)
        for side, value in compared.items()
    }
    readings["forgettingRatio"] = evaluation.get("forgettingRatio")
    return {
        name: float(value)
        for name, value in readings.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def evaluation_summary(evaluation: dict[str, Any]) -> str:
    """One line for the Succeeded condition (and its Event): each compared metric base -> tuned."""
    parts = []
    for name, compared in (evaluation.get("metrics") or {}).items():
        if name != "perplexity" and {"base", "tuned"} <= set(compared):
            parts.append(f"{name} {compared['base']:.3g} -> {compared['tuned']:.3g}")
    if evaluation.get("forgettingRatio") is not None:
        parts.append(f"forgetting ratio {evaluation['forgettingRatio']:.3g}")
    if parts:
        parts.append(f"on {evaluation.get('examples', 0)} held-out examples" if evaluation.get("examples") else "")
    return ("evaluated: " + ", ".join(p for p in parts if p)) if parts else ""


def times(status: Status, workload: dict[str, Any], outcome: str | None) -> Status:
    """startTime: when the Job first started (kept across suspend/resume, which resets the Job's);
    completionTime: the Job's, or when it failed."""
    job_status = workload.get("status") or {}
    if not status.get("startTime") and job_status.get("startTime"):
        status["startTime"] = job_status["startTime"]
    if outcome == "Complete" and job_status.get("completionTime"):
        status["completionTime"] = job_status["completionTime"]
    elif outcome == "Failed" and not status.get("completionTime"):
        failed = job_condition(workload, "Failed") or {}
        if failed.get("lastTransitionTime"):
            status["completionTime"] = failed["lastTransitionTime"]
    return status


def derive_status(current: Status | None, ctx: Context) -> Status:
    """The status the FineTuneJob should have, given what is stored and what its Job shows.

    A job that admission has not accepted, or that already finished, keeps its stored status; so
    does one whose Job is absent (the handlers create it, or its TTL removed it after the end)."""
    status = readable_status(current)
    conds = status.get("conditions") or []
    if not c.is_true(conds, c.ADMITTED) or ctx.workload is None or c.is_finished(conds):
        return status
    outcome = job_outcome(ctx.workload)
    diagnosis = stuck_diagnosis(ctx)
    conds = suspended_condition(conds, ctx)
    conds = running_condition(conds, ctx, outcome, diagnosis)
    status["conditions"] = conds
    if outcome == "Failed":
        status["conditions"] = failed_condition(conds, ctx)
    if outcome == "Complete":
        status = apply_success(status, ctx)
    status = times(status, ctx.workload, outcome)
    # never lowered: preemptions come from rank 0's resumes (scrape.apply_reading), and a failed
    # pod the Job controller has since deleted no longer shows in what is read here
    status["restarts"] = max(restarts(ctx.workload, ctx.pods), int(status.get("restarts") or 0))
    status["phase"] = c.phase_of(status["conditions"])
    needs_person = diagnosis.needs_person if diagnosis is not None else None
    status["conditions"] = kstatus_conditions(status["conditions"], ctx.generation, ctx.now, needs_person)
    if ctx.generation is not None:
        status["observedGeneration"] = ctx.generation
    return status


# --- the kstatus conditions ----------------------------------------------------------------------

# Running reasons that may mean the job waits on a person (a missing PVC, an image that cannot be
# pulled, ...): they make it Stalled as well as not Running when `waits_on_person` says so.
STALLED_RUNNING_REASONS: frozenset[str] = stuck.REASONS


@dataclass(frozen=True)
class Summary:
    """Ready, Reconciling and Stalled as one decision: (status, reason, message) each."""

    ready: tuple[str, str, str]
    reconciling: tuple[str, str, str]
    stalled: tuple[str, str, str]


def said(condition: dict[str, Any], key: str, default: str) -> str:
    """A condition's reason or message as stored, or `default`: the status may have been edited."""
    value = condition.get(key)
    return value if isinstance(value, str) and value else default


def waits_on_person(conds: c.Conditions, reason: str, needs_person: bool | None) -> bool:
    """Whether the Running reason `reason` (the job's pods do not run) needs a person. Some reasons
    always do (an image that cannot be pulled, OOMKilled, ...); for the others (Unschedulable,
    FailedCreate, FailedMount) the words decide (`stuck`), so `needs_person` comes from the
    diagnosis just made; without one (admission restating the stored conditions) the stored
    Stalled stands while it names the same reason."""
    if reason not in STALLED_RUNNING_REASONS:
        return False
    if needs_person is not None:
        return needs_person
    if reason in stuck.ALWAYS_STALLED:
        return True
    stalled = c.find(conds, c.STALLED) or {}
    return stalled.get("status") == c.TRUE and stalled.get("reason") == reason


def kstatus_summary(conds: c.Conditions, needs_person: bool | None = None) -> Summary:
    """Ready, Reconciling and Stalled from the job's own conditions. Ready: it Succeeded. Stalled:
    it Failed, for any reason (refused at admission, out of retries, an untrusted result), or its
    pods wait on something only a person can change (`waits_on_person`): nothing changes without a
    person. Reconciling: on its way (Pending, Admitted, Running, or queued in Kueue). A job
    suspended by its spec is neither: it waits, as asked, for the spec to change. Stalled and
    Reconciling are never both True: kstatus takes whichever comes first in the list."""
    phase = c.phase_of(conds)
    failed = c.find(conds, c.FAILED) or {}
    running = c.find(conds, c.RUNNING) or {}
    if phase == c.FAILED:
        reason, message = said(failed, "reason", "Failed"), said(failed, "message", "the job failed")
        return Summary(
            (c.FALSE, reason, message),
            (c.FALSE, "Failed", "nothing more will happen until the spec changes"),
            (c.TRUE, reason, message),
        )
    if phase == c.SUCCEEDED:
        message = said(c.find(conds, c.SUCCEEDED) or {}, "message", "training finished")
        return Summary(
            (c.TRUE, c.SUCCEEDED, message),
            (c.FALSE, c.SUCCEEDED, "training finished"),
            (c.FALSE, c.SUCCEEDED, "training finished"),
        )
    running_reason = said(running, "reason", "")
    if (
        phase != c.SUSPENDED
        and running.get("status") != c.TRUE
        and waits_on_person(conds, running_reason, needs_person)
    ):
        message = said(running, "message", running_reason)
        return Summary(
            (c.FALSE, running_reason, message),
            (c.FALSE, "Stalled", "the job waits on a person: see Stalled"),
            (c.TRUE, running_reason, message),
        )
    if phase == c.SUSPENDED:
        suspended = c.find(conds, c.SUSPENDED) or {}
        message = said(suspended, "message", "the job is suspended")
        queued = said(suspended, "reason", "") == "Queued"  # Kueue admits it without anyone's help
        return Summary(
            (c.FALSE, "Queued" if queued else c.SUSPENDED, message),
            (c.TRUE, "Queued", message) if queued else (c.FALSE, c.SUSPENDED, message),
            (c.FALSE, c.SUSPENDED, message),
        )
    message = said(running, "message", said(c.find(conds, c.ADMITTED) or {}, "message", "not yet admitted"))
    return Summary((c.FALSE, phase, message), (c.TRUE, phase, message), (c.FALSE, phase, message))


def kstatus_conditions(
    conds: c.Conditions, generation: int | None, now: datetime, needs_person: bool | None = None
) -> c.Conditions:
    """The job's conditions with Ready, Reconciling and Stalled set from the others (appended once,
    then kept in place; lastTransitionTime moves only when one flips). `needs_person`: the
    diagnosis of stuck pods just made, if any (`waits_on_person`)."""
    summary = kstatus_summary(conds, needs_person)
    for type_, (status, reason, message) in zip(
        c.KSTATUS_TYPES, (summary.ready, summary.reconciling, summary.stalled), strict=True
    ):
        conds = c.set_condition(conds, type_, status, reason, message, generation, now)
    return conds


# --- the stored status, read back ----------------------------------------------------------------


def _is_int(value: Any, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high


def _is_reading(value: Any) -> bool:
    """A finite number (an int too large for a float is none: math.isfinite would raise on it)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= MAX_COUNT
    return isinstance(value, float) and math.isfinite(value)


def readable_conditions(value: Any) -> list[dict[str, Any]]:
    """The conditions that are conditions (a mapping with a string type and status); others dropped."""
    if not isinstance(value, list):
        return []
    return [dict(x) for x in value if isinstance(x, dict) and isinstance(x.get("type"), str)
            and isinstance(x.get("status"), str)]  # fmt: skip


def readable_progress(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {}
    out: dict[str, Any] = {}
    for key in ("step", "totalSteps"):
        if _is_int(value.get(key), MAX_COUNT):
            out[key] = value[key]
    if _is_int(value.get("percent"), 100):
        out["percent"] = value["percent"]
    if _is_reading(value.get("epoch")):
        out["epoch"] = value["epoch"]
    if isinstance(value.get("eta"), str):
        out["eta"] = value["eta"][:64]
    return out


def readable_status(current: Status | None) -> Status:
    """A copy of the stored status with what the operator reads back held to the limits it writes
    with: conditions that are conditions, restarts a count, metrics finite, progress in range. What
    falls outside is dropped (and rewritten by the next derivation), never a reason to raise."""
    status = copy.deepcopy(current) if isinstance(current, dict) else {}
    if "conditions" in status:
        status["conditions"] = readable_conditions(status["conditions"])
    if "restarts" in status and not _is_int(status["restarts"], MAX_RESTARTS):
        del status["restarts"]
    if "metrics" in status:
        metrics = status["metrics"] if isinstance(status["metrics"], dict) else {}
        status["metrics"] = {k: float(metrics[k]) for k in METRIC_KEYS if _is_reading(metrics.get(k))}
    if "progress" in status:
        status["progress"] = readable_progress(status["progress"])
    return status


# --- admission -----------------------------------------------------------------------------------

ADMISSION_REASONS = ("InvalidSpec", "InsufficientGpuMemory", "NotAllowed")


def apply_admission(
    current: Status | None,
    admitted: bool,
    reason: str,
    message: str,
    plan: dict[str, Any] | None,
    generation: int | None,
    now: datetime,
) -> Status:
    """The status after admission: Admitted True (with the plan), or Admitted False plus Failed
    True with the same reason (no retries: the same spec fails the same way). A job refused
    earlier and admitted now (resources changed while suspended) gets Failed False back."""
    status = readable_status(current)
    conds = status.get("conditions") or []
    if admitted:
        conds = c.set_condition(conds, c.ADMITTED, c.TRUE, reason, message, generation, now)
        refused = c.find(conds, c.FAILED)
        if refused and refused.get("status") == c.TRUE and refused.get("reason") in ADMISSION_REASONS:
            message = "admitted after the spec changed"
            conds = c.set_condition(conds, c.FAILED, c.FALSE, "Readmitted", message, generation, now)
    else:
        conds = c.set_condition(conds, c.ADMITTED, c.FALSE, reason, message.split("\n")[0], generation, now)
        conds = c.set_condition(conds, c.FAILED, c.TRUE, reason, message, generation, now)
    status["conditions"] = kstatus_conditions(conds, generation, now)
    if plan:
        status["plan"] = plan
    status["phase"] = c.phase_of(conds)
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def acknowledge_generation(current: Status, generation: int | None) -> Status:
    """A finished job's status with the spec edit acknowledged. Nothing of a finished run changes
    (its Job may be gone with its TTL; the edits left possible, runPolicy/resources/image, have
    nothing to act on), but status.observedGeneration and every condition's move to `generation`:
    kstatus readers (Flux, `kubectl wait`) read an older observedGeneration as InProgress, and would
    wait forever on a job that has long Succeeded or Failed. Reasons, messages and transition times
    stay as they are."""
    if generation is None:
        return current
    status = dict(current)
    conds = status.get("conditions")
    if isinstance(conds, list):
        status["conditions"] = [
            {**cond, "observedGeneration": generation}
            if isinstance(cond, dict) and "observedGeneration" in cond
            else cond
            for cond in conds
        ]
    if "observedGeneration" in status:
        status["observedGeneration"] = generation
    return status


# --- what the resync loop tracks -----------------------------------------------------------------

FINISHED = (c.SUCCEEDED, c.FAILED)


@dataclass(frozen=True)
class Tracked:
    """A FineTuneJob as the resync loop sees it (the value of the operator's kopf index)."""

    phase: str
    gpus: int
    evaluation: tuple[tuple[str, float], ...] = ()  # a succeeded job's readings, for the operator's gauge
    pods_pending: bool = False  # admitted, its pods not all running: what holds them shows in Events

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED


def tracked(spec: dict[str, Any], status: dict[str, Any]) -> Tracked:
    """Its phase (Pending until the operator wrote one), the GPUs it holds while it runs, what its
    evaluation measured, and whether it is admitted with pods that do not all run (Running=False:
    a Job controller that cannot create them says so only in Events, which nothing watches)."""
    resources = spec.get("resources") or {}
    gpus = int(resources.get("nodes") or 1) * int(resources.get("gpusPerNode", 1) or 0)
    readings = tuple(sorted(evaluation_readings((status or {}).get("evaluation")).items()))
    phase = (status or {}).get("phase") or c.PENDING
    running = c.find((status or {}).get("conditions"), c.RUNNING) or {}
    pending = phase == c.ADMITTED and running.get("status") == c.FALSE
    return Tracked(phase, gpus, readings, pending)

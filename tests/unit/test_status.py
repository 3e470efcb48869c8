"""A FineTuneJob's status from its Job and pods: conditions, phase, restarts without disruptions,
times, and the result read from rank 0's termination message (malformed ones included)."""

import json
import math
from datetime import UTC, datetime, timedelta

import pytest

from kubetune.api import FineTuneJob
from kubetune_operator import conditions as c
from kubetune_operator.finetunejob import status as s
from kubetune_operator.finetunejob.render import pod_failure_policy
from kubetune_operator.writes import merge_patch

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(minutes=1)
OUTPUT = "s3://adapters/support-bot"


def ftj(generation=1, suspend=False, queue=None, nodes=1):
    policy = {"suspend": suspend, **({"queueName": queue} if queue else {})}
    return FineTuneJob.model_validate({
        "metadata": {"name": "support-bot", "namespace": "ml", "uid": "u-1", "generation": generation},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"uri": "s3://data/chat.jsonl", "format": "chat"},
            "hyperparameters": {"maxSteps": 100, "globalBatchSize": 8 * nodes},
            "resources": {"nodes": nodes},
            "output": {"uri": OUTPUT},
            "runPolicy": policy,
        },
    })  # fmt: skip


def workload(suspend=False, failed=0, conditions=(), parallelism=1, policy=True, start="2026-01-02T03:00:00Z",
             **status):  # fmt: skip
    spec = {"parallelism": parallelism, "completions": parallelism, "suspend": suspend}
    if policy:
        spec["podFailurePolicy"] = pod_failure_policy()
    job_status = {"failed": failed, "conditions": list(conditions), **status}
    if start:
        job_status["startTime"] = start
    return {"metadata": {"name": "support-bot", "uid": "j-1"}, "spec": spec, "status": job_status}


def job_cond(type_, reason="", message="", when="2026-01-02T04:00:00Z"):
    return {"type": type_, "status": "True", "reason": reason, "message": message, "lastTransitionTime": when}


def pod(name="support-bot-0-abc", phase="Running", index="0", created="2026-01-02T03:00:01Z", disrupted=False,
        terminated=None, deleting=False, ip="10.0.0.7", scheduled=None):  # fmt: skip
    meta = {"name": name, "creationTimestamp": created, "annotations": {s.COMPLETION_INDEX: index}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T03:30:00Z"
    conditions = []
    if disrupted:
        conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"})
    if scheduled is not None:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": scheduled})
    status = {"phase": phase, "conditions": conditions, "podIP": ip}
    if terminated is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    return {"metadata": meta, "status": status}


def admitted(generation=1):
    conds = c.set_condition([], c.ADMITTED, c.TRUE, "Admitted", "ok", generation, T0)
    return {"conditions": conds, "phase": "Admitted", "plan": {"worldSize": 1}}


def derive(current, job=None, wl=None, pods=(), now=T1, note=""):
    return s.derive_status(current, s.Context(job or ftj(), wl, list(pods), now, note))


def cond(status, type_):
    return c.find(status.get("conditions"), type_)


# --- conditions ----------------------------------------------------------------------------------


def test_not_admitted_or_without_a_job_nothing_changes():
    assert derive({}, wl=workload()) == {}
    assert derive(admitted(), wl=None) == admitted()


def test_pods_pending_then_running():
    unschedulable = pod(phase="Pending", scheduled="0/3 nodes: Insufficient nvidia.com/gpu")
    pending = derive(admitted(), wl=workload(), pods=[unschedulable])
    running = cond(pending, c.RUNNING)
    # the scheduler's reason, and the GPUs may free up: not a person's to act on
    assert running["status"] == "False" and running["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in running["message"] and pending["phase"] == "Admitted"
    assert cond(pending, c.STALLED)["status"] == "False" and cond(pending, c.RECONCILING)["status"] == "True"

    now_running = derive(pending, wl=workload(active=1), pods=[pod()])
    assert cond(now_running, c.RUNNING)["status"] == "True" and now_running["phase"] == "Running"
    assert cond(now_running, c.RUNNING)["message"] == "1/1 pods running"
    assert cond(now_running, c.ADMITTED) == cond(admitted(), c.ADMITTED)  # admission's own condition untouched


def test_running_needs_every_node():
    pods = [pod(), pod("b", phase="Pending", index="1")]
    st = derive(admitted(), job=ftj(nodes=2), wl=workload(parallelism=2), pods=pods)
    assert cond(st, c.RUNNING)["status"] == "False" and "1/2 pods running" in cond(st, c.RUNNING)["message"]


def test_deriving_twice_changes_nothing():
    first = derive(admitted(), wl=workload(active=1), pods=[pod()], now=T1)
    assert derive(first, wl=workload(active=1), pods=[pod()], now=T1 + timedelta(hours=1)) == first
    assert merge_patch(first, derive(first, wl=workload(active=1), pods=[pod()])) is None


def test_observed_generation_follows_the_spec():
    first = derive(admitted(), wl=workload(active=1), pods=[pod()])
    later = derive(first, job=ftj(generation=3), wl=workload(active=1), pods=[pod()], now=T1 + timedelta(hours=1))
    assert later["observedGeneration"] == 3 and cond(later, c.RUNNING)["observedGeneration"] == 3
    assert cond(later, c.RUNNING)["lastTransitionTime"] == cond(first, c.RUNNING)["lastTransitionTime"]


def test_scrape_trouble_is_told_in_the_running_message():
    st = derive(admitted(), wl=workload(active=1), pods=[pod()], note="training metrics unavailable since X")
    assert cond(st, c.RUNNING)["status"] == "True" and cond(st, c.RUNNING)["message"].endswith("unavailable since X")


def test_suspend_and_resume():
    running = derive(admitted(), wl=workload(active=1), pods=[pod()])
    later = T1 + timedelta(minutes=1)
    suspended = derive(running, job=ftj(suspend=True), wl=workload(suspend=True), pods=[], now=later)
    assert cond(suspended, c.SUSPENDED)["status"] == "True" and cond(suspended, c.SUSPENDED)["reason"] == "Suspended"
    assert cond(suspended, c.RUNNING)["reason"] == "Suspended" and suspended["phase"] == "Suspended"

    resumed = derive(suspended, wl=workload(), pods=[pod(phase="Pending")], now=T1 + timedelta(minutes=2))
    assert cond(resumed, c.SUSPENDED)["status"] == "False" and cond(resumed, c.SUSPENDED)["reason"] == "Resumed"
    assert resumed["phase"] == "Admitted"


def test_a_queued_job_is_suspended_by_kueue():
    st = derive(admitted(), job=ftj(queue="gpus"), wl=workload(suspend=True))
    assert cond(st, c.SUSPENDED)["reason"] == "Queued" and "gpus" in cond(st, c.SUSPENDED)["message"]


def test_never_suspended_means_no_suspended_condition():
    assert cond(derive(admitted(), wl=workload(active=1), pods=[pod()]), c.SUSPENDED) is None


def test_pods_done_before_the_job_is_marked_complete_still_read_running():
    # between the last pod's exit and the Job's Complete condition: no flicker back to Admitted
    st = derive(admitted(), wl=workload(parallelism=2, active=1), pods=[pod("a", phase="Succeeded"), pod("b")])
    assert st["phase"] == "Running" and cond(st, c.RUNNING)["reason"] == "Finishing"


# --- restarts ------------------------------------------------------------------------------------


def test_restarts_count_failures():
    assert derive(admitted(), wl=workload(failed=2, active=1), pods=[pod()])["restarts"] == 2


def test_restarts_are_never_lowered():
    # 2 came from rank 0's resumes (a preemption the Job does not count as a failure)
    assert derive({**admitted(), "restarts": 2}, wl=workload(failed=1, active=1), pods=[pod()])["restarts"] == 2


def test_disruptions_do_not_count_when_the_job_already_ignores_them():
    # The podFailurePolicy's Ignore rule keeps evicted pods out of status.failed already.
    evicted = pod("old", phase="Failed", disrupted=True, terminated={"exitCode": 137})
    assert s.restarts(workload(failed=1), [evicted, pod()]) == 1


def test_disruptions_are_subtracted_when_the_job_counts_them():
    evicted = pod("old", phase="Failed", disrupted=True, terminated={"exitCode": 137})
    crashed = pod("older", phase="Failed", terminated={"exitCode": 1})
    assert s.restarts(workload(failed=2, policy=False), [evicted, crashed, pod()]) == 1


# --- success -------------------------------------------------------------------------------------

RESULT = {
    "phase": "Succeeded",
    "adapter": {
        "uri": OUTPUT + "/adapter",
        "sizeBytes": 19302911,
        "sha256": "ab" * 32,
        "mergedUri": OUTPUT + "/merged",
    },
    "metrics": {"trainLoss": 1.21, "evalLoss": 1.34, "tokensPerSecond": 5310.0},
    "steps": 100,
}


def complete(message):
    done = pod(phase="Succeeded", terminated={"exitCode": 0, "reason": "Completed", "message": message})
    wl = workload(conditions=[job_cond("Complete")], succeeded=1, completionTime="2026-01-02T04:00:00Z")
    running = derive(admitted(), wl=workload(active=1), pods=[pod()], now=T0)
    running["progress"] = {"step": 90, "totalSteps": 100, "percent": 90, "eta": "2026-01-02T04:01:00Z"}
    running["metrics"] = {"trainLoss": 1.5, "learningRate": 1e-5}
    return derive(running, wl=wl, pods=[done])


def test_success_reads_rank_zero_termination_message():
    st = complete(json.dumps(RESULT))
    assert st["phase"] == "Succeeded" and cond(st, c.SUCCEEDED)["status"] == "True"
    assert cond(st, c.RUNNING)["status"] == "False" and cond(st, c.RUNNING)["reason"] == "Completed"
    assert st["adapter"] == {
        "uri": OUTPUT + "/adapter",
        "sizeBytes": 19302911,
        "sha256": "ab" * 32,
        "mergedUri": OUTPUT + "/merged",
    }
    assert st["metrics"] == {"trainLoss": 1.21, "evalLoss": 1.34, "tokensPerSecond": 5310.0, "learningRate": 1e-5}
    assert st["progress"] == {"step": 100, "totalSteps": 100, "percent": 100}
    assert st["completionTime"] == "2026-01-02T04:00:00Z" and st["startTime"] == "2026-01-02T03:00:00Z"


EVALUATION = {
    "examples": 32,
    "seconds": 4.5,
    "tokensGenerated": 3100,
    "metrics": {
        "rougeL": {"base": 0.12, "tuned": 0.41, "delta": 0.29},
        "perplexity": {"base": 20.0, "tuned": 21.0, "delta": 1.0},
        "madeUp": {"base": 1.0},
    },
    "forgettingRatio": 1.05,
}


def test_the_evaluation_goes_into_status_the_condition_and_the_gauge_readings():
    st = complete(json.dumps({**RESULT, "evaluation": EVALUATION}))
    assert st["evaluation"] == {k: v for k, v in EVALUATION.items() if k != "metrics"} | {
        "metrics": {"rougeL": EVALUATION["metrics"]["rougeL"], "perplexity": EVALUATION["metrics"]["perplexity"]}
    }  # only the metrics the API knows
    assert cond(st, c.SUCCEEDED)["message"].endswith(
        "evaluated: rougeL 0.12 -> 0.41, forgetting ratio 1.05, on 32 held-out examples"
    )
    entry = s.tracked({}, st)
    assert dict(entry.evaluation) == {
        "rougeL.base": 0.12,
        "rougeL.tuned": 0.41,
        "rougeL.delta": 0.29,
        "perplexity.base": 20.0,
        "perplexity.tuned": 21.0,
        "perplexity.delta": 1.0,
        "forgettingRatio": 1.05,
    }
    assert "evaluation" not in complete(json.dumps(RESULT))  # no evaluation reported: none in status


def test_the_evaluation_gauge_keeps_only_the_jobs_that_exist():
    from prometheus_client import generate_latest

    from kubetune_operator import metrics

    metrics.set_evaluations([(("ml", "a"), [("rougeL.delta", 0.29)]), (("ml", "b"), [("forgettingRatio", 1.1)])])
    text = generate_latest(metrics.REGISTRY).decode()
    assert 'kubetune_operator_finetunejob_evaluation{metric="rougeL.delta",name="a",namespace="ml"} 0.29' in text
    metrics.set_evaluations([(("ml", "b"), [("forgettingRatio", 1.1)])])  # job a was deleted
    text = generate_latest(metrics.REGISTRY).decode()
    assert 'name="a"' not in text and 'name="b"' in text


@pytest.mark.parametrize("message", ["", "not json {", "[1, 2]", '{"adapter": "nope", "metrics": {"trainLoss": "x"}}'])
def test_a_malformed_termination_message_still_succeeds_with_the_known_adapter_path(message):
    st = complete(message)
    assert st["phase"] == "Succeeded"
    assert st["adapter"] == {"uri": OUTPUT + "/adapter"}
    assert "assumed" in cond(st, c.SUCCEEDED)["message"] or message.startswith('{"adapter"')
    assert st["metrics"]["trainLoss"] == 1.5  # the last scraped value stays


def test_parse_result_refuses_a_result_that_does_not_match_the_contract():
    result = s.parse_result(json.dumps({"phase": "Succeeded", "adapter": {"uri": 5, "sizeBytes": True}, "steps": "7"}))
    assert result.result is None and result.adapter == {} and result.steps is None
    assert "adapter.uri" in result.error
    assert "not JSON" in s.parse_result("{truncated").error


def test_parse_result_drops_readings_that_are_no_numbers():
    result = s.parse_result(json.dumps({"phase": "Succeeded", "metrics": {"trainLoss": float("nan"), "evalLoss": 2}}))
    assert result.metrics == {"evalLoss": 2.0} and not result.error


def test_a_finished_status_is_final():
    st = complete(json.dumps(RESULT))
    assert derive(st, wl=None) == st
    assert derive(st, wl=workload(active=1), pods=[pod()]) == st


# --- failure -------------------------------------------------------------------------------------


def test_failure_carries_the_jobs_reason_and_the_last_pod_message():
    def exited(code, message, at):
        return {"exitCode": code, "reason": "Error", "message": message, "finishedAt": at}

    first = pod("a", phase="Failed", terminated=exited(1, "old", "2026-01-02T03:10:00Z"))
    last = pod("b", phase="Failed", terminated=exited(2, "dataset row 3: no messages", "2026-01-02T03:20:00Z"))
    because = job_cond("Failed", "PodFailurePolicy", "Container trainer for pod ml/b failed with exit code 2")
    wl = workload(failed=2, conditions=[because])
    st = derive(admitted(), wl=wl, pods=[first, last])
    failed = cond(st, c.FAILED)
    assert st["phase"] == "Failed" and failed["reason"] == "PodFailurePolicy"
    assert "exit code 2" in failed["message"]
    assert "last pod b exited 2 (Error): dataset row 3: no messages" in failed["message"]
    assert st["completionTime"] == "2026-01-02T04:00:00Z" and st["restarts"] == 1  # the last one was not retried
    assert cond(st, c.RUNNING)["reason"] == "JobFailed"


def test_the_trainers_json_error_is_quoted_as_reason_and_message():
    error = json.dumps({"phase": "Failed", "reason": "InvalidInput", "message": "dataset row 3: no messages"})
    crashed = pod("c", phase="Failed", terminated={"exitCode": 2, "reason": "Error", "message": error})
    wl = workload(failed=1, conditions=[job_cond("Failed", "PodFailurePolicy", "exit code 2")])
    failed = cond(derive(admitted(), wl=wl, pods=[crashed]), c.FAILED)
    assert failed["reason"] == "InvalidInput"  # the trainer's, not the Job's PodFailurePolicy
    assert failed["message"] == "last pod c exited 2 (Error): InvalidInput: dataset row 3: no messages; exit code 2"
    assert s.trainer_error("Traceback (most recent call last): ...") == "Traceback (most recent call last): ..."


def test_deadline_exceeded():
    wl = workload(conditions=[job_cond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")])
    st = derive(admitted(), wl=wl)
    assert cond(st, c.FAILED)["reason"] == "DeadlineExceeded" and st["phase"] == "Failed"


# --- start time, admission, patches -------------------------------------------------------------


def test_start_time_survives_a_resume_that_resets_the_jobs():
    first = derive(admitted(), wl=workload(active=1), pods=[pod()])
    again = derive(first, wl=workload(start="2026-01-02T05:00:00Z", active=1), pods=[pod()])
    assert again["startTime"] == "2026-01-02T03:00:00Z"


def test_admission_refusal_is_failed_without_retry_and_readmission_clears_it():
    refused = s.apply_admission({}, False, "InsufficientGpuMemory", "needs 900 GiB\nmore", {"worldSize": 1}, 1, T0)
    assert refused["phase"] == "Failed" and cond(refused, c.FAILED)["reason"] == "InsufficientGpuMemory"
    assert cond(refused, c.ADMITTED)["status"] == "False" and cond(refused, c.ADMITTED)["message"] == "needs 900 GiB"
    readmitted = s.apply_admission(refused, True, "Admitted", "fits", {"worldSize": 8}, 2, T1)
    assert readmitted["phase"] == "Admitted" and cond(readmitted, c.FAILED)["status"] == "False"
    assert readmitted["plan"] == {"worldSize": 8} and readmitted["observedGeneration"] == 2


def test_merge_patch_sends_only_changes_and_nulls_removals():
    before = {"phase": "Running", "progress": {"step": 1, "eta": "x"}, "conditions": [{"type": "A"}]}
    after = {"phase": "Running", "progress": {"step": 2}, "conditions": [{"type": "A"}, {"type": "B"}]}
    expected = {"progress": {"step": 2, "eta": None}, "conditions": [{"type": "A"}, {"type": "B"}]}
    assert merge_patch(before, after) == expected
    assert merge_patch(after, after) is None


# --- untrusted results and status ----------------------------------------------------------------


def assert_patchable(value, where="status"):
    """What the API server takes: finite numbers, integers within int64, nothing but JSON types."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), where
            assert_patchable(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            assert_patchable(item, f"{where}[{index}]")
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        pass
    elif isinstance(value, int):
        assert -(2**63) <= value < 2**63, where
    else:
        assert isinstance(value, float) and math.isfinite(value), where


@pytest.mark.parametrize(
    "uri",
    [
        "http://169.254.169.254/latest/meta-data/",
        "pvc://payroll-db-data/",
        "s3://adapters/someone-else/adapter",
        "s3://adapters/support-bot/../other/adapter",
        "s3://adapters/support-bot-2/adapter",
        "file:///etc/passwd",
        "s3://adapters/support-bot/adapter\nX-Injected: 1",
    ],
)
def test_an_adapter_uri_outside_the_jobs_output_fails_the_job_as_untrusted(uri):
    st = complete(json.dumps({**RESULT, "adapter": {**RESULT["adapter"], "uri": uri}}))
    failed = cond(st, c.FAILED)
    assert st["phase"] == "Failed" and failed["reason"] == "UntrustedResult", st
    assert "\n" not in failed["message"] and OUTPUT in failed["message"]
    assert "adapter" not in st and cond(st, c.SUCCEEDED) is None


def test_a_merged_uri_outside_the_output_is_untrusted_too():
    adapter = {**RESULT["adapter"], "mergedUri": "pvc://payroll-db-data/merged"}
    st = complete(json.dumps({**RESULT, "adapter": adapter}))
    assert st["phase"] == "Failed" and cond(st, c.FAILED)["reason"] == "UntrustedResult"


GGUF = [{"type": "q8_0", "uri": OUTPUT + "/model-q8_0.gguf", "sizeBytes": 7_200_000_000, "sha256": "cd" * 32}]


def test_the_exports_reach_the_status_beside_the_adapter():
    st = complete(json.dumps({**RESULT, "adapter": {**RESULT["adapter"], "gguf": GGUF}}))
    assert st["phase"] == "Succeeded", st
    assert st["adapter"]["mergedUri"] == OUTPUT + "/merged" and st["adapter"]["gguf"] == GGUF
    assert_patchable(st)


def test_a_gguf_file_outside_the_output_is_untrusted():
    gguf = [GGUF[0], {**GGUF[0], "type": "f16", "uri": "s3://somebody-elses-bucket/model.gguf"}]
    st = complete(json.dumps({**RESULT, "adapter": {**RESULT["adapter"], "gguf": gguf}}))
    failed = cond(st, c.FAILED)
    assert st["phase"] == "Failed" and failed["reason"] == "UntrustedResult"
    assert "adapter.gguf[1].uri" in failed["message"]


def test_an_adapter_under_the_output_is_trusted():
    adapter = {**RESULT["adapter"], "uri": OUTPUT + "/adapter", "mergedUri": OUTPUT + "/merged"}
    st = complete(json.dumps({**RESULT, "adapter": adapter}))
    assert st["phase"] == "Succeeded" and st["adapter"]["uri"] == OUTPUT + "/adapter"


@pytest.mark.parametrize(
    "extra",
    [
        {"steps": 10**23},
        {"metrics": {"evalLoss": float("inf"), "trainLoss": 1e308 * 10}},
        {"adapter": {**RESULT["adapter"], "sizeBytes": 10**22}},
    ],
)
def test_numbers_from_the_pod_reach_the_status_only_when_the_api_server_takes_them(extra):
    st = complete(json.dumps({**RESULT, **extra}))
    assert_patchable(st)
    assert st["phase"] in ("Succeeded", "Failed")


@pytest.mark.parametrize(
    "stored",
    [
        {"restarts": "many", "metrics": [1, 2], "progress": "x"},
        {"restarts": -3, "metrics": {"evalLoss": "NaN", "trainLoss": True}, "progress": {"step": "7", "eta": 5}},
        {"restarts": 2**70, "metrics": {"evalLoss": 1.5, "x" * 100: 1}, "progress": {"step": 10**30}},
        {"metrics": {"evalLoss": 10**400, "trainLoss": 2}, "progress": {"epoch": 10**400}},
        {"conditions": "broken"},
        {"conditions": [{"type": "Admitted", "status": "True"}, "junk", {"type": 5}]},
    ],
)
def test_a_status_edited_by_someone_else_is_read_with_the_same_limits(stored):
    current = {**admitted(), **stored}
    if stored.get("conditions") == "broken":
        st = derive(current, wl=workload(active=1), pods=[pod()])
        assert st.get("phase") != "Running"  # not admitted as far as the operator can tell
        return
    st = derive(current, wl=workload(active=1), pods=[pod()])
    assert_patchable(st)
    assert isinstance(st.get("restarts", 0), int) and 0 <= st.get("restarts", 0) < 2**31
    assert all(isinstance(v, float) and math.isfinite(v) for v in (st.get("metrics") or {}).values())


def test_terminated_state_and_pod_fields_of_odd_types_do_not_raise():
    terminated = {"exitCode": "x", "message": 7}
    statuses = [{"name": "trainer", "state": {"terminated": terminated}}]
    meta = {"name": 5, "annotations": {s.COMPLETION_INDEX: "0"}}
    odd = {"metadata": meta, "status": {"phase": "Failed", "containerStatuses": statuses}}
    because = job_cond("Failed", "BackoffLimitExceeded", "too many")
    st = derive(admitted(), wl=workload(conditions=[because], failed=1), pods=[odd])
    assert st["phase"] == "Failed"

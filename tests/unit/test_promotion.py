"""Promotion gates (adapterdeployment/adapters.py and status.py): a `fromJob` adapter whose
Succeeded FineTuneJob fails one of its `require` rules is Rejected, never loaded, unloaded where it
was loaded, and says which rule failed with the value and the bound; a passing one loads; a job
still running is waited for. Pure functions only; the reconcile with its Event is in test_adapters.py."""

from datetime import UTC, datetime

import pytest

from kubetune_operator.adapterdeployment.adapters import Action, Replica, Wanted, plan_actions, resolve
from kubetune_operator.adapterdeployment.status import Observed, derive_status, newly_rejected

NOW = datetime(2026, 1, 1, tzinfo=UTC)
URI = "pvc://out/job/adapter"
EVALUATION = {
    "examples": 40,
    "metrics": {"rougeL": {"base": 0.21, "tuned": 0.34, "delta": 0.13}, "exactMatch": {"base": 0.0, "tuned": 0.1}},
    "forgettingRatio": 1.08,
}


def job(conditions=(("Succeeded", "True"),), evaluation=EVALUATION, metrics=None):
    status = {"conditions": [{"type": t, "status": s} for t, s in conditions], "adapter": {"uri": URI}}
    if evaluation is not None:
        status["evaluation"] = evaluation
    status["metrics"] = metrics or {"evalLoss": 1.4, "trainLoss": 1.1}
    return {"spec": {"output": {"uri": "pvc://out/job"}}, "status": status}


def wanted(require, the_job=None):
    [want] = resolve([{"name": "v1", "fromJob": "job", "require": require}], {"job": the_job or job()})
    return want


def cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def observed(wants, replicas):
    return Observed("support", "ml", 8000, 3, 1, 1, 1, 1, True, wants, replicas, NOW)


@pytest.mark.parametrize(
    "require",
    [
        [],
        [{"metric": "rougeL.delta", "min": 0.05}],
        [{"metric": "rougeL.delta", "min": 0.13}],  # the bound itself passes
        [{"metric": "forgettingRatio", "max": 1.15}, {"metric": "evalLoss", "max": 2.0}],
        [{"metric": "exactMatch.tuned", "min": 0.05, "max": 1}],
    ],
)
def test_a_job_that_meets_every_rule_loads_as_without_rules(require):
    assert wanted(require) == Wanted("v1", URI)


@pytest.mark.parametrize(
    ("require", "line"),
    [
        ([{"metric": "rougeL.delta", "min": 10}], "rougeL.delta is 0.13, required min 10"),
        ([{"metric": "forgettingRatio", "max": 1.05}], "forgettingRatio is 1.08, required max 1.05"),
        ([{"metric": "evalLoss", "max": 1}], "evalLoss is 1.4, required max 1"),
        ([{"metric": "exactMatch.tuned", "min": 0.5, "max": 1}], "exactMatch.tuned is 0.1, required min 0.5 and max 1"),
    ],
)
def test_a_failed_rule_rejects_the_adapter_with_metric_value_and_bound(require, line):
    want = wanted(require)
    assert want.uri is None and want.reason == "AdapterRejected" and not want.problem
    assert want.rejected == f"FineTuneJob job fails require: {line}; not loaded: retrain, or relax the rule"


def test_every_failed_rule_is_named_and_passing_ones_are_not():
    require = [
        {"metric": "rougeL.delta", "min": 0.05},
        {"metric": "forgettingRatio", "max": 1.0},
        {"metric": "trainLoss", "max": 0.5},
    ]
    message = wanted(require).rejected
    assert "forgettingRatio is 1.08, required max 1" in message and "trainLoss is 1.1, required max 0.5" in message
    assert "rougeL" not in message and "\n" not in message


def test_an_unmeasured_metric_fails_its_rule_and_says_how_to_measure_it():
    message = wanted([{"metric": "tokenF1.delta", "min": 0}]).rejected
    assert "tokenF1.delta was not measured by the job (required: min 0)" in message
    assert "enable the job's spec.evaluation" in message
    # A job that ran no evaluation at all: every evaluation rule fails; its losses still count.
    no_eval = job(evaluation=None)
    assert wanted([{"metric": "evalLoss", "max": 2}], no_eval) == Wanted("v1", URI)
    assert "forgettingRatio was not measured" in wanted([{"metric": "forgettingRatio", "max": 2}], no_eval).rejected


def test_a_job_not_finished_is_waited_for_whatever_its_measurements_say():
    for conditions in ((("Running", "True"),), (("Succeeded", "False"), ("Running", "True"))):
        want = wanted([{"metric": "rougeL.delta", "min": 10}], job(conditions))
        assert (want.uri, want.reason, want.rejected) == (None, "WaitingForJob", "")
        assert want.pending == "waiting for FineTuneJob job to succeed"
    failed = wanted([{"metric": "rougeL.delta", "min": 10}], job((("Failed", "True"),)))
    assert (failed.reason, failed.rejected) == ("JobFailed", "")


def test_a_rule_that_does_not_parse_fails_closed():
    """Admission refuses these; one that reached the operator anyway does not let the adapter through."""
    for rule in ({"metric": "bleu", "min": 1}, {"metric": "rougeL.delta"}, {"metric": "rougeL.delta", "min": "x"}):
        assert "require[0] is not a valid rule" in wanted([rule]).rejected


def test_an_untrusted_uri_stays_failed_before_any_rule_is_looked_at():
    hostile = job()
    hostile["status"]["adapter"]["uri"] = "pvc://payroll/"
    want = wanted([{"metric": "rougeL.delta", "min": 10}], hostile)
    assert want.problem and not want.rejected and want.reason == "UntrustedAdapterSource"


def test_a_rule_added_after_the_load_unloads_it_and_it_is_never_loaded_again():
    loaded = Replica("pod-0", "http://x", loaded={"v1": URI, "other": "pvc://a/other"})
    rejected = wanted([{"metric": "rougeL.delta", "min": 10}])
    assert plan_actions([rejected, Wanted("other", "pvc://a/other")], [loaded]) == [Action("pod-0", "unload", "v1")]
    gone = Replica("pod-0", "http://x", loaded={"other": "pvc://a/other"})
    assert plan_actions([rejected, Wanted("other", "pvc://a/other")], [gone]) == []
    # Relaxing the rule loads it again.
    assert plan_actions([wanted([{"metric": "rougeL.delta", "min": 0.1}])], [gone]) == [
        Action("pod-0", "unload", "other"),
        Action("pod-0", "load", "v1", URI),
    ]


def test_status_rejected_is_not_ready_not_degraded_and_progressing_while_it_unloads():
    rejected = wanted([{"metric": "rougeL.delta", "min": 10}])
    wants = [Wanted("other", "pvc://a/other"), rejected]
    still = [Replica("pod-0", "http://x", loaded={"v1": URI, "other": "pvc://a/other"})]
    status = derive_status({}, observed(wants, still))
    entry = next(a for a in status["adapters"] if a["name"] == "v1")
    assert entry == {"name": "v1", "state": "Rejected", "loadedReplicas": 1, "message": rejected.rejected}
    assert [a["name"] for a in status["adapters"]] == ["other", "v1"]  # not listed again as Unloading
    ready = cond(status, "AdaptersReady")
    assert (ready["status"], ready["reason"]) == ("False", "AdapterRejected")
    assert ready["message"] == "1/2 loaded; rejected by require rules: v1 (see status.adapters)"
    assert cond(status, "Degraded")["status"] == "False"
    progressing = cond(status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "AdaptersChanging")
    assert status["readyReplicas"] == 1 and status["adaptersReady"] == "1/2"
    unloaded = [Replica("pod-0", "http://x", loaded={"other": "pvc://a/other"})]
    settled = derive_status(status, observed(wants, unloaded))
    assert next(a for a in settled["adapters"] if a["name"] == "v1")["loadedReplicas"] == 0
    assert cond(settled, "Progressing")["status"] == "False"
    # Something broken outranks the gate in the reason; both are named in the message.
    waiting = Wanted("p", pending="waiting for FineTuneJob j to succeed", reason="WaitingForJob")
    mixed = cond(derive_status({}, observed([rejected, waiting], unloaded)), "AdaptersReady")
    assert mixed["reason"] == "AdapterRejected"
    assert mixed["message"] == "0/2 loaded; not yet: p; rejected by require rules: v1 (see status.adapters)"
    refused = Replica("pod-0", "http://x", loaded={}, failed={"bad": ("pvc://a/bad", "rank too big")})
    assert (
        cond(derive_status({}, observed([rejected, Wanted("bad", "pvc://a/bad")], [refused])), "AdaptersReady")[
            "reason"
        ]
        == "AdapterFailed"
    )


def test_an_adapter_is_announced_rejected_once_per_change():
    rejected = wanted([{"metric": "rougeL.delta", "min": 10}])
    replicas = [Replica("pod-0", "http://x", loaded={})]
    first = derive_status({}, observed([rejected], replicas))
    assert [a["name"] for a in newly_rejected(None, first["adapters"])] == ["v1"]
    assert newly_rejected(first["adapters"], first["adapters"]) == []  # the next pass: nothing new
    stricter = wanted([{"metric": "rougeL.delta", "min": 20}])
    second = derive_status(first, observed([stricter], replicas))
    assert [a["message"] for a in newly_rejected(first["adapters"], second["adapters"])] == [stricter.rejected]
    loaded_before = [{"name": "v1", "state": "Loaded", "loadedReplicas": 1}]
    assert len(newly_rejected(loaded_before, first["adapters"])) == 1
    assert newly_rejected([{"name": "v1", "state": "Loaded"}], [{"name": "v1", "state": "Loaded"}]) == []

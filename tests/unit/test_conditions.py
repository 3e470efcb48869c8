"""Conditions the Kubernetes way: lastTransitionTime moves only when status flips, every write
carries observedGeneration, phase is a summary of the conditions, and flips become Events."""

from datetime import UTC, datetime, timedelta

import pytest

from kubetune_operator import conditions as c

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def test_a_new_condition_gets_every_field():
    [cond] = c.set_condition([], c.ADMITTED, c.TRUE, "Admitted", "plan ok", 3, T0)
    assert cond == {
        "type": "Admitted", "status": "True", "reason": "Admitted", "message": "plan ok",
        "observedGeneration": 3, "lastTransitionTime": "2026-01-02T03:04:05Z",
    }  # fmt: skip


def test_last_transition_time_is_kept_while_status_stays():
    first = c.set_condition([], c.RUNNING, c.TRUE, "PodsRunning", "1/1 pods running", 1, T0)
    again = c.set_condition(first, c.RUNNING, c.TRUE, "PodsRunning", "1/1 pods running; metrics late", 2, T1)
    assert again[0]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert again[0]["message"].endswith("metrics late") and again[0]["observedGeneration"] == 2


def test_last_transition_time_moves_when_status_flips():
    first = c.set_condition([], c.RUNNING, c.TRUE, "PodsRunning", "", 1, T0)
    flipped = c.set_condition(first, c.RUNNING, c.FALSE, "Suspended", "", 1, T1)
    assert flipped[0]["lastTransitionTime"] == "2026-01-02T03:09:05Z"


def test_setting_the_same_condition_twice_is_a_no_op():
    once = c.set_condition([], c.SUSPENDED, c.TRUE, "Suspended", "stopped", 4, T0)
    assert c.set_condition(once, c.SUSPENDED, c.TRUE, "Suspended", "stopped", 4, T1) == once


def test_order_is_kept_and_input_not_modified():
    conds = c.set_condition([], c.ADMITTED, c.TRUE, "Admitted", "", 1, T0)
    conds = c.set_condition(conds, c.RUNNING, c.FALSE, "PodsPending", "", 1, T0)
    snapshot = [dict(x) for x in conds]
    updated = c.set_condition(conds, c.ADMITTED, c.TRUE, "Admitted", "new", 2, T1)
    assert [x["type"] for x in updated] == ["Admitted", "Running"]
    assert conds == snapshot


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("BackoffLimitExceeded", "BackoffLimitExceeded"),
        ("deadline exceeded", "DeadlineExceeded"),
        ("", "Unknown"),
        ("42-bad reason", "BadReason"),
    ],
)
def test_reasons_fit_the_crd_pattern(reason, expected):
    assert c.clean_reason(reason) == expected


def test_long_messages_are_clipped_to_the_crd_limit():
    [cond] = c.set_condition([], c.FAILED, c.TRUE, "Failed", "x" * 40000, 1, T0)
    assert len(cond["message"]) == c.MAX_MESSAGE and cond["message"].endswith("...")


def conds(**statuses):
    out = []
    for type_, status in statuses.items():
        out = c.set_condition(out, type_, status, "R", "", 1, T0)
    return out


@pytest.mark.parametrize(
    ("statuses", "phase"),
    [
        ({}, "Pending"),
        ({"Admitted": "True"}, "Admitted"),
        ({"Admitted": "True", "Running": "False"}, "Admitted"),
        ({"Admitted": "True", "Running": "True"}, "Running"),
        ({"Admitted": "True", "Running": "False", "Suspended": "True"}, "Suspended"),
        ({"Admitted": "True", "Running": "True", "Suspended": "False"}, "Running"),
        ({"Admitted": "True", "Running": "False", "Succeeded": "True"}, "Succeeded"),
        ({"Admitted": "False", "Failed": "True"}, "Failed"),
        ({"Admitted": "True", "Running": "False", "Failed": "True"}, "Failed"),
        ({"Admitted": "True", "Failed": "False"}, "Admitted"),
    ],
)
def test_phase_summarises_the_conditions(statuses, phase):
    assert c.phase_of(conds(**statuses)) == phase


def test_transitions_report_flips_and_new_true_conditions_only():
    before = conds(Admitted="True", Running="False")
    after = c.set_condition(before, c.RUNNING, c.TRUE, "PodsRunning", "1/1", 1, T1)
    after = c.set_condition(after, c.SUSPENDED, c.FALSE, "Resumed", "", 1, T1)  # new and False: not news
    assert [(t.type, t.status, t.reason) for t in c.transitions(before, after)] == [("Running", "True", "PodsRunning")]
    assert c.transitions(after, after) == []


def test_failed_and_refused_admission_are_warnings():
    refused = c.set_condition([], c.ADMITTED, c.FALSE, "InvalidSpec", "", 1, T0)
    refused = c.set_condition(refused, c.FAILED, c.TRUE, "InvalidSpec", "bad uri", 1, T0)
    [failed] = c.transitions([], refused)
    assert failed.type == "Failed" and failed.warning
    assert not c.Transition("Running", "True", "PodsRunning", "").warning


@pytest.mark.parametrize("stored", ["broken", 7, None, ["junk", 5, {"type": "Admitted"}], {"type": "Failed"}])
def test_conditions_edited_into_other_shapes_read_as_absent(stored):
    assert c.find(stored, c.FAILED) is None and not c.is_true(stored, c.ADMITTED) and not c.is_finished(stored)
    assert c.phase_of(stored) == c.PENDING
    updated = c.set_condition(stored, c.ADMITTED, c.TRUE, "Admitted", "ok", 1, T0)
    assert [x["type"] for x in updated if x.get("type") == c.ADMITTED] == [c.ADMITTED]
    assert c.transitions(stored, updated)[-1].type == c.ADMITTED

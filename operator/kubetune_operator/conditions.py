"""Conditions, the Kubernetes way: pure functions over the wire form (lists of dicts), for both kinds;
plus FineTuneJob's condition types and phase (AdapterDeployment's types are in its `status.py`).

Conditions are the truth about a FineTuneJob; `phase` only summarises them (for printer columns).
Each condition carries type/status/reason/message/observedGeneration/lastTransitionTime, and
lastTransitionTime changes only when `status` flips, so writing the same observation twice
changes nothing and the operator can skip the API call.
"""

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Condition types of a FineTuneJob.
ADMITTED = "Admitted"
RUNNING = "Running"
SUSPENDED = "Suspended"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
TYPES = (ADMITTED, RUNNING, SUSPENDED, SUCCEEDED, FAILED)

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"

# The kstatus conditions (sigs.k8s.io/cli-utils/pkg/kstatus), on both kinds, beside their own: what
# Flux, kpt and other kstatus readers look at. Ready: the object does what its spec asks;
# Reconciling: work is in flight and will end without anyone's help; Stalled: it will not get
# further until a person changes something. Each only restates the kind's own conditions, so a flip
# of one of them is no news of its own: no Event is posted for them (`writes.write_status`).
READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
KSTATUS_TYPES = (READY, RECONCILING, STALLED)

# Phases (the CRD's enum), in the order the summary checks them.
PENDING = "Pending"

MAX_MESSAGE = 32768  # the CRD's maxLength for a condition message
_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")

Conditions = list[dict[str, Any]]


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes metav1.Time."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def find(conditions: Conditions | None, type_: str) -> dict[str, Any] | None:
    """The condition of `type_`. The list is read back from a status anyone with access to the
    status subresource may have edited: what is not a list of mappings counts as no condition."""
    if not isinstance(conditions, list):
        return None
    for condition in conditions:
        if isinstance(condition, dict) and condition.get("type") == type_:
            return condition
    return None


def is_true(conditions: Conditions | None, type_: str) -> bool:
    condition = find(conditions, type_)
    return condition is not None and condition.get("status") == TRUE


def clean_reason(reason: str) -> str:
    """A reason the CRD's pattern accepts (Job reasons already are; anything else is squashed)."""
    if _REASON.match(reason or ""):
        return reason
    squashed = "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", reason or "") if part)
    squashed = squashed.lstrip("0123456789")
    return squashed or "Unknown"


def clip(message: str, limit: int = MAX_MESSAGE) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def set_condition(
    conditions: Conditions | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> Conditions:
    """A new list with `type_` set: its position kept (new types appended), lastTransitionTime kept
    unless the status flips. The input list is not modified."""
    previous = find(conditions, type_)
    unchanged = previous is not None and previous.get("status") == status and previous.get("lastTransitionTime")
    condition: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": clean_reason(reason),
        "message": clip(message),
        "lastTransitionTime": previous["lastTransitionTime"] if unchanged and previous is not None else timestamp(now),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    out = [dict(c) for c in conditions if isinstance(c, dict)] if isinstance(conditions, list) else []
    for index, existing in enumerate(out):
        if existing.get("type") == type_:
            out[index] = condition
            return out
    return out + [condition]


def phase_of(conditions: Conditions | None) -> str:
    """The summary: a finished job is Failed or Succeeded; otherwise Suspended, Running, Admitted
    (accepted, pods not yet running) or Pending (not yet looked at)."""
    for type_ in (FAILED, SUCCEEDED, SUSPENDED, RUNNING, ADMITTED):
        if is_true(conditions, type_):
            return type_
    return PENDING


def is_finished(conditions: Conditions | None) -> bool:
    return is_true(conditions, FAILED) or is_true(conditions, SUCCEEDED)


@dataclass(frozen=True)
class Transition:
    """A condition that appeared or whose status flipped: worth a Kubernetes Event."""

    type: str
    status: str
    reason: str
    message: str

    @property
    def warning(self) -> bool:
        return (self.type == FAILED and self.status == TRUE) or (self.type == ADMITTED and self.status == FALSE)


def transitions(before: Conditions | None, after: Conditions | None) -> list[Transition]:
    """Conditions of `after` that are new or flipped relative to `before`. A new condition that is
    False (Running=False while pods start) is not news; a flip to False is."""
    out = []
    for condition in after or []:
        if not isinstance(condition, dict) or "type" not in condition or "status" not in condition:
            continue
        old = find(before, condition["type"])
        if old is not None and old.get("status") == condition["status"]:
            continue
        if old is None and condition["status"] != TRUE:
            continue
        reason, message = condition.get("reason", ""), condition.get("message", "")
        out.append(Transition(condition["type"], condition["status"], reason, message))
    return out

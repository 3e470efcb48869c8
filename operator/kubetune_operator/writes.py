"""How the operator writes, the same way for both kinds: children by server-side apply (after making
sure the object of that name is theirs), status by a merge patch that carries the resourceVersion it
was derived from, and one Kubernetes Event per condition that flipped.
"""

import logging
from collections.abc import Callable
from typing import Any

import kopf

from . import conditions as c
from . import k8s, metrics
from .render_common import is_terminating, owned_by

log = logging.getLogger("kubetune.operator")


# --- children ------------------------------------------------------------------------------------


def existing_child(
    client: k8s.Client, obj: dict[str, Any], owner_uid: str | None, owner_kind: str
) -> dict[str, Any] | None:
    """The stored object of `obj`'s kind and name, None when there is none. An object of that name
    that is not the owner's (a deleted namesake's, being garbage-collected, or someone else's) is
    never taken over: kopf.TemporaryError, and the handler tries again later."""
    name = obj["metadata"]["name"]
    existing = client.get(k8s.object_path(obj, name))
    if existing is not None and (is_terminating(existing) or not owned_by(existing, owner_uid)):
        raise kopf.TemporaryError(
            f"{obj['kind']} {name} exists but is not this {owner_kind}'s (an earlier namesake's, being "
            "garbage-collected?); waiting for it to go",
            delay=3,
        )
    return existing


def apply_child(client: k8s.Client, obj: dict[str, Any], existing: dict[str, Any] | None) -> dict[str, Any]:
    """Server-side apply `obj` (as read before: `existing`, from `existing_child`); the stored object."""
    stored = client.apply(obj)
    meta = obj["metadata"]
    if existing is None:
        log.info("created %s %s/%s", obj["kind"], meta["namespace"], meta["name"])
    elif stored["metadata"].get("resourceVersion") != existing["metadata"].get("resourceVersion"):
        log.info("updated %s %s/%s", obj["kind"], meta["namespace"], meta["name"])
    return stored


def ensure_child(client: k8s.Client, obj: dict[str, Any], owner_uid: str | None, owner_kind: str) -> dict[str, Any]:
    """`existing_child`, then `apply_child`: the child as `obj` says, owned by its parent."""
    return apply_child(client, obj, existing_child(client, obj, owner_uid, owner_kind))


# --- status --------------------------------------------------------------------------------------


def merge_patch(before: Any, after: Any) -> Any:
    """The RFC 7386 merge patch that turns `before` into `after` (None when equal): changed keys,
    removed keys as null, lists replaced whole. `after` must not contain None values."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return None if before == after else after
    patch: dict[str, Any] = {}
    for key, value in after.items():
        if key not in before:
            patch[key] = value
        elif before[key] != value:
            patch[key] = merge_patch(before[key], value)
    for key in before:
        if key not in after:
            patch[key] = None
    return patch or None


def write_status(
    client: k8s.Client,
    body: dict[str, Any],
    desired: dict[str, Any],
    is_warning: Callable[[c.Transition], bool],
) -> bool:
    """Patch the status of `body` (a FineTuneJob or AdapterDeployment as read) to `desired` if it
    differs; post an Event per condition that flipped (none for Ready, Reconciling and Stalled, which
    restate the others). The patch names the resourceVersion the status was derived from:
    k8s.ApiError 409 when the object changed meanwhile."""
    current = body.get("status") or {}
    patch = merge_patch(current, desired)
    if patch is None:
        return False
    meta = body["metadata"]
    request = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": patch}
    client.merge_patch(k8s.kubetune_path(body["kind"], meta["namespace"], meta["name"]) + "/status", request)
    metrics.STATUS_WRITES.inc()
    for change in c.transitions(current.get("conditions"), desired.get("conditions")):
        if change.type in c.KSTATUS_TYPES:
            continue
        try:
            message = f"{change.type}={change.status}: {change.message}"
            kind = "Warning" if is_warning(change) else "Normal"
            client.post_event(body, kind, change.reason or change.type, message)
        except k8s.ApiError as error:  # an Event is a courtesy; never fail a reconcile over it
            log.warning("could not post an Event for %s: %s", meta["name"], error)
    return True

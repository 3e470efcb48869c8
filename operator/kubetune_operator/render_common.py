"""What the renderers of both kinds share: errors, owner references (made and read back), labels,
names, quantities, the restricted security contexts, the operator's allow-lists for images,
PriorityClasses and GPU resource names, and the pieces of NetworkPolicies.

Renderers are pure: a parsed object and the operator's configuration in, plain dicts out, the same
dicts for the same input. The reconcilers apply what comes out (`writes.apply_child`).
"""

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from kubetune.api.common import API_VERSION, Placement

from .config import OperatorConfig

MAX_DNS_LABEL = 63  # Service names, hostnames, label values, volume names
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # what a Service name must be

# Recommended labels (app.kubernetes.io/*) plus one of ours that selectors can rely on.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
APP = "kubetune"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
RUN_AS_USER = 1000
SYSTEM_PRIORITY_PREFIX = "system-"  # system-node-critical, system-cluster-critical: the cluster's own
# The operator's pods, as the chart labels them (the release's instance label aside: any release).
OPERATOR_POD_LABELS = {LABEL_NAME: APP, LABEL_COMPONENT: "operator"}
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace


class RenderError(ValueError):
    """The object cannot be turned into Kubernetes objects; the message says what to change.

    The handler reports it as a Failed condition rather than retrying: the same input would fail again.
    """


def _meta_get(meta: Any, key: str) -> Any:
    return meta.get(key) if isinstance(meta, Mapping) else getattr(meta, key, None)


def owner_reference(meta: Any, kind: str) -> dict[str, Any]:
    """The controller reference that makes Kubernetes garbage-collect a child with its kubetune
    parent. `meta` is the parent's metadata, a parsed ObjectMeta or the plain mapping kopf passes.
    The uid is required: a reference without it would point at whichever object later has the name."""
    name, uid = _meta_get(meta, "name"), _meta_get(meta, "uid")
    if not name or not uid:
        raise RenderError(f"{kind} metadata needs name and uid to own other objects (got name={name!r}, uid={uid!r})")
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def identity(meta: Any) -> tuple[str, str]:
    """(name, namespace) of a parsed object's metadata, as plain strings. The renderers call
    `check_renderable` first, which refuses an object without them."""
    return str(_meta_get(meta, "name") or ""), str(_meta_get(meta, "namespace") or "")


def owned_by(obj: Mapping[str, Any], uid: str | None) -> bool:
    """Whether `obj` is controlled by the object with `uid` (not a namesake left by a deleted one)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return bool(uid) and any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def is_terminating(obj: Mapping[str, Any]) -> bool:
    """Whether `obj` is being deleted (it has a deletionTimestamp)."""
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def standard_labels(instance: str, component: str) -> dict[str, str]:
    return {
        LABEL_NAME: APP,
        LABEL_COMPONENT: component,
        LABEL_INSTANCE: instance,
        LABEL_MANAGED_BY: APP,
    }


def object_meta(
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    owner: dict[str, Any],
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": dict(labels),
        "ownerReferences": [dict(owner)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def short_hash(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def dns_label(prefix: str, name: str) -> str:
    """`prefix-name` when that is a valid DNS label (volume names must be), else a readable,
    deterministic stand-in: the sanitised name cut short, plus a hash of the original."""
    candidate = f"{prefix}-{name}"
    if len(candidate) <= MAX_DNS_LABEL and re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", candidate):
        return candidate
    digest = short_hash(name)
    room = MAX_DNS_LABEL - len(prefix) - len(digest) - 2
    readable = re.sub(r"[^a-z0-9-]", "-", name.lower())[:room].strip("-")
    return f"{prefix}-{readable}-{digest}" if readable else f"{prefix}-{digest}"


def quantity(value: int | str) -> str:
    """Quantities as strings, whichever type the spec's YAML gave (cpu: 2 or cpu: "2"), so the
    rendered objects have one shape."""
    return str(value)


def container_resources(placement: Placement, gpus: int, config: OperatorConfig) -> dict[str, Any]:
    """cpu and memory from the spec are requests = limits (predictable, and what Kueue counts);
    unset ones get the operator's default request only. GPUs are whole devices: request = limit."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    wanted = (("cpu", placement.cpu, config.default_cpu), ("memory", placement.memory, config.default_memory))
    for key, value, default in wanted:
        if value is not None:
            requests[key] = limits[key] = quantity(value)
        elif default:
            requests[key] = default
    if gpus:
        requests[placement.gpu_resource] = limits[placement.gpu_resource] = str(gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def pod_security_context() -> dict[str, Any]:
    """fsGroup makes the output claim writable for the non-root user; OnRootMismatch avoids a
    recursive chown of a large model claim at every start."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """The restricted Pod Security profile, plus a read-only root filesystem."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


# --- the operator's allow-lists ------------------------------------------------------------------

IMAGES_SETTING = "helm value config.allowedImages (KUBETUNE_OPERATOR_ALLOWED_IMAGES)"
PRIORITY_SETTING = "helm value config.allowedPriorityClasses (KUBETUNE_OPERATOR_ALLOWED_PRIORITY_CLASSES)"
GPU_RESOURCES_SETTING = "helm value config.gpuResources (KUBETUNE_OPERATOR_GPU_RESOURCES)"


def image_allowed(image: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `image` starts with one of `prefixes` at a boundary: prefix `reg/x/trainer` allows
    `reg/x/trainer:1`, `reg/x/trainer@sha256:...` and `reg/x/trainer/y`, never `reg/x/trainer-evil`."""
    for prefix in prefixes:
        if prefix == "*" or image == prefix:
            return True
        if prefix and image.startswith(prefix) and (prefix[-1] in "/:@" or image[len(prefix)] in "/:@"):
            return True
    return False


def image_problem(image: str | None, config: OperatorConfig) -> str | None:
    """Why a workload may not use `image` (one line, naming the setting that governs it), or None.
    No image means the operator's own, which is always allowed."""
    if not image or image in (config.trainer_image, config.serving_image):
        return None
    allowed = config.image_allow_list
    if image_allowed(image, allowed):
        return None
    shown = repr(image[:200])
    return f"image {shown} is not allowed by the operator: it must start with one of {list(allowed)} ({IMAGES_SETTING})"


def priority_class_problem(name: str | None, config: OperatorConfig) -> str | None:
    """Why a workload may not use PriorityClass `name`, or None. With no list set, any class but
    the `system-` ones (which may preempt the cluster's own components) is allowed."""
    if not name:
        return None
    allowed = config.allowed_priority_classes
    if allowed:
        if name in allowed:
            return None
        listed = list(allowed)
        return f"priorityClassName {name!r} is not allowed by the operator: use one of {listed} ({PRIORITY_SETTING})"
    if name.startswith(SYSTEM_PRIORITY_PREFIX):
        return (
            f"priorityClassName {name!r} is not allowed by the operator: {SYSTEM_PRIORITY_PREFIX}* classes are "
            f"reserved for the cluster's own components unless listed in {PRIORITY_SETTING}"
        )
    return None


def gpu_resource_problem(resource: str, gpus: int, config: OperatorConfig) -> str | None:
    """Why a workload may not request `gpus` GPUs as extended resource `resource`, or None.

    Only a workload that requests GPUs is checked: one with none requests no extended resource,
    whatever its (defaulted) gpuResource says. A name outside `config.gpu_resources` would leave the
    pods Pending with "Insufficient <name>" on every node, or take accelerators the cluster's owner
    has not opened to workloads; the refusal names the setting that lists them."""
    if gpus <= 0 or resource in config.gpu_resources:
        return None
    shown = repr(resource[:100])
    return (
        f"spec.resources.gpuResource {shown} is not allowed by the operator: request GPUs as one of "
        f"{list(config.gpu_resources)} ({GPU_RESOURCES_SETTING})"
    )


# --- NetworkPolicy pieces ------------------------------------------------------------------------


def metrics_peers(config: OperatorConfig) -> list[dict[str, Any]]:
    """Who may reach a workload's metrics: the operator (it scrapes rank 0 for status) and the
    configured scrapers (`metricsScrapers`: the cluster's Prometheus, for the chart's PodMonitors)."""
    return [operator_peer(config), *(dict(peer) for peer in config.metrics_scrapers)]


def operator_peer(config: OperatorConfig) -> dict[str, Any]:
    """The operator's pods as a NetworkPolicy peer: by their labels, in the operator's namespace
    (`KUBETUNE_OPERATOR_NAMESPACE`, set by the chart), or in any namespace when that is unknown."""
    namespaces: dict[str, Any] = {}
    if config.operator_namespace:
        namespaces = {"matchLabels": {NAMESPACE_NAME_LABEL: config.operator_namespace}}
    return {"namespaceSelector": namespaces, "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)}}

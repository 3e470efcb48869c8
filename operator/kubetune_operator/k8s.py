"""The operator's one Kubernetes API client: thin, dict in and dict out, over the official client's
connection handling.

The renderers produce plain dicts and the status logic reads plain dicts, so the operator talks
to the API in dicts too: one `request` with explicit paths and content types, no generated models.
Every child object of both kinds is written with `apply` (server-side apply); status with
`merge_patch`. Credentials come from the service account in a pod, else the kubeconfig named by
KUBECONFIG (read when called, not at import), else ~/.kube/config; kopf logs in with the very same
credentials.
"""

import json
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import kubernetes
from kubernetes.client.exceptions import ApiException
from kubernetes.config import ConfigException

from kubetune.api.common import API_VERSION
from kubetune.api.kinds import BY_KIND

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # server-side apply (JSON is YAML)
COMPONENT = "kubetune-operator"
FIELD_MANAGER = COMPONENT  # owner of the fields the operator applies (metadata.managedFields)
TIMEOUT = (5, 30)  # connect, read (seconds)
# Connections kept open to the API server: one per thread that may call at once (kopf's handler
# threads and the runner's). The client's default (5 x CPUs) makes a busy operator on 2 cores drop
# connections and pay a TLS handshake for each new one.
POOL_SIZE = 32


class ApiError(RuntimeError):
    """A non-2xx answer: `status` is the HTTP code, `reason` the API's Status reason."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


def load_configuration() -> kubernetes.client.Configuration:
    """In-cluster service account first, then the kubeconfig; ConfigException when neither works."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except ConfigException:
        path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        first = path.split(os.pathsep)[0]
        kubernetes.config.load_kube_config(config_file=first, client_configuration=configuration, persist_config=False)
    return configuration


# --- paths ---------------------------------------------------------------------------------------


# Plural resource names of the built-in kinds the operator reads or writes, and of kubetune's own.
PLURALS = {
    "ConfigMap": "configmaps", "Service": "services", "Pod": "pods", "Event": "events", "Job": "jobs",
    "Deployment": "deployments", "Secret": "secrets", "NetworkPolicy": "networkpolicies",
    **{info.kind: info.plural for info in BY_KIND.values()},
}  # fmt: skip


def resource_path(api_version: str, kind: str, namespace: str, name: str = "") -> str:
    """The REST path of `kind`'s objects in `namespace` (+ one of them by name)."""
    prefix = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    base = f"{prefix}/namespaces/{quote(namespace)}/{PLURALS[kind]}"
    return f"{base}/{quote(name)}" if name else base


def object_path(obj: dict[str, Any], name: str | None = None) -> str:
    """The REST path of a rendered object's kind in its namespace (+ its name)."""
    return resource_path(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"], name or "")


def kubetune_path(kind: str, namespace: str, name: str = "") -> str:
    """The REST path of one of kubetune's kinds (FineTuneJob, AdapterDeployment)."""
    return resource_path(API_VERSION, kind, namespace, name)


def pods_path(namespace: str) -> str:
    return resource_path("v1", "Pod", namespace)


EVENTS_LIMIT = 100  # Events read about one object: the API aggregates repeats, and keeps them an hour


def events_path(namespace: str, kind: str, name: str, limit: int = EVENTS_LIMIT) -> str:
    """The REST path, query included, of the core/v1 Events about one object (what `kubectl
    events --for kind/name` shows), at most `limit` of them; `Client.list` sends it as it is."""
    selector = f"involvedObject.kind={kind},involvedObject.name={name}"
    return f"{resource_path('v1', 'Event', namespace)}?{urlencode({'fieldSelector': selector, 'limit': limit})}"


# --- the client ----------------------------------------------------------------------------------


@dataclass
class Client:
    configuration: kubernetes.client.Configuration

    def __post_init__(self) -> None:
        self.configuration.connection_pool_maxsize = max(self.configuration.connection_pool_maxsize or 0, POOL_SIZE)
        self.api = kubernetes.client.ApiClient(self.configuration)

    @classmethod
    def from_environment(cls) -> "Client":
        return cls(load_configuration())

    def close(self) -> None:
        self.api.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        token = bearer(self.configuration)
        if token:
            headers["Authorization"] = token
        try:
            response = self.api.call_api(
                path, method, query_params=list((query or {}).items()), header_params=headers, body=body,
                auth_settings=[], _preload_content=False, _request_timeout=TIMEOUT, _return_http_data_only=True,
            )  # fmt: skip
        except ApiException as error:
            raise _api_error(error) from None
        data = response.data
        return json.loads(data) if data else {}

    def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def list(self, path: str, label_selector: str = "") -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else None
        return self.request("GET", path, query=query).get("items") or []

    def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body, content_type=MERGE_PATCH)

    def apply(self, obj: dict[str, Any], field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply of a whole rendered object: created when absent, else brought to what
        `obj` says, fields it no longer sets removed (when this manager alone set them). `force`:
        the operator's word wins over another manager's on the fields it sets. Returns the object
        as stored (status included)."""
        query = {"fieldManager": field_manager, "force": "true"}
        return self.request("PATCH", object_path(obj, obj["metadata"]["name"]), obj, query, APPLY_PATCH)

    def delete(self, path: str, propagation: str = "Background", uid: str | None = None) -> bool:
        """False when already gone. `uid` makes it a precondition (never delete a newer namesake)."""
        options: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", path, options)
            return True
        except ApiError as error:
            if error.status == 404:
                return False
            raise

    def post_event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about `involved` (what `kubectl describe` and `kubectl events` show)."""
        meta = involved["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {k: v for k, v in {
                "apiVersion": involved["apiVersion"], "kind": involved["kind"], "name": meta["name"],
                "namespace": meta["namespace"], "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion"),
            }.items() if v},
            "type": type_, "reason": reason, "message": message[:1024],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "source": {"component": COMPONENT, "host": socket.gethostname()},
            "reportingComponent": COMPONENT, "reportingInstance": socket.gethostname()[:128],
        }  # fmt: skip
        self.request("POST", resource_path("v1", "Event", meta["namespace"]), event)


def _api_error(error: ApiException) -> ApiError:
    reason, message = error.reason or "", error.body or ""
    try:
        body = json.loads(error.body or "")
        reason, message = body.get("reason") or reason, body.get("message") or message
    except (TypeError, ValueError):
        pass
    return ApiError(int(error.status or 0), str(reason), str(message))


def bearer(configuration: kubernetes.client.Configuration) -> str | None:
    """The Authorization header value ("Bearer <token>") for token-based credentials. The loaders
    of kubernetes 36.0.0 store it under "authorization" while the client's own auth settings only
    look at "BearerToken" (fixed in 36.0.1), so both are read here; reading calls the
    configuration's refresh hook, which re-reads an expiring service-account token."""
    return configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )


def connection_info(configuration: kubernetes.client.Configuration) -> dict[str, Any]:
    """Keyword arguments for kopf.ConnectionInfo from the client's configuration."""
    header = bearer(configuration)
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return {
        "server": configuration.host,
        "ca_path": configuration.ssl_ca_cert,
        "insecure": not configuration.verify_ssl,
        "username": configuration.username or None,
        "password": configuration.password or None,
        "scheme": scheme,
        "token": token,
        "certificate_path": configuration.cert_file,
        "private_key_path": configuration.key_file,
    }

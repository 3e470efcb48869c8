"""The operator's client of serving replicas: what adapters a replica has loaded (`GET /v1/models`),
and loading and unloading one (`POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`). Both
runtimes (the builtin server and vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) speak this API.

A replica runs whatever image and adapters the AdapterDeployment's author chose, so it is not
trusted to answer well: every call goes through `bounded_http` (a total deadline, a body cap, no
redirects) and carries the AdapterDeployment's admin key (`keys.py`). Loads may take long (the
runtime downloads and reads the weights): their deadline is the configuration's
`adapter_load_timeout_seconds` (default LOAD_DEADLINE). The runtime answers 200 when the adapter is
loaded, 202 when the load was accepted and goes on in the background: the next pass sees it in
/v1/models, or asks again and gets the outcome.

What an answer means for the adapter (`outcome`), decided here so that the reconciler only records it:
- LOADED (200), ACCEPTED (202);
- REFUSED: a 4xx that asking again cannot change (400, 413, 422: not a LoRA adapter or a rank too
  large, ...). The adapter is Failed with the runtime's words and not asked for again until the
  spec or its URI changes;
- CONFLICT: 409 (or vLLM's 400 "has already been loaded"), an adapter of that name is loaded:
  unload it and load again once; a second conflict is one an unload cannot fix, a refusal;
- NOT_FOUND: 404, the source is missing or not allowed (the runtime does not say which). A replica
  that started before the source was declared has an older allow-list and gets the adapter from
  the adapters file once the kubelet refreshes it, so a 404 is a refusal only when it has lasted
  NOT_FOUND_GRACE seconds;
- TRANSIENT: 401/403 (the replica has not yet read a new key), 408, 429 (too many loads at once),
  503 (base model still loading), 504 (load timed out), other 5xx, and no answer at all: asked again
  next pass. A 5xx other than 503 and 504 that repeats SERVER_ERROR_LIMIT times for the same
  adapter and URI on a replica is a refusal too: a runtime that fails on an adapter's content with
  a 500 would otherwise be asked for ever.
"""

from typing import Any

from ..bounded_http import BoundedResponse, HttpError, request, short
from ..keys import authorization

QUERY_DEADLINE = 10.0  # /v1/models and unloads
LOAD_DEADLINE = 120.0  # a load downloads and reads the adapter's weights
MAX_BODY = 1 << 20  # 1 MiB: a /v1/models answer of 256 adapters is a few tens of KiB
SERVER_ERROR_LIMIT = 5
NOT_FOUND_GRACE = 180.0  # seconds: the kubelet's refresh of a mounted ConfigMap, with room to spare

LOADED, ACCEPTED, REFUSED, CONFLICT, NOT_FOUND, TRANSIENT = (
    "loaded", "accepted", "refused", "conflict", "not-found", "transient"
)  # fmt: skip
TRANSIENT_STATUSES = frozenset({401, 403, 408, 425, 429})


class ReplicaError(RuntimeError):
    """The replica could not be asked, or its answer was not what the API promises."""


def error_message(response: BoundedResponse) -> str:
    """The runtime's own words from an error answer, one line: OpenAI's {"error": {"message"}},
    vLLM's {"message"}, or the body as text."""
    try:
        body = response.json()
    except ValueError:
        return short(response.text.strip() or f"HTTP {response.status}")
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and inner.get("message"):
            return short(inner["message"])
        if body.get("message"):
            return short(body["message"])
        if isinstance(body.get("detail"), str):
            return short(body["detail"])
    return short(body)


def outcome(status: int, message: str = "") -> str:
    """What an answer to a load means (see the module's docstring). vLLM says "already loaded" with a
    400 ("The lora adapter 'x' has already been loaded."), which is the same conflict as a 409."""
    if status == 200 or status == 201 or status == 204:
        return LOADED
    if status == 202:
        return ACCEPTED
    if status == 409 or (status == 400 and "has already been loaded" in message):
        return CONFLICT
    if status == 404:
        return NOT_FOUND
    if 400 <= status < 500 and status not in TRANSIENT_STATUSES:
        return REFUSED
    return TRANSIENT


def counts_as_server_error(status: int) -> bool:
    """A 5xx that says something about the adapter (not 503: the base model still loading; not 504:
    the load took too long, which may go better next time)."""
    return 500 <= status < 600 and status not in (503, 504)


class ReplicaClient:
    """Calls to replicas with one admin key (that of the AdapterDeployment they belong to)."""

    def __init__(self, admin_key: str, load_deadline: float = LOAD_DEADLINE, query_deadline: float = QUERY_DEADLINE):
        self.headers = authorization(admin_key)
        self.load_deadline, self.query_deadline = load_deadline, query_deadline

    def models(self, url: str) -> dict[str, Any]:
        """The replica's /v1/models answer; ReplicaError when it cannot be had."""
        try:
            response = request(
                "GET", f"{url}/v1/models", deadline=self.query_deadline, max_bytes=MAX_BODY, headers=self.headers
            )
        except HttpError as error:
            raise ReplicaError(str(error)) from None
        if response.status != 200:
            raise ReplicaError(f"HTTP {response.status}: {error_message(response)}")
        try:
            models = response.json()
        except ValueError:
            raise ReplicaError("/v1/models did not answer JSON") from None
        if not isinstance(models, dict):
            raise ReplicaError(f"/v1/models answered {type(models).__name__}, not an object")
        return models

    def load(self, url: str, adapter: str, path: str) -> BoundedResponse:
        """Ask the replica to load `adapter` from `path`; ReplicaError when it did not answer."""
        return self._post(f"{url}/v1/load_lora_adapter", {"lora_name": adapter, "lora_path": path}, self.load_deadline)

    def unload(self, url: str, adapter: str) -> BoundedResponse:
        return self._post(f"{url}/v1/unload_lora_adapter", {"lora_name": adapter}, self.query_deadline)

    def _post(self, url: str, body: dict[str, str], deadline: float) -> BoundedResponse:
        try:
            return request("POST", url, deadline=deadline, max_bytes=MAX_BODY, headers=self.headers, json=body)
        except HttpError as error:
            raise ReplicaError(str(error)) from None

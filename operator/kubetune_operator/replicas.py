"""The HTTP client of serving replicas: what adapters a replica has loaded (`GET /v1/models`), and
loading and unloading one (`POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`). Both runtimes
(the builtin server and vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) speak this API; their
readiness (`/health`) is the pods' readiness probe, which the operator reads from the pod.

Only this module talks HTTP to replicas; what to ask and what the answers mean is decided in
`adapterdeployment.adapters`.
"""

from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

QUERY_TIMEOUT = 5.0
LOAD_TIMEOUT = 120.0  # a load downloads and reads the adapter's weights


class ReplicaError(RuntimeError):
    """The replica could not be reached, or its answer was not what the API promises."""


@dataclass(frozen=True)
class Answer:
    """A replica's answer to a load or unload: the HTTP status and, when it refused, its message."""

    status: int
    message: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def error_message(response: httpx.Response) -> str:
    """The runtime's own words from an error answer: OpenAI's {"error": {"message"}}, vLLM's
    {"message"}, or the body as text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:2000] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return str(body)[:2000]


class ReplicaClient:
    """One HTTP connection pool for a round of talking to replicas (a context manager)."""

    def __init__(self, query_timeout: float = QUERY_TIMEOUT, load_timeout: float = LOAD_TIMEOUT) -> None:
        self.http = httpx.Client()
        self.query_timeout, self.load_timeout = query_timeout, load_timeout

    def __enter__(self) -> "ReplicaClient":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def models(self, url: str) -> dict[str, Any]:
        """The replica's /v1/models answer; ReplicaError when it cannot be had."""
        try:
            response = self.http.get(f"{url}/v1/models", timeout=self.query_timeout)
            response.raise_for_status()
            models = response.json()
        except (httpx.HTTPError, ValueError) as error:
            raise ReplicaError(str(error)) from None
        if not isinstance(models, dict):
            raise ReplicaError(f"/v1/models answered {type(models).__name__}, not an object")
        return models

    def load(self, url: str, adapter: str, path: str) -> Answer:
        """Ask the replica to load `adapter` from `path`; ReplicaError when it cannot be asked."""
        return self._post(f"{url}/v1/load_lora_adapter", {"lora_name": adapter, "lora_path": path})

    def unload(self, url: str, adapter: str) -> Answer:
        return self._post(f"{url}/v1/unload_lora_adapter", {"lora_name": adapter})

    def _post(self, url: str, body: dict[str, str]) -> Answer:
        try:
            response = self.http.post(url, json=body, timeout=self.load_timeout)
        except httpx.HTTPError as error:
            raise ReplicaError(str(error)) from None
        return Answer(response.status_code, "" if response.is_success else error_message(response))

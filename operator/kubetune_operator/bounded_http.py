"""HTTP requests with a total deadline and a body-size cap: the operator's only way to talk to pods.

The pods the operator talks to (rank 0's metrics endpoint, serving replicas) run code and data that
whoever may create a FineTuneJob or an AdapterDeployment controls. A per-read timeout alone lets
such a pod hold a reconcile thread for ever by sending one byte just before each timeout, and a
plain `response.text` lets it fill the operator's memory. So every exchange here has:

- a total deadline, wall clock, for the whole exchange: connecting, sending, the status line and
  headers, and the body. It is enforced below the HTTP layer, on every socket read and write (each
  gets at most the time left, and none starts once it is spent), so a server dripping one byte at
  a time, in the headers or the body, is cut off at the deadline, not at the next chunk;
- a cap on the body: a Content-Length above it is refused before the body is read, and reading
  stops at the first chunk past it, so memory stays within `max_bytes` plus one read (64 KiB);
  the status line and headers are capped by h11 (100 KiB);
- no redirects (a 3xx is returned as it is: the caller decides), no proxies or certificates from
  the environment, a fresh connection per request (nothing shared between threads).

Built on httpcore, httpx's own transport layer, because its network backend is the one place
where every read and write can be given the time left. One thing is outside the deadline: name
resolution (getaddrinfo cannot be interrupted). The operator calls pod IPs, which need none.

Sync: reconciles run in threads.
"""

import json as jsonlib
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpcore

READ_CHUNK = 64 * 1024
REASON_LIMIT = 300  # characters of a reason, for a condition message


class HttpError(RuntimeError):
    """The exchange did not complete: cannot connect, deadline exceeded, body over the cap, or not HTTP."""


@dataclass(frozen=True)
class BoundedResponse:
    """A complete answer: the status, the headers (names in lower case; a repeated header's values
    joined by ', ') and the whole body."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return jsonlib.loads(self.body)


class _Deadline:
    """The time left until a fixed instant on the monotonic clock."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self, kind: type[Exception]) -> float:
        """Seconds left; `kind` (an httpcore timeout) when none are."""
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise kind(f"deadline of {self.seconds:g}s exceeded")
        return remaining


def _bounded(timeout: float | None, left: float) -> float:
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every read and write gets at most the time left."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self.inner, self.deadline = inner, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, _bounded(timeout, self.deadline.left(httpcore.ReadTimeout)))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, _bounded(timeout, self.deadline.left(httpcore.WriteTimeout)))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        left = _bounded(timeout, self.deadline.left(httpcore.ConnectTimeout))
        return _DeadlineStream(self.inner.start_tls(ssl_context, server_hostname, left), self.deadline)

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """Plain sockets (httpcore's SyncBackend) under one deadline."""

    def __init__(self, deadline: _Deadline) -> None:
        self.inner, self.deadline = httpcore.SyncBackend(), deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        left = _bounded(timeout, self.deadline.left(httpcore.ConnectTimeout))
        stream = self.inner.connect_tcp(host, port, left, local_address, socket_options)
        return _DeadlineStream(stream, self.deadline)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not used")

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.deadline.left(httpcore.PoolTimeout)))


_FAILURES = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    httpcore.ProxyError,
    OSError,
    ValueError,  # a URL that does not parse
)


def short(reason: object) -> str:
    """One line, at most REASON_LIMIT characters."""
    text = " ".join(str(reason).split())
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 1] + "…"


def _failure(error: BaseException, deadline: _Deadline) -> str:
    if isinstance(error, httpcore.TimeoutException):
        return f"no complete answer within {deadline.seconds:g}s ({type(error).__name__})"
    return f"{type(error).__name__}: {short(error) or 'connection failed'}"


def _content_length(headers: Mapping[str, str]) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in raw:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


def request(
    method: str,
    url: str,
    *,
    deadline: float,
    max_bytes: int,
    headers: Mapping[str, str] | None = None,
    json: Any = None,
) -> BoundedResponse:
    """One HTTP exchange completed within `deadline` seconds with a body of at most `max_bytes`;
    HttpError with a short reason otherwise. Any status is returned (redirects are not followed)."""
    if deadline <= 0 or max_bytes < 0:
        raise ValueError("deadline must be > 0 and max_bytes >= 0")
    limit = _Deadline(deadline)
    sent = {"accept-encoding": "identity", **{k.lower(): v for k, v in (headers or {}).items()}}
    content = b""
    if json is not None:
        content = jsonlib.dumps(json, separators=(",", ":")).encode()
        sent.setdefault("content-type", "application/json")
    timeouts = {"connect": deadline, "read": deadline, "write": deadline, "pool": deadline}
    try:
        with httpcore.ConnectionPool(network_backend=_DeadlineBackend(limit), max_connections=1) as pool:
            with pool.stream(
                method.upper(),
                url,
                headers=list(sent.items()),
                content=content if content or method.upper() in ("POST", "PUT", "PATCH") else None,
                extensions={"timeout": timeouts},
            ) as response:
                got = _headers(response.headers)
                length = _content_length(got)
                if length is not None and length > max_bytes:
                    raise HttpError(f"HTTP {response.status}: body of {length} bytes is over the {max_bytes}-byte cap")
                body = bytearray()
                for chunk in response.iter_stream():
                    body += chunk
                    if len(body) > max_bytes:
                        raise HttpError(f"HTTP {response.status}: body over the {max_bytes}-byte cap")
                    limit.left(httpcore.ReadTimeout)
                return BoundedResponse(response.status, got, bytes(body))
    except _FAILURES as error:
        raise HttpError(_failure(error, limit)) from None

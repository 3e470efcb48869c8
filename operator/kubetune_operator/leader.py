"""Leader election on a coordination.k8s.io/v1 Lease, the way client-go's leaderelection does it,
so that two (or more) operator replicas never reconcile at the same time and a standby takes over
when the leader dies.

Why a Lease and not kopf's peering: peering makes every operator *pause* while a higher-priority
peer is alive; it never picks one, and two operators of equal priority both pause. A Lease is the
object Kubernetes itself elects with (kube-controller-manager, kube-scheduler): one holder, a
duration, a renew time, and the API server's optimistic concurrency (a write carries the
resourceVersion it read; a 409 means another candidate wrote first and won).

The rules, as client-go's:

* a candidate takes the Lease when there is none (create), when its holder is empty (released), or
  when the record has not changed for `leaseDurationSeconds` as measured on the candidate's *own*
  monotonic clock since it first saw that record: nothing compares clocks across machines, so a
  skewed node neither steals a live lease nor keeps a dead one;
* the leader renews every retry period; if it has not renewed for the renew deadline (shorter than
  the lease) it stops at once: the process exits hard (`LOST_LEASE_EXIT`) and the Deployment
  restarts it as a standby. The leader's deadline runs from *before* its last successful write,
  and a standby's expiry from *after* it saw that write, so the old leader has stopped (lease -
  renew deadline seconds) before anyone else may start: never two leaders;
* on a clean shutdown the leader releases the Lease (holder cleared, duration 1 s) so a standby
  takes over at its next retry instead of waiting out the lease.

The decisions are pure functions of (the Lease as read, what was seen before, now, my identity),
unit-tested with a fake clock; `Elector` is the thin loop that reads and writes the Lease through
an API of three calls (`LeaseApi`; `KubeLeaseApi` is the real one over `k8s.Client.request`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlsplit

from urllib3.exceptions import HTTPError as TransportError

from . import metrics

log = logging.getLogger("kubetune.operator.leader")
log.setLevel(logging.INFO)  # transitions are always logged, whatever kopf's verbosity

LEASE_API = "coordination.k8s.io/v1"
LOST_LEASE_EXIT = 3  # the process's exit code when it stops because it could not keep the Lease
DEFAULT_LEASE_NAME = "kubetune-operator"
IDENTITY_MAX = 200  # of the pod name or host name part; the suffix comes on top
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
JITTER = 1.2  # client-go's JitterFactor: the renew deadline must leave room for this many retries


# --- timing and identity -------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """client-go's defaults: a Lease lasts 15 s, the leader gives up after 10 s without a renewal,
    every candidate tries every 2 s."""

    lease_duration: int = 15
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def check(self) -> Timing:
        """The same rules as client-go's NewLeaderElector, as one clear line each: the leader must
        give up before its lease runs out, and must get more than one try before it gives up."""
        if self.lease_duration < 1 or self.renew_deadline <= 0 or self.retry_period <= 0:
            raise ValueError("--leader-elect-lease-duration, -renew-deadline and -retry-period must be positive")
        if self.lease_duration <= self.renew_deadline:
            raise ValueError(
                f"--leader-elect-lease-duration ({self.lease_duration}s) must be longer than "
                f"--leader-elect-renew-deadline ({self.renew_deadline:g}s)"
            )
        if self.renew_deadline <= JITTER * self.retry_period:
            raise ValueError(
                f"--leader-elect-renew-deadline ({self.renew_deadline:g}s) must be longer than {JITTER:g} x "
                f"--leader-elect-retry-period ({self.retry_period:g}s)"
            )
        return self


def check_lease_name(namespace: str, name: str) -> None:
    """A Lease's name is a DNS subdomain, its namespace a DNS label: say so before the API does."""
    if not (len(name) <= 253 and _NAME.match(name)):
        raise ValueError(f"--leader-elect-lease {name!r} is not a valid object name (lower case, digits, '-', '.')")
    if not (len(namespace) <= 63 and _LABEL.match(namespace)):
        raise ValueError(f"--leader-elect-namespace {namespace!r} is not a valid namespace name")


def make_identity(environ: dict[str, str] | os._Environ[str], hostname: str, suffix: str) -> str:
    """$POD_NAME (the Downward API), else the host name, plus a random suffix: two processes on one
    host differ, and a container restarted in the same pod is a new candidate, never mistaken for
    the leader its previous incarnation was."""
    base = (environ.get("POD_NAME") or hostname or "kubetune-operator")[:IDENTITY_MAX]
    return f"{base}_{suffix}"


def new_identity() -> str:
    return make_identity(os.environ, socket.gethostname(), secrets.token_hex(4))


def lease_namespace(explicit: str | None, environ: dict[str, str] | os._Environ[str]) -> str:
    """--leader-elect-namespace, else the operator's own namespace (the chart sets it), else default."""
    return explicit or environ.get("KUBETUNE_OPERATOR_NAMESPACE") or "default"


# --- the record and the decisions (pure) ---------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """What a Lease's spec says: the election record. Read leniently (a Lease is written by others)."""

    holder: str
    duration: int
    acquire_time: str | None
    renew_time: str | None
    transitions: int


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def record_of(lease: dict[str, Any] | None, default_duration: int) -> Record | None:
    """The Lease's record (None: there is no Lease). A missing or nonsensical duration counts as
    our own: a candidate never takes a lease sooner because its holder wrote garbage."""
    if lease is None:
        return None
    spec = lease.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    holder = spec.get("holderIdentity")
    duration = _int(spec.get("leaseDurationSeconds"), 0) or default_duration
    acquire, renew = spec.get("acquireTime"), spec.get("renewTime")
    return Record(
        holder=holder if isinstance(holder, str) else "",
        duration=duration,
        acquire_time=acquire if isinstance(acquire, str) else None,
        renew_time=renew if isinstance(renew, str) else None,
        transitions=_int(spec.get("leaseTransitions"), 0),
    )


@dataclass(frozen=True)
class Observation:
    """A record, and when (this candidate's monotonic clock) it was first seen as it is."""

    record: Record
    at: float


def observe(previous: Observation | None, record: Record | None, now: float) -> Observation | None:
    """The record as seen now: its first-seen time stays while it does not change (a holder that
    stopped renewing), and restarts when it does (any renewal, by anyone)."""
    if record is None:
        return None
    if previous is not None and previous.record == record:
        return previous
    return Observation(record, now)


def expired(observation: Observation, now: float) -> bool:
    """True once the record has stood unchanged for its duration on our clock. A renewTime in the
    record is never compared with our clock: the holder's clock may be skewed."""
    return now >= observation.at + observation.record.duration


Action = Literal["create", "acquire", "renew", "wait"]


@dataclass(frozen=True)
class Decision:
    action: Action
    holder: str  # who holds the Lease if the write succeeds (for "wait": the other holder)
    spec: dict[str, Any] = field(default_factory=dict)  # the Lease spec to write; {} for "wait"


def stamp(now: datetime) -> str:
    """A Lease's MicroTime: RFC 3339 with microseconds, UTC."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_spec(holder: str, duration: int, acquired: str | None, renewed: str, transitions: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "holderIdentity": holder,
        "leaseDurationSeconds": duration,
        "renewTime": renewed,
        "leaseTransitions": transitions,
    }
    if acquired:
        spec["acquireTime"] = acquired
    return spec


def decide(observation: Observation | None, me: str, now: float, wall: str, duration: int) -> Decision:
    """client-go's tryAcquireOrRenew as a function: no Lease → create it; mine → renew it (same
    acquireTime and transitions); held by another and not expired → wait; else (released, or its
    holder stopped renewing) → acquire it, one more transition."""
    if observation is None:
        return Decision("create", me, lease_spec(me, duration, wall, wall, 0))
    record = observation.record
    if record.holder == me:
        return Decision("renew", me, lease_spec(me, duration, record.acquire_time or wall, wall, record.transitions))
    if record.holder and not expired(observation, now):
        return Decision("wait", record.holder)
    return Decision("acquire", me, lease_spec(me, duration, wall, wall, record.transitions + 1))


def released_spec(record: Record, wall: str) -> dict[str, Any]:
    """client-go's release: no holder, a 1 s duration, the transitions kept (the next holder counts
    one more)."""
    return lease_spec("", 1, wall, wall, record.transitions)


def new_lease(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": LEASE_API,
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/component": "operator"},
        },
        "spec": spec,
    }


def with_spec(lease: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The Lease as read with a new spec: its metadata.resourceVersion makes the PUT conditional."""
    return {**lease, "spec": spec}


def overdue(renewed_at: float, now: float, renew_deadline: float) -> bool:
    """The leader has gone the renew deadline without a successful renewal."""
    return now - renewed_at >= renew_deadline


# --- the API -------------------------------------------------------------------------------------


class Conflict(Exception):
    """Another candidate wrote the Lease first (409: a stale resourceVersion, or it created it)."""


class LeaseApi(Protocol):
    namespace: str
    name: str

    def get(self) -> dict[str, Any] | None: ...
    def create(self, lease: dict[str, Any]) -> dict[str, Any]: ...
    def replace(self, lease: dict[str, Any]) -> dict[str, Any]: ...


class Requester(Protocol):
    """What `k8s.Client` offers (its `request`; errors with an HTTP `status`)."""

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]: ...


def leases_path(namespace: str) -> str:
    return f"/apis/{LEASE_API}/namespaces/{quote(namespace)}/leases"


@dataclass
class KubeLeaseApi:
    """One Lease through the operator's client: GET, POST, PUT (409 → Conflict)."""

    client: Requester
    namespace: str
    name: str

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        try:
            return self.client.request(method, path, body)
        except Exception as error:
            if getattr(error, "status", None) == 409:
                raise Conflict(str(error)) from None
            raise

    def get(self) -> dict[str, Any] | None:
        try:
            return self.client.request("GET", f"{leases_path(self.namespace)}/{quote(self.name)}")
        except Exception as error:
            if getattr(error, "status", None) == 404:
                return None
            raise

    def create(self, lease: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", leases_path(self.namespace), lease)

    def replace(self, lease: dict[str, Any]) -> dict[str, Any]:
        return self._call("PUT", f"{leases_path(self.namespace)}/{quote(self.name)}", lease)


# What a round may fail with besides a conflict: the API's answer (k8s.ApiError is a
# RuntimeError), the connection (urllib3, OS). Anything else is a bug and is not hidden.
API_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, TransportError, OSError)
RELEASE_ERRORS: tuple[type[BaseException], ...] = (Conflict, *API_ERRORS)


# --- the loop ------------------------------------------------------------------------------------


def exit_hard(reason: str) -> None:
    """Stop reconciling at once: no cleanup, no handler finishing its write. The Deployment
    restarts the container, which comes back as a standby."""
    log.error("lost the lease: %s; exiting (code %d) to restart as a standby", reason, LOST_LEASE_EXIT)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(LOST_LEASE_EXIT)


def utc_now() -> str:
    return stamp(datetime.now(UTC))


@dataclass
class Elector:
    """One candidate for one Lease. `round()` is one read-decide-write; `acquire` blocks in rounds
    until this candidate leads; `hold` renews in the background (and exits via `on_lost` when it
    cannot); `release` gives the Lease up."""

    api: LeaseApi
    identity: str
    timing: Timing = field(default_factory=Timing)
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], str] = utc_now
    on_lost: Callable[[str], None] = exit_hard
    observation: Observation | None = None
    renewed_at: float | None = None  # clock time just before the last successful write of ours
    lost: bool = False
    _last_holder: str | None = None
    _last_error: str | None = None

    @property
    def lease(self) -> str:
        return f"{self.api.namespace}/{self.api.name}"

    def round(self) -> str | None:
        """Read, decide, write once. Returns who holds the Lease now: this identity when the write
        succeeded, the other holder when it must wait, None when another candidate's write came
        first (409; the next round reads who). API errors propagate."""
        lease = self.api.get()
        seen = self.clock()  # after the read: the record was stored before this
        self.observation = observe(self.observation, record_of(lease, self.timing.lease_duration), seen)
        decision = decide(self.observation, self.identity, seen, self.wall(), self.timing.lease_duration)
        if decision.action == "wait":
            return decision.holder
        sent = self.clock()  # before the write: the API server stores it after this
        try:
            if lease is None:
                written = self.api.create(new_lease(self.api.namespace, self.api.name, decision.spec))
            else:
                written = self.api.replace(with_spec(lease, decision.spec))
        except Conflict:
            return None
        self.observation = observe(None, record_of(written, self.timing.lease_duration), self.clock())
        self.renewed_at = sent
        if decision.action != "renew":
            transitions = self.observation.record.transitions if self.observation else 0
            log.info("became leader: lease %s, holder %s, transitions %d", self.lease, self.identity, transitions)
        return self.identity

    def _failed(self, error: BaseException, what: str) -> None:
        """One warning per distinct failure (a standby that cannot reach the API would otherwise
        log every retry period)."""
        message = f"{type(error).__name__}: {error}"[:500]
        if message != self._last_error:
            log.warning("%s the lease %s failed: %s", what, self.lease, message)
        self._last_error = message

    def acquire(self, stop: threading.Event) -> bool:
        """Block until this candidate holds the Lease (True) or `stop` is set (False). Logs one
        line each time the holder it stands behind changes."""
        metrics.LEADER.set(0)
        while not stop.is_set():
            try:
                holder = self.round()
                self._last_error = None
            except API_ERRORS as error:
                self._failed(error, "reading or taking")
                holder = None
            if holder == self.identity:
                metrics.LEADER.set(1)
                return True
            if holder and holder != self._last_holder:
                log.info("standing by behind %s (lease %s)", holder, self.lease)
                self._last_holder = holder
            stop.wait(self.timing.retry_period)
        return False

    def renew_once(self) -> None:
        """One renewal attempt of the leader: a failure is retried at the next period (until the
        deadline, which `check_deadline` enforces); the Lease held by another is lost at once."""
        try:
            holder = self.round()
            self._last_error = None
        except API_ERRORS as error:
            self._failed(error, "renewing")
            return
        if holder is not None and holder != self.identity:
            self.lose(f"lease {self.lease} is held by {holder}")

    def check_deadline(self) -> float:
        """Lose the Lease when the renew deadline has passed; else the seconds left until it does."""
        if self.renewed_at is None:
            self.lose("never renewed")
            return 0.0
        now = self.clock()
        if overdue(self.renewed_at, now, self.timing.renew_deadline):
            self.lose(
                f"could not renew lease {self.lease} for {now - self.renewed_at:.1f}s "
                f"(renew deadline {self.timing.renew_deadline:g}s)"
            )
            return 0.0
        return self.renewed_at + self.timing.renew_deadline - now

    def lose(self, reason: str) -> None:
        if self.lost:
            return
        self.lost = True
        metrics.LEADER.set(0)
        self.on_lost(reason)

    @contextmanager
    def hold(self) -> Iterator[threading.Event]:
        """While inside: one thread renews every retry period, another watches the renew deadline
        (a renewal may hang in its HTTP call for longer than the deadline). Yields the event that
        stops both; leaving the block stops them."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.timing.retry_period) and not self.lost:
                self.renew_once()

        def watch() -> None:
            while not stop.is_set() and not self.lost:
                left = self.check_deadline()
                if left > 0:
                    stop.wait(min(left, self.timing.retry_period))

        threads = [
            threading.Thread(target=renew, name="lease-renew", daemon=True),
            threading.Thread(target=watch, name="lease-deadline", daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            yield stop
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=self.timing.retry_period + 1)

    def release(self) -> bool:
        """Give the Lease up if it is still ours (one try: this is shutdown). True when released."""
        try:
            lease = self.api.get()
            record = record_of(lease, self.timing.lease_duration)
            if lease is None or record is None or record.holder != self.identity:
                return False
            self.api.replace(with_spec(lease, released_spec(record, self.wall())))
        except RELEASE_ERRORS as error:
            log.warning("releasing the lease %s failed: %s", self.lease, error)
            return False
        metrics.LEADER.set(0)
        log.info("released the lease %s", self.lease)
        return True


# --- the standby's liveness ----------------------------------------------------------------------


class StandbyProbe:
    """The liveness URL (`--liveness`) answered with 200 while standing by, so the chart's
    livenessProbe does not restart a healthy standby; closed before kopf binds the same port."""

    def __init__(self, url: str, holder: Callable[[], str | None]):
        parts = urlsplit(url)
        path = parts.path or "/"

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                found = self.path.split("?", 1)[0] == path
                body = json.dumps({"leader": False, "holder": holder()} if found else {"error": "not found"})
                data = body.encode()
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((parts.hostname or "0.0.0.0", parts.port or 80), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# --- the whole: stand by, lead, release ----------------------------------------------------------


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set `stop` while standing by, and in the moment between taking the Lease and
    kopf installing its own handlers (`lead` gets `stop`, to pass such a signal on to kopf)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_elected(elector: Elector, lead: Callable[[threading.Event], None], liveness: str | None = None) -> int:
    """Stand by until this process holds the Lease (answering the liveness URL meanwhile), then
    run `lead(stop)` (kopf) while the Lease is renewed in the background, then release it. A
    signal while standing by ends the process with 0 without ever leading."""
    stop = threading.Event()
    with stop_on_signals(stop):
        probe = StandbyProbe(liveness, lambda: elector._last_holder) if liveness else None
        try:
            led = elector.acquire(stop)
        finally:
            if probe is not None:
                probe.close()
        if not led:
            return 0
        try:
            with elector.hold():
                if not stop.is_set():
                    lead(stop)
        finally:
            elector.release()
    return 0

"""What one running operator holds between handler calls: its configuration, its API client, one lock
per object, and what each kind remembers (rank 0's scrape failures, replicas' refused loads).

Created by the startup handler (`handlers.py`) and kept in kopf's memo; handlers find it with
`operator_state(memo)`. Sync handlers and the resync loop run in threads, so what is shared is
guarded: per-object work runs under `locks.hold(kind, key)`. Background per-object work (the
resync, the status refreshes children's events ask for) goes through `work`, a `KeyedRunner`: one
call per object in flight, a bounded number in all, bursts of requests coalesced.
"""

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import kopf

from . import k8s, metrics
from .config import OperatorConfig

ALLOW_METRICS_URL_ENV = "KUBETUNE_OPERATOR_ALLOW_METRICS_URL_ANNOTATION"
CONCURRENCY = 8  # reconciles the runner runs at a time, both kinds together (mostly waiting on I/O)
DEADLINE = 30.0  # seconds a reconcile may hold a slot (a scrape has its own 5 s deadline)

log = logging.getLogger("kubetune.operator")

Key = tuple[str, str]  # (namespace, name)


class KeyedLocks:
    """One re-entrant lock per object: its status is read, derived and written as one step, so a
    handler, an event of a child and the resync loop never interleave their writes."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str, str], threading.RLock] = {}
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, kind: str, key: Key) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault((kind, *key), threading.RLock())
        with lock:
            yield


class KeyedRunner:
    """Blocking per-object work off the event loop: one call per key in flight, `limit` in all.

    Used from the event loop only (the resync loop, the child-event handlers). One key per object,
    (kind, namespace, name): a second reconcile of an object while one runs would only redo the
    same reads, so `start` skips a key in flight and `request` turns into one follow-up. A call
    holds one of `limit` slots for at most `deadline` seconds: past that its slot goes to the others
    and it finishes on one of the `limit` spare threads (the reconcile's own HTTP deadlines end it)."""

    def __init__(self, limit: int = CONCURRENCY, deadline: float = DEADLINE) -> None:
        self.limit, self.deadline = limit, deadline
        self._slots: asyncio.Semaphore | None = None
        # Threads beyond `limit` only for calls that overran their deadline and still run.
        self._executor = ThreadPoolExecutor(max_workers=2 * limit, thread_name_prefix="kubetune-reconcile")
        self._in_flight: set[Hashable] = set()
        self._again: dict[Hashable, tuple[Callable[[], None], str]] = {}
        self._scheduled: set[Hashable] = set()
        self._fresh: dict[Hashable, float] = {}  # key → when its last reconcile ended
        self._tasks: set[asyncio.Future[Any]] = set()

    def busy(self, key: Hashable) -> bool:
        return key in self._in_flight or key in self._scheduled

    def fresh_within(self, key: Hashable, seconds: float) -> bool:
        """Whether a reconcile of `key` (by the runner, or `touched` by a handler) ended less than
        `seconds` ago."""
        ended = self._fresh.get(key)
        return ended is not None and time.monotonic() - ended < seconds

    def touched(self, key: Hashable) -> None:
        """Note that the object's state was just read and written by a handler (not the runner)."""
        self._fresh[key] = time.monotonic()

    def forget(self, keep: Callable[[Hashable], bool]) -> None:
        """Drop what is remembered of keys `keep` says are gone."""
        for key in [key for key in self._fresh if not keep(key)]:
            self._fresh.pop(key, None)

    def start(self, key: Hashable, fn: Callable[[], None], trigger: str) -> bool:
        """Run `fn` now unless the key is in flight (or about to be): False when skipped."""
        if self.busy(key):
            return False
        self._in_flight.add(key)
        self._spawn(self._run(key, fn, trigger))
        return True

    def request(self, key: Hashable, fn: Callable[[], None], trigger: str, delay: float = 0.0) -> None:
        """Run `fn` after `delay` seconds, coalesced: requests for a key already waiting make no
        second run, and those for a key in flight make one more run after it."""
        if key in self._in_flight:
            self._again[key] = (fn, trigger)
        elif key not in self._scheduled:
            self._scheduled.add(key)
            self._spawn(self._later(key, fn, trigger, delay))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- inside ------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _later(self, key: Hashable, fn: Callable[[], None], trigger: str, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            self._scheduled.discard(key)
        if key in self._in_flight:  # the resync started it meanwhile: once more after that
            self._again[key] = (fn, trigger)
            return
        self._in_flight.add(key)
        await self._run(key, fn, trigger)

    async def _run(self, key: Hashable, fn: Callable[[], None], trigger: str) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        kind = str(key[0]) if isinstance(key, tuple) and key else ""
        try:
            async with self._slots:
                metrics.RECONCILE_TRIGGERS.labels(kind=kind, trigger=trigger).inc()
                future = asyncio.get_running_loop().run_in_executor(self._executor, _logged(key, fn))
                try:
                    await asyncio.wait_for(asyncio.shield(future), self.deadline)
                    overran = False
                except TimeoutError:
                    overran = True
                    metrics.RECONCILE_OVERRUNS.labels(kind=kind).inc()
                    log.warning("reconcile of %s has run %.0f s; its slot goes to others", key, self.deadline)
            if overran:
                await future  # the object stays in flight until its thread ends
            self._fresh[key] = time.monotonic()
        finally:
            self._in_flight.discard(key)
        again = self._again.pop(key, None)
        if again is not None:
            self.request(key, again[0], again[1])


def _logged(key: Hashable, fn: Callable[[], None]) -> Callable[[], None]:
    def call() -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - one object's trouble must not stop the others
            log.exception("reconcile of %s failed", key)

    return call


@dataclass
class ScrapeFailures:
    """Consecutive failures to read one FineTuneJob's metrics; reported in its Running condition."""

    failures: int = 0
    since: str = ""
    error: str = ""

    def note(self) -> str:
        if not self.failures:
            return ""
        return f"training metrics unavailable since {self.since} ({self.failures} failed scrapes): {self.error}"


# AdapterDeployment → replica (pod name) → adapter name → (URI, the runtime's message): loads a
# replica refused, not retried there for the same URI.
RefusedLoads = dict[str, dict[str, tuple[str, str]]]


@dataclass
class OperatorState:
    config: OperatorConfig
    client: k8s.Client
    allow_metrics_url: bool = False
    locks: KeyedLocks = field(default_factory=KeyedLocks)
    scrapes: dict[Key, ScrapeFailures] = field(default_factory=dict)
    refused_loads: dict[Key, RefusedLoads] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    work: KeyedRunner = field(default_factory=KeyedRunner)

    @classmethod
    def from_environment(cls) -> "OperatorState":
        allow = os.environ.get(ALLOW_METRICS_URL_ENV, "").lower() in ("1", "true", "yes")
        return cls(OperatorConfig.from_env(), k8s.Client.from_environment(), allow_metrics_url=allow)

    @property
    def interval(self) -> float:
        """Seconds between resync rounds (and rank-0 scrapes)."""
        return self.config.metrics_scrape_interval_seconds


def operator_state(memo: Any) -> OperatorState:
    """The running operator's state; a retry (not an error) while startup has not yet made it."""
    state: OperatorState | None = getattr(memo, "operator", None)
    if state is None:
        raise kopf.TemporaryError("the operator is starting", delay=1)
    return state

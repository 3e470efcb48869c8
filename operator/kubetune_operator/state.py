"""What one running operator holds between handler calls: its configuration, its API client, one lock
per object, and what each kind remembers (rank 0's scrape failures, replicas' refused loads).

Created by the startup handler (`handlers.py`) and kept in kopf's memo; handlers find it with
`operator_state(memo)`. Sync handlers and the resync loop run in threads, so what is shared is
guarded: per-object work runs under `locks.hold(kind, key)`.
"""

import asyncio
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import kopf

from . import k8s
from .config import OperatorConfig

ALLOW_METRICS_URL_ENV = "KUBETUNE_OPERATOR_ALLOW_METRICS_URL_ANNOTATION"

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

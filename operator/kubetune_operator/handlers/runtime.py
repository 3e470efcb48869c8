"""What one running operator holds: configuration, API client, locks, the FineTuneJobs it has seen,
and the resync loop; plus the operator-level kopf handlers (login, startup, cleanup)."""

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import kopf

from .. import k8s, metrics
from ..config import OperatorConfig
from . import REGISTRY

ALLOW_METRICS_URL_ENV = "KUBETUNE_OPERATOR_ALLOW_METRICS_URL_ANNOTATION"
KOPF_PREFIX = "kopf.kubetune.io"
FINISHED = ("Succeeded", "Failed")
RESYNC_CONCURRENCY = 8

log = logging.getLogger("kubetune.operator")

Key = tuple[str, str]  # (namespace, name)


@dataclass
class Tracked:
    """A FineTuneJob as last seen on the watch stream."""

    namespace: str
    name: str
    phase: str
    gpus: int


class Tracker:
    """The FineTuneJobs the operator watches: fed by every watch event, read by the resync loop
    and the jobs-by-phase gauge. Thread-safe (sync handlers run in kopf's thread pool)."""

    def __init__(self) -> None:
        self._jobs: dict[Key, Tracked] = {}
        self._lock = threading.Lock()

    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta, spec = body.get("metadata") or {}, body.get("spec") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self._lock:
            if event_type == "DELETED":
                self._jobs.pop(key, None)
            else:
                resources = spec.get("resources") or {}
                gpus = int(resources.get("nodes") or 1) * int(resources.get("gpusPerNode", 1) or 0)
                phase = (body.get("status") or {}).get("phase") or "Pending"
                self._jobs[key] = Tracked(key[0], key[1], phase, gpus)
            metrics.set_phase_counts(job.phase for job in self._jobs.values())

    def unfinished(self) -> list[Tracked]:
        with self._lock:
            return [job for job in self._jobs.values() if job.phase not in FINISHED]


class KeyedLocks:
    """One re-entrant lock per FineTuneJob: status is read, derived and written as one step, so
    a Job event, a pod event and the resync loop never interleave their writes."""

    def __init__(self) -> None:
        self._locks: dict[Key, threading.RLock] = {}
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, key: Key) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.RLock())
        with lock:
            yield


@dataclass
class ScrapeState:
    """Consecutive failures to read one job's metrics; reported in its Running condition."""

    failures: int = 0
    since: str = ""
    error: str = ""

    def note(self) -> str:
        if not self.failures:
            return ""
        return f"training metrics unavailable since {self.since} ({self.failures} failed scrapes): {self.error}"


@dataclass
class Runtime:
    config: OperatorConfig
    client: k8s.Client
    allow_metrics_url: bool = False
    tracker: Tracker = field(default_factory=Tracker)
    locks: KeyedLocks = field(default_factory=KeyedLocks)
    scrapes: dict[Key, ScrapeState] = field(default_factory=dict)
    task: asyncio.Task | None = None

    @classmethod
    def from_environment(cls) -> "Runtime":
        allow = os.environ.get(ALLOW_METRICS_URL_ENV, "").lower() in ("1", "true", "yes")
        return cls(OperatorConfig.from_env(), k8s.Client.from_environment(), allow_metrics_url=allow)

    @property
    def interval(self) -> float:
        return self.config.metrics_scrape_interval_seconds


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf's state lives in annotations under our own prefix (status is a strict schema, and
    the status subresource is ours); no finalizer is ever needed (see the package docstring);
    only warnings become Kubernetes Events (transitions are posted explicitly)."""
    settings.persistence.finalizer = f"{KOPF_PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=KOPF_PREFIX)
    settings.posting.level = logging.WARNING
    settings.peering.standalone = True
    settings.execution.max_workers = 16


@kopf.on.login(registry=REGISTRY)
def login(**_: Any) -> kopf.ConnectionInfo:
    """The same credentials as our own client: service account, else KUBECONFIG, else ~/.kube/config."""
    return kopf.ConnectionInfo(**k8s.connection_info(k8s.load_configuration()))


@kopf.on.startup(registry=REGISTRY)
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per scrape otherwise
    try:
        runtime = Runtime.from_environment()
    except ValueError as error:  # a misconfigured operator stops here, not in its first reconcile
        raise kopf.PermanentError(str(error)) from None
    memo.runtime = runtime
    runtime.task = asyncio.create_task(resync_loop(runtime), name="kubetune-resync")
    log.info(
        "kubetune operator: scrape/resync every %ss, trainer metrics port %s",
        runtime.interval,
        runtime.config.trainer_metrics_port,
    )


@kopf.on.cleanup(registry=REGISTRY)
async def stop(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime | None = getattr(memo, "runtime", None)
    if runtime is None:
        return
    if runtime.task is not None:
        runtime.task.cancel()
        try:
            await runtime.task
        except asyncio.CancelledError:
            pass
    runtime.client.close()


async def resync_loop(runtime: Runtime) -> None:
    """Every scrape interval: re-derive the status of each unfinished FineTuneJob (so a missed
    event is never lost for long), scrape rank 0's metrics of the running ones, and count the
    GPU-hours they hold. Errors are logged per job and never stop the loop."""
    from .reconcile import reconcile_status  # noqa: PLC0415 - reconcile imports this module

    limit = asyncio.Semaphore(RESYNC_CONCURRENCY)
    last = time.monotonic()

    async def one(job: Tracked) -> None:
        async with limit:
            try:
                await asyncio.to_thread(reconcile_status, runtime, job.namespace, job.name, scrape=True)
            except Exception:  # noqa: BLE001 - one job's trouble must not stop the others
                log.exception("resync of FineTuneJob %s/%s failed", job.namespace, job.name)

    while True:
        await asyncio.sleep(runtime.interval)
        now = time.monotonic()
        jobs = runtime.tracker.unfinished()
        running_gpus = sum(job.gpus for job in jobs if job.phase == "Running")
        metrics.GPU_HOURS.inc(running_gpus * (now - last) / 3600)
        last = now
        await asyncio.gather(*(one(job) for job in jobs))

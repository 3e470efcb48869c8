"""The operator's own Prometheus metrics (not the trainer's), served by `kubetune operator
--metrics-port` from a registry of their own, so importing this module twice or running several
operators in one test process never clashes with prometheus_client's global registry."""

import contextlib
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "kubetune_operator_reconciles_total",
    "Reconciliations, by kind and result (ok, error, invalid, refused).",
    ["kind", "result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "kubetune_operator_reconcile_duration_seconds",
    "Time to reconcile one object (API reads, pure logic, writes).",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
RECONCILE_TRIGGERS = Counter(
    "kubetune_operator_reconcile_triggers_total",
    "Reconciles started, by kind and what started them (create, resume, update, event: a child's "
    "Job or pod changed, resync: the periodic round).",
    ["kind", "trigger"],
    registry=REGISTRY,
)
RECONCILE_OVERRUNS = Counter(
    "kubetune_operator_reconcile_overruns_total",
    "Background reconciles that ran past their deadline (their concurrency slot went to others).",
    ["kind"],
    registry=REGISTRY,
)


@contextlib.contextmanager
def reconcile_observed(kind: str) -> Iterator[dict[str, str]]:
    """Count one reconcile by result and time it. The block sets outcome["result"] (it stays
    "error" when the block raises something it did not classify)."""
    outcome = {"result": "error"}
    started = time.perf_counter()
    try:
        yield outcome
    finally:
        RECONCILES.labels(kind=kind, result=outcome["result"]).inc()
        RECONCILE_SECONDS.labels(kind=kind).observe(time.perf_counter() - started)


JOBS_BY_PHASE = Gauge(
    "kubetune_operator_finetunejobs",
    "FineTuneJobs the operator watches, by status.phase.",
    ["phase"],
    registry=REGISTRY,
)
GPU_HOURS = Counter(
    "kubetune_operator_gpu_hours_requested_total",
    "GPU-hours requested by running FineTuneJobs (GPUs x time spent in phase Running).",
    registry=REGISTRY,
)
SCRAPES = Counter(
    "kubetune_operator_metrics_scrapes_total",
    "Scrapes of rank 0's training metrics, by result (ok, error).",
    ["result"],
    registry=REGISTRY,
)
STATUS_WRITES = Counter(
    "kubetune_operator_status_writes_total",
    "Status patches sent, FineTuneJob and AdapterDeployment (writes are skipped when nothing changed).",
    registry=REGISTRY,
)

EVALUATION = Gauge(
    "kubetune_operator_finetunejob_evaluation",
    "What each succeeded FineTuneJob's evaluation measured (status.evaluation), by the metric names "
    "promotion rules use: rougeL.delta, exactMatch.tuned, forgettingRatio, ...",
    ["namespace", "name", "metric"],
    registry=REGISTRY,
)

LEADER = Gauge(
    "kubetune_operator_leader",
    "1 while this operator process reconciles (it holds the leader Lease, or runs without "
    "--leader-elect), 0 while it stands by behind another replica.",
    registry=REGISTRY,
)

PHASES = ("Pending", "Admitted", "Running", "Suspended", "Succeeded", "Failed")


def set_phase_counts(phases: Iterable[str]) -> None:
    counts = Tally(phases)
    for phase in set(PHASES) | set(counts):
        JOBS_BY_PHASE.labels(phase=phase).set(counts.get(phase, 0))


def set_evaluations(readings: Iterable[tuple[tuple[str, str], Iterable[tuple[str, float]]]]) -> None:
    """One series per (job, metric) of the jobs that exist now: deleted jobs' series go."""
    EVALUATION.clear()
    for (namespace, name), values in readings:
        for metric, value in values:
            EVALUATION.labels(namespace=namespace, name=name, metric=metric).set(value)


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Expose /metrics on `port` (0: don't)."""
    if port:
        start_http_server(port, addr=address, registry=REGISTRY)

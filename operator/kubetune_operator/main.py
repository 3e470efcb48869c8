"""`kubetune operator`: run every handler (`handlers.REGISTRY`) with kopf, plus a liveness endpoint
and the operator's Prometheus metrics. Works with only a kubeconfig (KUBECONFIG or ~/.kube/config)
or in a pod. The CLI (`kubetune.cli`) calls `run_operator(Options(...))`.

With `--leader-elect` several replicas run and one reconciles: each stands by until it holds the
Lease (`leader.py`), answering its liveness URL and serving its metrics meanwhile, then runs kopf;
one that cannot renew in time exits at once (`leader.LOST_LEASE_EXIT`) and comes back as a standby."""

import asyncio
import os
import signal
import sys
import threading
from dataclasses import dataclass

import kopf
from kubernetes.config import ConfigException

from . import k8s, leader, metrics
from .config import OperatorConfig
from .handlers import REGISTRY, configure
from .state import ALLOW_METRICS_URL_ENV


@dataclass(frozen=True)
class Options:
    namespaces: tuple[str, ...] = ()
    liveness: str | None = None
    metrics_port: int = 8000
    allow_metrics_url_annotation: bool = False
    verbose: bool = False
    debug: bool = False
    leader_elect: bool = False
    leader_elect_lease: str = leader.DEFAULT_LEASE_NAME
    leader_elect_namespace: str | None = None  # None: $KUBETUNE_OPERATOR_NAMESPACE, else "default"
    leader_elect_lease_duration: int = leader.Timing.lease_duration
    leader_elect_renew_deadline: float = leader.Timing.renew_deadline
    leader_elect_retry_period: float = leader.Timing.retry_period


def watched_namespaces(options: Options, config: OperatorConfig) -> tuple[str, ...]:
    """--namespace wins over the configuration; none at all means cluster-wide."""
    return tuple(options.namespaces) or tuple(config.namespaces)


def lease_options(options: Options) -> tuple[str, str, leader.Timing]:
    """(namespace, name, timing) of the Lease to elect with; ValueError (one line) for a bad name
    or timing, told before anything starts."""
    timing = leader.Timing(
        lease_duration=options.leader_elect_lease_duration,
        renew_deadline=options.leader_elect_renew_deadline,
        retry_period=options.leader_elect_retry_period,
    ).check()
    namespace = leader.lease_namespace(options.leader_elect_namespace, os.environ)
    leader.check_lease_name(namespace, options.leader_elect_lease)
    return namespace, options.leader_elect_lease, timing


def run_kopf(
    settings: kopf.OperatorSettings,
    namespaces: tuple[str, ...],
    liveness: str | None,
    stop: threading.Event | None = None,
) -> None:
    """kopf.run in an event loop of our own, until a signal stops it. Handlers still running in
    kopf's threads finish before this returns (and before a Lease is released).

    `stop` (leader election) is set by a SIGTERM that came after this process took the Lease but
    before kopf installed its own signal handlers; it is not given to kopf as its stop flag: kopf
    waits on such a flag in a task of its own, which would hold its shutdown for 5 s (or, as a
    threading.Event, hang asyncio.run's executor shutdown for good)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    ready = asyncio.Event()
    forward = loop.create_task(forward_early_signal(ready, stop)) if stop is not None else None
    try:
        kopf.run(
            loop=loop,
            registry=REGISTRY,
            settings=settings,
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=liveness,
            ready_flag=ready,
        )
    finally:
        if forward is not None:
            forward.cancel()
            loop.run_until_complete(asyncio.gather(forward, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        asyncio.set_event_loop(None)
        loop.close()
        settings.execution.executor.shutdown(wait=True, cancel_futures=True)


async def forward_early_signal(ready: asyncio.Event, stop: threading.Event) -> None:
    """Once kopf is ready (its signal handlers installed), send again the SIGTERM that only set
    `stop` before then, so that kopf stops and the Lease is released rather than waited out."""
    await ready.wait()
    if stop.is_set():
        signal.raise_signal(signal.SIGTERM)


def run_operator(options: Options) -> int:
    try:
        config = OperatorConfig.from_env()  # fail at start-up, not in the first handler
        lease = lease_options(options) if options.leader_elect else None
    except ValueError as error:
        print(f"kubetune operator: {error}", file=sys.stderr)
        return 2
    if options.allow_metrics_url_annotation:
        os.environ[ALLOW_METRICS_URL_ENV] = "1"
    namespaces = watched_namespaces(options, config)
    kopf.configure(verbose=options.verbose, debug=options.debug)
    settings = kopf.OperatorSettings()
    configure(settings)
    metrics.serve(options.metrics_port)

    if lease is None:
        metrics.LEADER.set(1)
        run_kopf(settings, namespaces, options.liveness, None)
        return 0
    try:
        client = k8s.Client.from_environment()
    except ConfigException as error:
        print(f"kubetune operator: no Kubernetes credentials: {error}", file=sys.stderr)
        return 2
    namespace, name, timing = lease
    elector = leader.Elector(leader.KubeLeaseApi(client, namespace, name), leader.new_identity(), timing)
    try:
        return leader.run_elected(
            elector, lambda stop: run_kopf(settings, namespaces, options.liveness, stop), options.liveness
        )
    finally:
        client.close()

"""`kubetune operator`: run every handler (`handlers.REGISTRY`) with kopf, plus a liveness endpoint
and the operator's Prometheus metrics. Works with only a kubeconfig (KUBECONFIG or ~/.kube/config)
or in a pod. The CLI (`kubetune.cli`) calls `run_operator(Options(...))`."""

import os
import sys
from dataclasses import dataclass

import kopf

from . import metrics
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


def watched_namespaces(options: Options, config: OperatorConfig) -> tuple[str, ...]:
    """--namespace wins over the configuration; none at all means cluster-wide."""
    return tuple(options.namespaces) or tuple(config.namespaces)


def run_operator(options: Options) -> int:
    try:
        config = OperatorConfig.from_env()  # fail at start-up, not in the first handler
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
    kopf.run(
        registry=REGISTRY,
        settings=settings,
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=options.liveness,
    )
    return 0

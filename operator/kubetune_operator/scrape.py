"""Training progress from rank 0's Prometheus endpoint.

The trainer (kubetune_trainer/metrics.py, not imported here: the operator image has no torch)
serves unlabelled gauges named `kubetune_train_<name>` on `trainerMetricsPort`. Gauges start at 0,
so a 0 before the first step means "not measured yet", not a loss of zero.

Testing and debugging hook: an operator started with `--allow-metrics-url-annotation` (or
KUBETUNE_OPERATOR_ALLOW_METRICS_URL_ANNOTATION=1) scrapes the URL in a FineTuneJob's annotation
`kubetune.io/metrics-url` instead of `http://<rank 0 pod IP>:<port>/metrics`. Off by default: it
lets whoever may edit a FineTuneJob point the operator's HTTP client anywhere.
"""

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conditions import timestamp

PREFIX = "kubetune_train_"
METRICS_URL_ANNOTATION = "kubetune.io/metrics-url"
GIB = 2**30
NAMES = ("step", "total_steps", "epoch", "loss", "eval_loss", "learning_rate", "tokens_per_second",
         "eta_seconds", "gpu_memory_bytes", "resumes")  # fmt: skip


class ScrapeError(RuntimeError):
    """The endpoint could not be read or did not speak Prometheus text."""


def parse_metrics(text: str) -> dict[str, float]:
    """The trainer's gauges by short name (`step`, `loss`, ...); ScrapeError for text that is not
    the Prometheus exposition format or carries none of them."""
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith(PREFIX) and not sample.labels:
                    values[sample.name[len(PREFIX) :]] = float(sample.value)
    except ValueError as error:
        raise ScrapeError(f"not Prometheus text: {error}") from None
    values = {k: v for k, v in values.items() if k in NAMES and math.isfinite(v)}
    if "step" not in values:
        raise ScrapeError(f"no {PREFIX}step gauge in the response")
    return values


@dataclass(frozen=True)
class Reading:
    """One scrape: status.progress and status.metrics fragments (wire form)."""

    progress: dict[str, Any]
    metrics: dict[str, float]
    resumes: int = 0  # times the trainer went on from a checkpoint


def progress_from(values: dict[str, float], now: datetime) -> dict[str, Any]:
    step = int(values["step"])
    progress: dict[str, Any] = {"step": step}
    total = int(values.get("total_steps", 0))
    if total > 0:
        progress["totalSteps"] = total
        progress["percent"] = max(0, min(100, math.floor(100 * step / total)))
    if values.get("epoch", 0) > 0:
        progress["epoch"] = round(values["epoch"], 3)
    eta = values.get("eta_seconds", 0)
    if eta > 0 and (total == 0 or step < total):
        progress["eta"] = timestamp(now + timedelta(seconds=round(eta)))
    return progress


def metrics_from(values: dict[str, float]) -> dict[str, float]:
    """Only what has been measured: losses and rates read 0 until the first step (or evaluation)."""
    out: dict[str, float] = {}
    started = values.get("step", 0) > 0
    if started and values.get("loss", 0) > 0:
        out["trainLoss"] = round(values["loss"], 4)
    if values.get("eval_loss", 0) > 0:
        out["evalLoss"] = round(values["eval_loss"], 4)
    if started and values.get("learning_rate", 0) > 0:
        out["learningRate"] = float(f"{values['learning_rate']:.4g}")
    if started and values.get("tokens_per_second", 0) > 0:
        out["tokensPerSecond"] = round(values["tokens_per_second"], 1)
    if values.get("gpu_memory_bytes", 0) > 0:
        out["gpuMemoryGiB"] = round(values["gpu_memory_bytes"] / GIB, 2)
    return out


def reading_from(text: str, now: datetime) -> Reading:
    values = parse_metrics(text)
    return Reading(progress_from(values, now), metrics_from(values), int(values.get("resumes", 0)))


def apply_reading(status: dict[str, Any], reading: Reading) -> dict[str, Any]:
    """status with the reading folded in: progress replaced, metrics updated key by key (a loss
    measured earlier stays until a new one is read), restarts raised to the trainer's resumes (a
    preempted pod is left out of the Job's failures, but the trainer knows it went on)."""
    out = dict(status)
    out["progress"] = dict(reading.progress)
    out["metrics"] = {**(status.get("metrics") or {}), **reading.metrics}
    out["restarts"] = max(int(status.get("restarts") or 0), reading.resumes)
    return out


def metrics_url(pod: dict[str, Any] | None, port: int, annotations: dict[str, str], allow_override: bool) -> str | None:
    """Where rank 0 serves its metrics; None when there is nothing to scrape."""
    if allow_override and annotations.get(METRICS_URL_ANNOTATION):
        return annotations[METRICS_URL_ANNOTATION]
    ip = ((pod or {}).get("status") or {}).get("podIP")
    if not port or not ip:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


def fetch(url: str, timeout: float) -> str:
    """GET the endpoint; ScrapeError with a short reason on any failure."""
    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=False, trust_env=False)
    except httpx.HTTPError as error:
        raise ScrapeError(f"{type(error).__name__}: {error}") from None
    if response.status_code != 200:
        raise ScrapeError(f"HTTP {response.status_code} from {url}")
    return response.text

"""Training progress from rank 0's Prometheus endpoint.

The trainer (kubetune_trainer/metrics.py, not imported here: the operator image has no torch)
serves unlabelled gauges named `kubetune_train_<name>` on `trainerMetricsPort`. Gauges start at 0,
so a 0 before the first step means "not measured yet", not a loss of zero.

Testing and debugging hook: an operator started with `--allow-metrics-url-annotation` (or
KUBETUNE_OPERATOR_ALLOW_METRICS_URL_ANNOTATION=1) scrapes the URL in a FineTuneJob's annotation
`kubetune.io/metrics-url` instead of `http://<rank 0 pod IP>:<port>/metrics`. Off by default: it
lets whoever may edit a FineTuneJob point the operator's HTTP client anywhere.

Rank 0 runs code and data its FineTuneJob's author controls, so what it serves is untrusted: the
exchange has a total deadline and a body cap (`bounded_http`), the text is cut to the trainer's
own gauges (bounded in lines and line length) before the Prometheus parser sees it, and a value
that could not go into a status patch (out of range, not finite) is no reading.
"""

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from .bounded_http import HttpError, request
from .conditions import timestamp

PREFIX = "kubetune_train_"
METRICS_URL_ANNOTATION = "kubetune.io/metrics-url"
GIB = 2**30
NAMES = ("step", "total_steps", "epoch", "loss", "eval_loss", "learning_rate", "tokens_per_second",
         "eta_seconds", "gpu_memory_bytes", "resumes")  # fmt: skip

# Limits on what rank 0 may send: the trainer's own answer is a few KiB.
DEADLINE_SECONDS = 5.0  # the whole exchange, wall clock, however slowly the bytes come
MAX_BODY = 2**20
MAX_LINES = 1000  # lines of the trainer's own gauges kept for parsing (it serves about 30)
MAX_LINE = 512  # characters of one such line
MAX_COUNT = 2**31 - 1  # steps and resumes: what a status integer holds with room to spare
MAX_SECONDS = 10 * 365 * 86400  # an ETA beyond ten years is no estimate
MAX_READING = 1e15  # losses, rates, bytes: larger is no reading


class ScrapeError(RuntimeError):
    """The endpoint could not be read or did not speak Prometheus text."""


def trainer_lines(text: str) -> str:
    """Only the lines about the trainer's gauges (samples, HELP and TYPE), at most MAX_LINES of at
    most MAX_LINE characters: whatever else the endpoint serves never reaches the parser."""
    kept: list[str] = []
    for line in text.splitlines():
        bare = line.lstrip("# ").removeprefix("HELP ").removeprefix("TYPE ")
        if not bare.startswith(PREFIX):
            continue
        if len(line) > MAX_LINE:
            raise ScrapeError(f"a line about {PREFIX}* is longer than {MAX_LINE} characters")
        kept.append(line)
        if len(kept) > MAX_LINES:
            raise ScrapeError(f"more than {MAX_LINES} lines about {PREFIX}*")
    return "\n".join(kept) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """The trainer's gauges by short name (`step`, `loss`, ...); ScrapeError for text that is not
    the Prometheus exposition format or carries none of them. Values that are not finite, or too
    large to be a reading, are left out (a step count out of range is an error)."""
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(trainer_lines(text)):
            for sample in family.samples:
                if sample.name.startswith(PREFIX) and not sample.labels:
                    values[sample.name[len(PREFIX) :]] = float(sample.value)
    except ScrapeError:
        raise
    except Exception as error:  # noqa: BLE001 - a third-party parser fed untrusted text
        raise ScrapeError(f"not Prometheus text: {_short(error)}") from None
    values = {k: v for k, v in values.items() if k in NAMES and math.isfinite(v) and abs(v) <= MAX_READING}
    if "step" not in values:
        raise ScrapeError(f"no {PREFIX}step gauge in the response (or its value is out of range)")
    if not 0 <= values["step"] <= MAX_COUNT:
        raise ScrapeError(f"{PREFIX}step {values['step']:g} is out of range")
    return values


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:200]


def _count(value: float) -> int:
    """A count as an int within [0, MAX_COUNT]."""
    return int(min(max(value, 0), MAX_COUNT))


@dataclass(frozen=True)
class Reading:
    """One scrape: status.progress and status.metrics fragments (wire form)."""

    progress: dict[str, Any]
    metrics: dict[str, float]
    resumes: int = 0  # times the trainer went on from a checkpoint


def progress_from(values: dict[str, float], now: datetime) -> dict[str, Any]:
    step = _count(values["step"])
    progress: dict[str, Any] = {"step": step}
    total = _count(values.get("total_steps", 0))
    if total > 0:
        progress["totalSteps"] = total
        progress["percent"] = max(0, min(100, math.floor(100 * step / total)))
    if 0 < values.get("epoch", 0) <= MAX_COUNT:
        progress["epoch"] = round(values["epoch"], 3)
    eta = values.get("eta_seconds", 0)
    if 0 < eta <= MAX_SECONDS and (total == 0 or step < total):
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
    return Reading(progress_from(values, now), metrics_from(values), _count(values.get("resumes", 0)))


def apply_reading(status: dict[str, Any], reading: Reading) -> dict[str, Any]:
    """status with the reading folded in: progress replaced, metrics updated key by key (a loss
    measured earlier stays until a new one is read), restarts raised to the trainer's resumes (a
    preempted pod is left out of the Job's failures, but the trainer knows it went on)."""
    out = dict(status)
    out["progress"] = dict(reading.progress)
    stored = status.get("metrics")
    out["metrics"] = {**(stored if isinstance(stored, dict) else {}), **reading.metrics}
    stored = status.get("restarts")
    known = stored if isinstance(stored, int) and not isinstance(stored, bool) and 0 <= stored <= MAX_COUNT else 0
    out["restarts"] = max(known, reading.resumes)
    return out


def metrics_url(pod: dict[str, Any] | None, port: int, annotations: dict[str, str], allow_override: bool) -> str | None:
    """Where rank 0 serves its metrics; None when there is nothing to scrape. An overriding
    annotation (a test hook, often a loopback address) must at least be a plain http(s) URL: no
    credentials, no control characters or spaces."""
    override = annotations.get(METRICS_URL_ANNOTATION)
    if allow_override and override:
        return override if plain_http_url(override) else None
    ip = ((pod or {}).get("status") or {}).get("podIP")
    if not port or not ip:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


def plain_http_url(url: str) -> bool:
    if len(url) > 2048 or re.search(r"[\x00-\x20\x7f\\]", url):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc


def fetch(url: str, timeout: float = DEADLINE_SECONDS, max_bytes: int = MAX_BODY) -> str:
    """GET the endpoint within `timeout` seconds for the whole exchange (not per read: a server
    dripping bytes is cut off at the deadline) and at most `max_bytes` of body; no redirects.
    ScrapeError with a short reason on any failure."""
    try:
        response = request("GET", url, deadline=timeout, max_bytes=max_bytes, headers={"accept": "text/plain"})
    except HttpError as error:
        raise ScrapeError(str(error)) from None
    if response.status != 200:
        raise ScrapeError(f"HTTP {response.status} from {url}")
    return response.text

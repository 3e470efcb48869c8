"""Prometheus metrics of `kubetune serve`, in their own registry (no process-global state).

Every label takes a bounded set of values: `model` is the base, a resident adapter (at most
--max-adapters) or "unknown", and an adapter's series are removed when it is unloaded; failed
loads are counted by a fixed `reason`, never by the name or path a client sent.
"""

from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "kubetune_serve_"
# Why a load failed: not_allowed (the source refused, whatever the cause), invalid (not a servable
# LoRA adapter, or a bad request), conflict (load_inplace over a served adapter), full (maxAdapters),
# busy (every load worker taken), timeout (--load-timeout), error (anything else).
LOAD_FAILURE_REASONS = ("not_allowed", "invalid", "conflict", "full", "busy", "timeout", "error")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            PREFIX + "requests",
            "API requests answered, by endpoint, model and HTTP status.",
            ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens processed.", ["model"], registry=self.registry
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated.", ["model"], registry=self.registry
        )
        self.latency = Histogram(
            PREFIX + "request_duration_seconds",
            "Time to answer a request, by endpoint and model (the base or an adapter).",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            PREFIX + "queue_wait_seconds",
            "Time a generation waited for the model before its prompt was read, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from a generation's arrival at the model to its first token, queue included, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # What a HorizontalPodAutoscaler scales on (a Pods metric averaged over the replicas).
        self.requests_in_flight = Gauge(
            PREFIX + "requests_in_flight",
            "Generation requests waiting for or running on the model now.",
            registry=self.registry,
        )
        self.loaded_adapters = Gauge(PREFIX + "loaded_adapters", "Adapters loaded now.", registry=self.registry)
        self.adapter_loaded = Gauge(
            PREFIX + "adapter_loaded",
            "1 per adapter loaded now; batching: grouped, or by adapter (and why).",
            ["model", "batching"],
            registry=self.registry,
        )
        self.load_failures = Counter(
            PREFIX + "adapter_load_failures",
            "Adapter loads refused, by reason: " + ", ".join(LOAD_FAILURE_REASONS) + ".",
            ["reason"],
            registry=self.registry,
        )
        for reason in LOAD_FAILURE_REASONS:
            self.load_failures.labels(reason)
        self.loads_in_flight = Gauge(
            PREFIX + "adapter_loads_in_flight", "Adapter loads being fetched or attached now.", registry=self.registry
        )
        self._series: defaultdict[str, set[tuple]] = defaultdict(set)  # model -> (metric, labels) it has
        self.ready = Gauge(
            PREFIX + "ready", "1 once the base model and the startup adapters are loaded.", registry=self.registry
        )

    def request(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()
        self.latency.labels(endpoint, model).observe(seconds)
        self._series[model].update({(self.requests, (endpoint, model, str(status))), (self.latency, (endpoint, model))})

    def tokens(self, model: str, prompt: int, generated: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.generation_tokens.labels(model).inc(generated)
        self._series[model].update({(self.prompt_tokens, (model,)), (self.generation_tokens, (model,))})

    def timings(self, model: str, queued: float, first_token: float | None) -> None:
        self.queue_wait.labels(model).observe(queued)
        self._series[model].add((self.queue_wait, (model,)))
        if first_token is not None:
            self.time_to_first_token.labels(model).observe(first_token)
            self._series[model].add((self.time_to_first_token, (model,)))

    def loaded(self, adapters) -> None:
        """The adapters loaded now (engine.Adapter: name, grouping): the count and one series each."""
        self.loaded_adapters.set(len(adapters))
        for adapter in adapters:
            series = (self.adapter_loaded, (adapter.name, adapter.grouping))
            for stale in [s for s in self._series[adapter.name] if s[0] is self.adapter_loaded and s != series]:
                self._series[adapter.name].discard(stale)  # replaced by an adapter batched otherwise
                self.adapter_loaded.remove(*stale[1])
            self.adapter_loaded.labels(*series[1]).set(1)
            self._series[adapter.name].add(series)

    def load_failed(self, reason: str) -> None:
        self.load_failures.labels(reason if reason in LOAD_FAILURE_REASONS else "error").inc()

    def forget(self, model: str) -> None:
        """Drop every series of an adapter that was unloaded: names come and go, series must not pile up."""
        for metric, labels in self._series.pop(model, set()):
            try:
                metric.remove(*labels)
            except KeyError:
                pass

"""Prometheus metrics of `kubetune serve`, in their own registry (no process-global state)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "kubetune_serve_"
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
        self.loaded_adapters = Gauge(PREFIX + "loaded_adapters", "Adapters loaded now.", registry=self.registry)
        self.load_failures = Counter(
            PREFIX + "adapter_load_failures",
            "Adapter loads refused, by adapter name.",
            ["adapter"],
            registry=self.registry,
        )
        self.ready = Gauge(
            PREFIX + "ready", "1 once the base model and the startup adapters are loaded.", registry=self.registry
        )

    def request(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()
        self.latency.labels(endpoint, model).observe(seconds)

    def tokens(self, model: str, prompt: int, generated: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.generation_tokens.labels(model).inc(generated)

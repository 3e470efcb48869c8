"""Prometheus metrics of a training run, served by rank 0 for the operator to scrape."""

from prometheus_client import CollectorRegistry, Gauge, start_http_server

PREFIX = "kubetune_train_"

GAUGES = {
    "step": "Optimizer steps done.",
    "total_steps": "Optimizer steps planned.",
    "epoch": "Fractional epoch.",
    "loss": "Training loss of the last optimizer step (mean per trainable token).",
    "eval_loss": "Validation loss of the last evaluation.",
    "learning_rate": "Current learning rate.",
    "tokens_per_second": "Input tokens processed per second, all ranks together.",
    "samples_per_second": "Sequences processed per second, all ranks together.",
    "gpu_memory_bytes": "Peak GPU memory allocated on rank 0.",
    "eta_seconds": "Estimated seconds until the last step.",
    "resumes": "Times this run went on from a checkpoint (after a preemption or a retried failure).",
    "trainable_parameters": "Parameters that receive gradients.",
    "total_parameters": "Parameters in the model.",
}


class MetricsExporter:
    """Rank 0's Prometheus gauges of one run (what the operator scrapes), in their own registry (no
    process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._gauges = {name: Gauge(PREFIX + name, text, registry=self.registry) for name, text in GAUGES.items()}
        self._server = None

    def serve(self, port: int) -> None:
        """Expose /metrics on `port` (0: don't)."""
        if port:
            self._server, _ = start_http_server(port, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def set(self, **values: float | None) -> None:
        for name, value in values.items():
            if value is not None:
                self._gauges[name].set(value)

    def value(self, name: str) -> float | None:
        return self.registry.get_sample_value(PREFIX + name)

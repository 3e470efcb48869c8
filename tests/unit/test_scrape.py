"""Rank 0's Prometheus text → status.progress and status.metrics; unreadable answers are errors
the operator counts, never crashes on."""

from datetime import UTC, datetime

import pytest

from kubetune_operator import scrape

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def exposition(**values) -> str:
    lines = []
    for name, value in values.items():
        metric = f"kubetune_train_{name}"
        lines += [f"# HELP {metric} x", f"# TYPE {metric} gauge", f"{metric} {value}"]
    lines.append('python_info{implementation="CPython"} 1.0')  # other metrics are ignored
    return "\n".join(lines) + "\n"


MID_RUN = exposition(step=420, total_steps=1200, epoch=1.05, loss=1.2149, eval_loss=1.34, learning_rate=0.000123456,
                     tokens_per_second=5310.04, eta_seconds=3600.4, gpu_memory_bytes=16.2 * 2**30)  # fmt: skip


def test_a_reading_mid_run():
    reading = scrape.reading_from(MID_RUN, NOW)
    eta = "2026-01-02T04:04:05Z"
    assert reading.progress == {"step": 420, "totalSteps": 1200, "percent": 35, "epoch": 1.05, "eta": eta}
    assert reading.metrics == {"trainLoss": 1.2149, "evalLoss": 1.34, "learningRate": 0.0001235,
                               "tokensPerSecond": 5310.0, "gpuMemoryGiB": 16.2}  # fmt: skip


def test_gauges_at_zero_before_the_first_step_are_not_readings():
    reading = scrape.reading_from(exposition(step=0, total_steps=60, loss=0, eval_loss=0, learning_rate=0.001,
                                             tokens_per_second=0, eta_seconds=0, epoch=0), NOW)  # fmt: skip
    assert reading.progress == {"step": 0, "totalSteps": 60, "percent": 0}
    assert reading.metrics == {}


def test_percent_is_capped_and_eta_dropped_at_the_end():
    progress = scrape.reading_from(exposition(step=70, total_steps=60, eta_seconds=5), NOW).progress
    assert progress["percent"] == 100 and "eta" not in progress


@pytest.mark.parametrize("text", ["<html>502 Bad Gateway</html>", "kubetune_train_step {", "other_metric 1\n", ""])
def test_unreadable_answers_raise_scrape_error(text):
    with pytest.raises(scrape.ScrapeError):
        scrape.reading_from(text, NOW)


def test_apply_reading_replaces_progress_and_updates_metrics():
    status = {"phase": "Running", "progress": {"step": 1, "eta": "x"}, "metrics": {"evalLoss": 2.0, "trainLoss": 3.0}}
    reading = scrape.Reading({"step": 5}, {"trainLoss": 1.0})
    assert scrape.apply_reading(status, reading) == {"phase": "Running", "progress": {"step": 5}, "restarts": 0,
                                                     "metrics": {"evalLoss": 2.0, "trainLoss": 1.0}}  # fmt: skip


def test_the_trainers_resumes_raise_restarts_and_never_lower_them():
    # a preempted pod is left out of the Job's failures; rank 0 knows the run went on from a checkpoint
    reading = scrape.reading_from(exposition(step=30, total_steps=200, resumes=1), NOW)
    assert reading.resumes == 1
    assert scrape.apply_reading({"restarts": 0}, reading)["restarts"] == 1
    assert scrape.apply_reading({"restarts": 3}, reading)["restarts"] == 3


def test_metrics_url():
    pod = {"status": {"podIP": "10.1.2.3"}}
    assert scrape.metrics_url(pod, 9090, {}, False) == "http://10.1.2.3:9090/metrics"
    assert scrape.metrics_url({"status": {"podIP": "fd00::1"}}, 9090, {}, False) == "http://[fd00::1]:9090/metrics"
    assert scrape.metrics_url(pod, 0, {}, False) is None and scrape.metrics_url(None, 9090, {}, False) is None
    override = {scrape.METRICS_URL_ANNOTATION: "http://127.0.0.1:1234/metrics"}
    assert scrape.metrics_url(pod, 9090, override, False) == "http://10.1.2.3:9090/metrics"  # not allowed: ignored
    assert scrape.metrics_url(None, 9090, override, True) == "http://127.0.0.1:1234/metrics"


def test_fetch_reports_connection_errors_as_scrape_errors():
    with pytest.raises(scrape.ScrapeError, match="ConnectError"):
        scrape.fetch("http://127.0.0.1:9/metrics", timeout=1)

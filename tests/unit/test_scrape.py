"""Rank 0's Prometheus text → status.progress and status.metrics; unreadable answers are errors
the operator counts, never crashes on."""

import math
import time
import tracemalloc
from datetime import UTC, datetime

import pytest

from kubetune_operator import scrape
from tests.hostile_http import drip, endpoint, huge

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


# --- hostile endpoints: a total deadline, a size cap, bounded parsing -----------------------------


def test_fetch_has_a_total_deadline_against_a_dripping_server():
    with endpoint(drip) as url:
        started = time.monotonic()
        with pytest.raises(scrape.ScrapeError, match="within 1s"):
            scrape.fetch(url, timeout=1)
        assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "no-length"])
def test_fetch_caps_the_body_and_stays_small_in_memory(length):
    with endpoint(lambda h, stop: huge(h, stop, length=length)) as url:
        tracemalloc.start()
        try:
            with pytest.raises(scrape.ScrapeError, match="cap"):
                scrape.fetch(url, timeout=5)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 8 * 2**20  # the body is 48 MiB; what is held stays near the 1 MiB cap


def test_fetch_reads_a_normal_answer_and_refuses_a_redirect():
    def ok(handler, stop):
        body = MID_RUN.encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def redirect(handler, stop):
        handler.send_response(302)
        handler.send_header("Location", "http://169.254.169.254/latest/meta-data/")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    with endpoint(ok) as url:
        assert scrape.reading_from(scrape.fetch(url, timeout=5), NOW).progress["step"] == 420
    with endpoint(redirect) as url, pytest.raises(scrape.ScrapeError, match="302"):
        scrape.fetch(url, timeout=5)


@pytest.mark.parametrize(
    "values",
    [
        {"step": 1e300, "total_steps": 1e300},
        {"step": 5, "total_steps": 10, "eta_seconds": 1e300},
        {"step": 5, "eta_seconds": 1e18},
        {"step": -7, "total_steps": -1, "epoch": -3, "resumes": 1e300},
        {"step": 3, "loss": 1e308, "gpu_memory_bytes": 1.7e308, "learning_rate": 1e-320},
    ],
)
def test_readings_out_of_range_never_raise_and_stay_patchable(values):
    try:
        reading = scrape.reading_from(exposition(**values), NOW)
    except scrape.ScrapeError:
        return
    for part in (reading.progress, reading.metrics):
        for value in part.values():
            assert isinstance(value, str) or (math.isfinite(value) and abs(value) < 2**53)
    assert 0 <= reading.resumes < 2**31
    assert reading.progress["step"] >= 0


def test_parsing_is_bounded_in_lines_and_samples():
    many = "".join(f'kubetune_train_other{{i="{i}"}} 1\n' for i in range(200_000)) + "kubetune_train_step 3\n"
    started = time.monotonic()
    try:
        values = scrape.parse_metrics(many)
        assert values.get("step") in (None, 3)
    except scrape.ScrapeError:
        pass
    assert time.monotonic() - started < 2
    with pytest.raises(scrape.ScrapeError):
        scrape.parse_metrics("kubetune_train_step " + "9" * 100_000 + "\n")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "http://user:pw@127.0.0.1/metrics", "http://127.0.0.1/\n", "x"])
def test_an_override_that_is_no_plain_http_url_is_not_scraped(url):
    annotations = {scrape.METRICS_URL_ANNOTATION: url}
    assert scrape.metrics_url({"status": {"podIP": "10.1.2.3"}}, 9090, annotations, True) is None

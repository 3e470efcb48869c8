"""The operator as the chart runs it (`kubetune operator`, a process of its own) under load and
against hostile pods: 50 running FineTuneJobs scraped every second, two of whose rank 0 serve an
endless body and two of whose drip a few bytes a second. The operator's memory stays under the
chart's limit all along (a process over it is what the kubelet kills), and the status of every
other job keeps moving while the hostile scrapes run into their deadline and size cap.

Rank 0's metrics come from a server on 127.0.0.1 named in the annotation kubetune.io/metrics-url,
which the operator honours only when started with --allow-metrics-url-annotation (kwok pods have
fake IPs). Every wait is bounded; the test takes about a minute.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from kubetune_operator.scrape import METRICS_URL_ANNOTATION

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
FTJ_API = "/apis/kubetune.io/v1alpha1"
JOBS = 50
HOSTILE = {"huge": 2, "drip": 2}  # the rest serve good metrics
SCRAPE_INTERVAL = "1"
HUGE_BYTES = 300 * 2**20  # what the hostile endpoint offers (the 300 MB)
WAIT = 90


def chart_memory_limit() -> int:
    """helm/kubetune/values.yaml's resources.limits.memory, in bytes."""
    values = yaml.safe_load((REPO / "helm" / "kubetune" / "values.yaml").read_text())
    text = str(values["resources"]["limits"]["memory"])
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


class Rank0s:
    """Rank 0 of every job, on 127.0.0.1: /ok serves the trainer's gauges with a step that grows
    with time; /huge an endless body (up to HUGE_BYTES); /drip 8 bytes every half second."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.started = time.monotonic()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):  # noqa: N802 - http.server's name
                try:
                    if self.path.startswith("/huge"):
                        owner.huge(self)
                    elif self.path.startswith("/drip"):
                        owner.drip(self)
                    else:
                        owner.ok(self)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass  # the operator hung up: what it should do

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def step(self) -> int:
        return 1 + int((time.monotonic() - self.started) * 4)

    def ok(self, handler: BaseHTTPRequestHandler) -> None:
        body = (
            f"kubetune_train_step {self.step()}.0\nkubetune_train_total_steps 100000.0\n"
            "kubetune_train_loss 1.5\nkubetune_train_epoch 0.1\n"
        ).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain; version=0.0.4")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def huge(self, handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain; version=0.0.4")
        handler.end_headers()  # no Content-Length: the body ends when the connection does
        chunk = b"kubetune_train_step 1.0\n" * (2**20 // 24)
        sent = 0
        while sent < HUGE_BYTES and not self.stop.is_set():
            handler.wfile.write(chunk)
            sent += len(chunk)

    def drip(self, handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain; version=0.0.4")
        handler.end_headers()
        deadline = time.monotonic() + WAIT
        while not self.stop.is_set() and time.monotonic() < deadline:
            handler.wfile.write(b"# drip\n")
            handler.wfile.flush()
            self.stop.wait(0.5)

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def cpu_job(name: str, metrics_url: str) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "annotations": {METRICS_URL_ANNOTATION: metrics_url}},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"uri": "s3://datasets/chat.jsonl", "format": "chat"},
            "method": {"type": "lora"},
            "hyperparameters": {"maxSteps": 100, "globalBatchSize": 8, "microBatchSize": 8, "precision": "fp32"},
            "resources": {"gpusPerNode": 0, "cpu": "50m", "memory": "64Mi"},
            "output": {"uri": f"s3://adapters/{name}"},
        },
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Rss:
    """The most resident memory a process had, polled every 0.1 s (VmRSS, bytes)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.wait(0.1):
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            for line in status.splitlines():
                if line.startswith(("VmRSS:", "VmHWM:")):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


@pytest.fixture
def rank0s() -> Iterator[Rank0s]:
    servers = Rank0s()
    yield servers
    servers.close()


@pytest.fixture
def operator_process(cluster, crds, namespace, tmp_path) -> Iterator[subprocess.Popen]:
    """`kubetune operator -n NAMESPACE`, a separate process, as in the chart's Deployment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
    env.update(
        KUBECONFIG=str(cluster.kubeconfig),
        KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS=SCRAPE_INTERVAL,
        KUBETUNE_TRAINER_IMAGE="kubetune/trainer:test",
        PYTHONUNBUFFERED="1",
    )
    command = [sys.executable, "-m", "kubetune", "operator", "-n", namespace, "--allow-metrics-url-annotation"]
    command += ["--metrics-port", str(free_port())]
    log = tmp_path / "operator.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    process.log = log  # type: ignore[attr-defined]
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def jobs_by_name(cluster, namespace: str) -> dict[str, dict]:
    status, body = cluster.api("GET", f"{FTJ_API}/namespaces/{namespace}/finetunejobs", timeout=30)
    assert status == 200, body
    return {item["metadata"]["name"]: item for item in body["items"]}


def step_of(obj: dict) -> int:
    return int(((obj.get("status") or {}).get("progress") or {}).get("step") or 0)


def running_message(obj: dict) -> str:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c.get("message", "") for c in conditions if c["type"] == "Running"), "")


def test_memory_stays_under_the_chart_limit_and_other_jobs_keep_updating(cluster, namespace, rank0s, operator_process):
    limit = chart_memory_limit()
    rss = Rss(operator_process.pid)
    kinds = [kind for kind, count in HOSTILE.items() for _ in range(count)]
    kinds += ["ok"] * (JOBS - len(kinds))
    names = {f"load-{i:02d}": kind for i, kind in enumerate(kinds)}
    good = sorted(name for name, kind in names.items() if kind == "ok")
    hostile = sorted(name for name, kind in names.items() if kind != "ok")

    def log_tail() -> str:
        return operator_process.log.read_text()[-4000:]

    def wait(what: str, check, timeout: float = WAIT):
        deadline = time.monotonic() + timeout
        while True:
            assert operator_process.poll() is None, f"the operator exited:\n{log_tail()}"
            value = check()
            if value:
                return value
            peak = f"the operator's RSS peaked at {rss.peak / 2**20:.0f} MiB so far"
            late = f"timed out after {timeout:.0f} s waiting for {what} ({peak})"
            assert time.monotonic() < deadline, f"{late}\n{log_tail()}"
            time.sleep(0.5)

    try:
        cluster.apply(
            *[cpu_job(name, f"{rank0s.base}/{kind}/{name}") for name, kind in names.items()], namespace=namespace
        )

        # Every good job's status shows a scraped step; the hostile ones are being scraped too.
        def all_good_scraped():
            jobs = jobs_by_name(cluster, namespace)
            return jobs if all(step_of(jobs.get(name, {})) > 0 for name in good) else None

        first = wait("every good job's progress scraped", all_good_scraped)

        # A few seconds on, every good job has moved on, while the hostile scrapes keep running
        # into their deadline (drip) and size cap (huge) each round.
        def all_good_moved_on():
            jobs = jobs_by_name(cluster, namespace)
            return jobs if all(step_of(jobs[name]) > step_of(first[name]) for name in good) else None

        later = wait("every good job's progress updated again", all_good_moved_on, timeout=45)
        for name in hostile:
            assert step_of(later[name]) == 0, (name, later[name].get("status"))
            assert "metrics unavailable" in running_message(later[name]), (name, running_message(later[name]))
        assert operator_process.poll() is None, log_tail()
    finally:
        rss.close()
    assert 0 < rss.peak < limit, f"the operator's RSS peaked at {rss.peak / 2**20:.0f} MiB (limit {limit / 2**20:.0f})"

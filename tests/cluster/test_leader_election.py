"""Two real operator processes (`kubetune operator --leader-elect`) against the real API server:
exactly one leads (the Lease says which), the standby answers its liveness URL meanwhile, and

* the leader SIGKILLed while FineTuneJobs are being created: the standby takes the Lease once it
  expires and finishes the work, with every job's ConfigMap, Service and Job created once, every job
  Admitted and in the phase its spec leads to, and one more transition on the Lease;
* the leader SIGTERMed: it releases the Lease on its way out and the standby leads at its next
  retry, well inside the lease;
* a leader that finds the Lease held by another exits at once (code 3), reconciling no more.

Short election timings (lease 8 s, renew deadline 6 s, retry 1 s) keep the test quick while
leaving a leader on two busy cores room to renew; the defaults are client-go's 15/10/2. Every
process is killed in teardown, every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubetune_operator.state import ALLOW_METRICS_URL_ENV
from tests.cluster.fixtures import harness
from tests.cluster.test_operator import SCRAPE_INTERVAL, TOLERATION, cond, create_ftj, get_ftj, gpu_job, wait_condition

pytestmark = pytest.mark.cluster

LEASE = "kubetune-operator"
LEASE_S, RENEW_S, RETRY_S = 8, 6, 1
START = 180  # seconds for a process to import kopf and take part (a loaded 2-core machine is slow)
WAIT = 90


@dataclass
class Operator:
    name: str  # its POD_NAME: the Lease's holderIdentity starts with it
    proc: subprocess.Popen
    liveness_port: int
    metrics_port: int
    log: Path

    def output(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def leader_gauge(self) -> float | None:
        """kubetune_operator_leader on its metrics port (None while nothing answers)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        [value] = [line.split()[1] for line in text.splitlines() if line.startswith("kubetune_operator_leader ")]
        return float(value)

    def liveness(self) -> tuple[int, dict | str] | None:
        """(status, body) of its liveness URL; None while nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=5) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")
        except OSError:
            return None
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")


@pytest.fixture
def operators(cluster, crds, namespace, tmp_path):
    """start(name) runs one `kubetune operator --leader-elect` for `namespace`; all are SIGKILLed
    (their process groups) in teardown, whatever happened."""
    started: list[Operator] = []
    env = dict(
        os.environ,
        KUBECONFIG=str(cluster.kubeconfig),
        KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS=SCRAPE_INTERVAL,
        KUBETUNE_TRAINER_IMAGE="kubetune/trainer:test",
        PYTHONUNBUFFERED="1",
    )
    env.pop(ALLOW_METRICS_URL_ENV, None)

    def start(name: str) -> Operator:
        port, metrics_port = harness.free_port(), harness.free_port()
        log = tmp_path / f"{name}.log"
        argv = [
            sys.executable, "-m", "kubetune", "operator", "-n", namespace,
            "--leader-elect", "--leader-elect-namespace", namespace,
            "--leader-elect-lease-duration", str(LEASE_S), "--leader-elect-renew-deadline", str(RENEW_S),
            "--leader-elect-retry-period", str(RETRY_S),
            "--metrics-port", str(metrics_port), "--liveness", f"http://127.0.0.1:{port}/healthz",
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**env, "POD_NAME": name},
                cwd=harness.REPO,
                start_new_session=True,
            )
        started.append(Operator(name, proc, port, metrics_port, log))
        return started[-1]

    yield start
    for op in started:
        if op.proc.poll() is None:
            os.killpg(op.proc.pid, signal.SIGKILL)
        try:
            op.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        # Shown by pytest when the test failed.
        print(f"--- {op.name} (exit {op.proc.returncode}):\n{op.output(20000)}", file=sys.stderr)


def small_job(name: str, suspend: bool) -> dict:
    """test_operator's job on a sliver of CPU that fits any node (GPUs are shared with other tests)."""
    job = gpu_job(name, suspend=suspend)
    job["spec"]["resources"] = {"gpusPerNode": 0, "cpu": "100m", "memory": "128Mi", "tolerations": [TOLERATION]}
    return job


def lease(cluster, ns: str) -> dict:
    status, body = cluster.api("GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{LEASE}")
    return body if status == 200 else {}


def holder(cluster, ns: str) -> str:
    return (lease(cluster, ns).get("spec") or {}).get("holderIdentity") or ""


def wait_leader(cluster, ns: str, ops: list[Operator], timeout: float = START) -> tuple[Operator, Operator]:
    """(leader, standby) once the Lease names one of `ops` and the standby answers as a standby."""

    def check():
        for op in ops:
            assert op.proc.poll() is None, f"{op.name} exited {op.proc.returncode}:\n{op.output()}"
        leading = [op for op in ops if holder(cluster, ns).startswith(op.name + "_")]
        if not leading:
            return None
        [standby] = [op for op in ops if op is not leading[0]]
        probe = standby.liveness()  # it has seen the holder, and says so
        return (leading[0], standby) if probe == (200, {"leader": False, "holder": holder(cluster, ns)}) else None

    try:
        return cluster.wait_for(check, "one operator leads and the other stands by", timeout=timeout)
    except Exception:
        for op in ops:
            print(f"--- {op.name}\n{op.output()}", file=sys.stderr)
        raise


def wait_alive(cluster, op: Operator, timeout: float = 60) -> dict | str:
    """The body of `op`'s liveness URL once it answers 200 (kopf's probe starts with kopf)."""

    def check():
        probe = op.liveness()
        return probe if probe and probe[0] == 200 else None

    return cluster.wait_for(check, f"{op.name} answers its liveness URL", timeout)[1]


def wait_holder(cluster, ns: str, op: Operator, timeout: float) -> float:
    """The monotonic time at which the Lease was seen naming `op` (ClusterError after `timeout`)."""
    cluster.wait_for(lambda: holder(cluster, ns).startswith(op.name + "_"), f"{op.name} holds the Lease", timeout, 0.1)
    return time.monotonic()


def names_in(cluster, ns: str, path: str) -> list[str]:
    status, body = cluster.api("GET", path.format(ns=ns))
    assert status == 200, body
    return sorted(item["metadata"]["name"] for item in body["items"])


def test_the_standby_takes_over_from_a_killed_leader_with_nothing_twice_and_nothing_lost(cluster, namespace, operators):
    ops = [operators("op-a"), operators("op-b")]
    first, standby = wait_leader(cluster, namespace, ops)
    assert standby.liveness() == (200, {"leader": False, "holder": holder(cluster, namespace)})
    assert lease(cluster, namespace)["spec"]["leaseTransitions"] == 0
    assert lease(cluster, namespace)["spec"]["leaseDurationSeconds"] == LEASE_S

    # Jobs arrive while the leader dies: half of them suspended (their phase: Suspended), half not
    # (Running once kwok runs their pod).
    names = [f"ha-{i:02d}" for i in range(12)]
    killed_at = None
    for i, name in enumerate(names):
        create_ftj(cluster, namespace, small_job(name, suspend=bool(i % 2)))
        if i == 4:
            os.killpg(first.proc.pid, signal.SIGKILL)
            killed_at = time.monotonic()
        time.sleep(0.4)
    first.proc.wait(timeout=30)

    takeover = wait_holder(cluster, namespace, standby, timeout=LEASE_S + 2 * RETRY_S + 10) - killed_at
    print(f"\ntakeover {takeover:.1f} s after the SIGKILL (lease {LEASE_S} s, retry {RETRY_S} s)", file=sys.stderr)
    assert takeover <= LEASE_S + 2 * RETRY_S + 2, standby.output()
    assert lease(cluster, namespace)["spec"]["leaseTransitions"] == 1

    def settled(name: str, i: int):
        obj = get_ftj(cluster, namespace, name)
        expected = "Suspended" if i % 2 else "Running"
        done = obj and cond(obj, "Admitted").get("status") == "True" and obj["status"].get("phase") == expected
        return obj if done else None

    try:
        finished = [cluster.wait_for(lambda n=n, i=i: settled(n, i), f"{n} settled", WAIT) for i, n in enumerate(names)]
    except Exception:
        print(standby.output(), file=sys.stderr)
        for name in names:
            print(name, json.dumps((get_ftj(cluster, namespace, name) or {}).get("status")), file=sys.stderr)
        for pod in cluster.pods(namespace):
            print(pod["metadata"]["name"], pod["spec"].get("nodeName"), json.dumps(pod["status"]), file=sys.stderr)
        raise

    # Every child once, owned by its FineTuneJob; nothing else created.
    uids = {obj["metadata"]["name"]: obj["metadata"]["uid"] for obj in finished}
    assert names_in(cluster, namespace, "/apis/batch/v1/namespaces/{ns}/jobs") == names
    assert names_in(cluster, namespace, "/api/v1/namespaces/{ns}/services") == [f"{n}-workers" for n in names]
    configmaps = [n for n in names_in(cluster, namespace, "/api/v1/namespaces/{ns}/configmaps") if n.startswith("ha-")]
    assert configmaps == [f"{n}-trainer-config" for n in names]
    for name in names:
        job = cluster.get("job", name, namespace)
        assert [r["uid"] for r in job["metadata"]["ownerReferences"]] == [uids[name]]
        assert job["spec"].get("suspend", False) is bool(names.index(name) % 2)
    running = [n for i, n in enumerate(names) if not i % 2]
    pods = cluster.pods(namespace)
    assert sorted(p["metadata"]["labels"]["kubetune.io/job"] for p in pods) == running  # one pod each
    assert standby.proc.poll() is None
    assert "leader" not in wait_alive(cluster, standby)  # kopf's own probe now, on the same port


def test_sigterm_releases_the_lease_and_the_standby_leads_at_once(cluster, namespace, operators):
    ops = [operators("op-c"), operators("op-d")]
    first, standby = wait_leader(cluster, namespace, ops)
    wait_alive(cluster, first)  # the leader's liveness is kopf's
    assert (first.leader_gauge(), standby.leader_gauge()) == (1, 0)
    create_ftj(cluster, namespace, small_job("before-sigterm", suspend=False))  # the leader is reconciling
    wait_condition(cluster, namespace, "before-sigterm", "Admitted", timeout=WAIT)

    first.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    took = wait_holder(cluster, namespace, standby, timeout=LEASE_S + 10) - sent
    print(f"\nstandby led {took:.1f} s after the SIGTERM", file=sys.stderr)
    assert first.proc.wait(timeout=30) == 0, first.output()
    assert "released the lease" in first.output()
    assert took < LEASE_S / 2, first.output()  # released, not waited out
    spec = lease(cluster, namespace)["spec"]
    assert spec["leaseTransitions"] == 1 and spec["leaseDurationSeconds"] == LEASE_S
    assert "became leader" in standby.output()
    assert standby.leader_gauge() == 1


def test_a_leader_that_sees_another_holder_stops_at_once(cluster, namespace, operators):
    """Never two leaders: if the Lease names someone else (here the test writes it, as a leader
    paused past its lease would find it), the leader exits at its next renewal with code 3."""
    [only] = [operators("op-e")]
    cluster.wait_for(lambda: holder(cluster, namespace).startswith("op-e_"), "op-e leads", START)
    wait_alive(cluster, only)
    taken = lease(cluster, namespace)
    taken["spec"]["holderIdentity"] = "intruder"
    status, body = cluster.api("PUT", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{LEASE}", taken)
    assert status == 200, body
    assert only.proc.wait(timeout=RETRY_S + 20) == 3, only.output()
    lost = [line for line in only.output().splitlines() if "lost the lease" in line]
    assert len(lost) == 1 and f"lease {namespace}/{LEASE} is held by intruder" in lost[0], only.output()
    assert holder(cluster, namespace) == "intruder"  # it did not write again on its way out

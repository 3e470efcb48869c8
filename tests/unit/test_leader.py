"""Leader election on a Lease (operator/kubetune_operator/leader.py): the decisions as pure
functions (free, released, held, expired, renewed, skewed clocks, garbage), the loop against an
in-memory Lease with the API server's optimistic concurrency (a PUT with a stale resourceVersion
is a 409), a fake clock, and the hard exit of a leader that cannot renew, in a real process."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kubetune_operator import leader, metrics
from kubetune_operator.leader import (
    Conflict,
    Decision,
    Elector,
    Record,
    Timing,
    decide,
    expired,
    observe,
    record_of,
)
from tests.examples import REPO

ME, OTHER = "operator-a_1111", "operator-b_2222"
WALL = "2026-01-01T00:00:00.000000Z"


def record(holder: str = OTHER, duration: int = 15, transitions: int = 0, renew: str = WALL) -> Record:
    return Record(holder=holder, duration=duration, acquire_time=WALL, renew_time=renew, transitions=transitions)


def lease_with(**spec) -> dict:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l"}, "spec": spec}


# --- the decisions -------------------------------------------------------------------------------


def test_no_lease_is_created_mine_with_no_transition():
    d = decide(None, ME, now=100.0, wall="T1", duration=15)
    assert d == Decision(
        "create",
        ME,
        {
            "holderIdentity": ME,
            "leaseDurationSeconds": 15,
            "acquireTime": "T1",
            "renewTime": "T1",
            "leaseTransitions": 0,
        },
    )


def test_a_released_lease_is_taken_at_once_with_one_more_transition():
    seen = observe(None, record(holder="", duration=1, transitions=4), now=100.0)
    d = decide(seen, ME, now=100.0, wall="T2", duration=15)
    assert (d.action, d.holder) == ("acquire", ME)
    assert d.spec["leaseTransitions"] == 5 and d.spec["acquireTime"] == d.spec["renewTime"] == "T2"
    assert d.spec["leaseDurationSeconds"] == 15  # ours, not the released 1 s


def test_a_held_lease_is_waited_on_until_it_stands_unchanged_for_its_duration():
    seen = observe(None, record(duration=15, transitions=2), now=100.0)
    assert decide(seen, ME, now=114.999, wall="T", duration=15) == Decision("wait", OTHER)
    taken = decide(seen, ME, now=115.0, wall="T", duration=15)  # exactly the duration: expired
    assert (taken.action, taken.spec["leaseTransitions"], taken.spec["holderIdentity"]) == ("acquire", 3, ME)


def test_any_renewal_restarts_the_wait_and_an_unchanged_record_keeps_its_first_sight():
    first = observe(None, record(renew="T1"), now=100.0)
    assert observe(first, record(renew="T1"), now=110.0) is first  # not renewed: the clock runs on
    renewed = observe(first, record(renew="T2"), now=110.0)
    assert renewed.at == 110.0
    assert not expired(renewed, 124.0) and expired(renewed, 125.0)
    assert observe(first, None, now=111.0) is None  # deleted: create it again


@pytest.mark.parametrize("skew", [timedelta(hours=-1), timedelta(hours=1), timedelta(0)])
def test_the_holders_clock_never_counts_only_ours_does(skew):
    """A renewTime an hour behind (a dead holder, or a slow clock) or ahead (a fast clock) changes
    nothing: a candidate that just started waits the whole duration on its own clock."""
    renew = leader.stamp(datetime(2026, 1, 1, tzinfo=UTC) + skew)
    seen = observe(None, record(renew=renew), now=5.0)
    assert decide(seen, ME, now=5.0, wall=WALL, duration=15).action == "wait"
    assert decide(seen, ME, now=19.9, wall=WALL, duration=15).action == "wait"
    assert decide(seen, ME, now=20.0, wall=WALL, duration=15).action == "acquire"


def test_the_holder_renews_keeping_its_acquire_time_and_transitions():
    seen = observe(None, Record(ME, 15, "ACQ", "OLD", 7), now=100.0)
    d = decide(seen, ME, now=1000.0, wall="NEW", duration=15)  # even when long "expired": it is mine
    assert d == Decision(
        "renew",
        ME,
        {
            "holderIdentity": ME,
            "leaseDurationSeconds": 15,
            "acquireTime": "ACQ",
            "renewTime": "NEW",
            "leaseTransitions": 7,
        },
    )


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({}, Record("", 15, None, None, 0)),
        ({"holderIdentity": 7, "leaseDurationSeconds": "15", "leaseTransitions": -3}, Record("", 15, None, None, 0)),
        ({"holderIdentity": OTHER, "leaseDurationSeconds": 0}, Record(OTHER, 15, None, None, 0)),
        ({"holderIdentity": OTHER, "leaseDurationSeconds": True}, Record(OTHER, 15, None, None, 0)),
        ({"holderIdentity": OTHER, "leaseDurationSeconds": 40, "leaseTransitions": 2, "renewTime": "R"},
         Record(OTHER, 40, None, "R", 2)),
    ],
)  # fmt: skip
def test_a_lease_is_read_leniently_and_a_nonsense_duration_counts_as_ours(spec, expected):
    assert record_of(lease_with(**spec), default_duration=15) == expected
    assert record_of({"spec": "garbage"}, 15) == Record("", 15, None, None, 0)
    assert record_of(None, 15) is None


def test_release_clears_the_holder_for_one_second_and_keeps_the_transitions():
    spec = leader.released_spec(Record(ME, 15, "A", "R", 3), "NOW")
    assert spec == {
        "holderIdentity": "",
        "leaseDurationSeconds": 1,
        "acquireTime": "NOW",
        "renewTime": "NOW",
        "leaseTransitions": 3,
    }


def test_stamp_is_a_lease_microtime_in_utc():
    t = datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=UTC)
    assert leader.stamp(t) == "2026-03-04T05:06:07.000089Z"
    assert leader.stamp(t.astimezone(tz=None)) == "2026-03-04T05:06:07.000089Z"


@pytest.mark.parametrize(
    "timing, message",
    [
        (
            Timing(15, 15, 2),
            "--leader-elect-lease-duration (15s) must be longer than --leader-elect-renew-deadline (15s)",
        ),
        (
            Timing(15, 2.4, 2),
            "--leader-elect-renew-deadline (2.4s) must be longer than 1.2 x --leader-elect-retry-period",
        ),
        (Timing(0, 10, 2), "must be positive"),
        (Timing(15, 10, 0), "must be positive"),
    ],
)
def test_timing_is_checked_as_client_go_does(timing, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        timing.check()
    assert Timing().check() == Timing(15, 10.0, 2.0)
    assert Timing(4, 3, 1).check()


def test_lease_name_namespace_and_identity():
    leader.check_lease_name("kubetune-system", "kubetune-operator")
    with pytest.raises(ValueError, match="--leader-elect-lease 'Bad_Name'"):
        leader.check_lease_name("default", "Bad_Name")
    with pytest.raises(ValueError, match="--leader-elect-namespace 'a.b'"):
        leader.check_lease_name("a.b", "ok")
    assert leader.lease_namespace("explicit", {"KUBETUNE_OPERATOR_NAMESPACE": "ops"}) == "explicit"
    assert leader.lease_namespace(None, {"KUBETUNE_OPERATOR_NAMESPACE": "ops"}) == "ops"
    assert leader.lease_namespace(None, {}) == "default"
    assert leader.make_identity({"POD_NAME": "kubetune-7d9-x2"}, "host", "ab12") == "kubetune-7d9-x2_ab12"
    assert leader.make_identity({}, "host", "ab12") == "host_ab12"
    assert len(leader.make_identity({"POD_NAME": "p" * 1000}, "h", "s")) == leader.IDENTITY_MAX + 2
    assert leader.new_identity() != leader.new_identity()  # two processes on one host differ


# --- the loop, against an in-memory Lease --------------------------------------------------------


class FakeLeaseServer:
    """One Lease with the API server's rules: create is a 409 when it exists, a PUT is a 409 when
    its resourceVersion is stale; every write bumps the version. `fail` makes every call raise
    (an unreachable API); `before_write` runs just before a write is judged (a rival's write)."""

    namespace, name = "ns", "kubetune-operator"

    def __init__(self):
        self.lease: dict | None = None
        self.version = 0
        self.writes: list[dict] = []
        self.fail: Exception | None = None
        self.before_write = None

    def _check(self):
        if self.fail is not None:
            raise self.fail

    def get(self):
        self._check()
        return copy.deepcopy(self.lease)

    def _store(self, lease):
        self.version += 1
        lease = copy.deepcopy(lease)
        lease["metadata"]["resourceVersion"] = str(self.version)
        self.lease = lease
        self.writes.append(copy.deepcopy(lease["spec"]))
        return copy.deepcopy(lease)

    def create(self, lease):
        self._check()
        if self.before_write:
            self.before_write, hook = None, self.before_write
            hook()
        if self.lease is not None:
            raise Conflict("409 AlreadyExists")
        return self._store(lease)

    def replace(self, lease):
        self._check()
        if self.before_write:
            self.before_write, hook = None, self.before_write
            hook()
        if self.lease is None or lease["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise Conflict("409 Conflict: the object has been modified")
        return self._store(lease)

    @property
    def spec(self) -> dict:
        return (self.lease or {}).get("spec") or {}


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.t = start

    def __call__(self) -> float:
        return self.t

    def wall(self) -> str:
        return leader.stamp(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.t))


@pytest.fixture
def server():
    return FakeLeaseServer()


@pytest.fixture
def clock():
    return FakeClock()


def elector(server, clock, identity=ME, timing=None, lost=None) -> Elector:
    return Elector(
        server,
        identity,
        timing or Timing(),
        clock=clock,
        wall=clock.wall,
        on_lost=(lost.append if lost is not None else pytest.fail),
    )


def test_the_first_candidate_creates_the_lease_and_the_second_stands_by(server, clock, caplog):
    caplog.set_level(logging.INFO, logger="kubetune.operator.leader")
    a, b = elector(server, clock, ME), elector(server, clock, OTHER)
    assert a.round() == ME
    assert server.spec["holderIdentity"] == ME and server.spec["leaseTransitions"] == 0
    assert server.lease["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    assert b.round() == ME and len(server.writes) == 1  # b only read
    clock.t += 2
    assert a.round() == ME and server.spec["renewTime"] == clock.wall()  # renewed
    assert server.spec["acquireTime"] == server.writes[0]["acquireTime"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["became leader: lease ns/kubetune-operator, holder operator-a_1111, transitions 0"]


def test_a_standby_takes_over_a_lease_its_holder_stopped_renewing(server, clock):
    a, b = elector(server, clock, ME), elector(server, clock, OTHER)
    a.round()
    for _ in range(7):  # a renews every 2 s: b waits however long that goes on
        clock.t += 2
        a.round()
        assert b.round() == ME
    # a dies. b saw its last renewal just now, and waits the full duration from then.
    clock.t += 14.9
    assert b.round() == ME
    clock.t += 0.1
    assert b.round() == OTHER
    assert (server.spec["holderIdentity"], server.spec["leaseTransitions"]) == (OTHER, 1)
    # a comes back (a hung process): it sees b's Lease and does not write.
    writes = len(server.writes)
    assert a.round() == OTHER and len(server.writes) == writes


def test_a_409_means_the_rival_won_and_the_next_round_says_who(server, clock):
    a, b = elector(server, clock, ME), elector(server, clock, OTHER)
    server.lease = lease_with(holderIdentity="", leaseDurationSeconds=1, leaseTransitions=2)
    server.lease["metadata"]["resourceVersion"] = "0"

    def rival_first():
        assert b.round() == OTHER

    server.before_write = rival_first  # a read the released Lease, b writes before a's PUT lands
    assert a.round() is None
    assert server.spec["holderIdentity"] == OTHER and server.spec["leaseTransitions"] == 3
    assert a.round() == OTHER  # b holds it now: a waits


def test_two_candidates_creating_at_once_one_gets_a_409(server, clock):
    a, b = elector(server, clock, ME), elector(server, clock, OTHER)
    server.before_write = lambda: b.round()
    assert a.round() is None
    assert server.spec["holderIdentity"] == OTHER and len(server.writes) == 1


def test_acquire_waits_the_holders_duration_and_logs_each_new_holder_once(server, clock, caplog):
    caplog.set_level(logging.INFO, logger="kubetune.operator.leader")
    elector(server, clock, OTHER, Timing(4, 3, 1)).round()
    me = elector(server, clock, ME, Timing(4, 3, 1))
    stop = threading.Event()
    waits = []

    def tick(seconds):  # stands in for stop.wait: time passes on the fake clock only
        waits.append(seconds)
        assert metrics.REGISTRY.get_sample_value("kubetune_operator_leader") == 0
        clock.t += seconds
        return False

    stop.wait = tick
    assert me.acquire(stop)
    assert waits == [1, 1, 1, 1]  # the record's 4 s on this candidate's clock, retried every 1 s
    lines = [r.getMessage() for r in caplog.records if r.name == "kubetune.operator.leader"]
    assert lines[-2:] == [
        f"standing by behind {OTHER} (lease ns/kubetune-operator)",
        f"became leader: lease ns/kubetune-operator, holder {ME}, transitions 1",
    ]
    assert sum("standing by" in line for line in lines) == 1
    assert metrics.REGISTRY.get_sample_value("kubetune_operator_leader") == 1


def test_acquire_returns_false_when_stopped_and_survives_api_errors(server, clock, caplog):
    server.fail = ConnectionRefusedError("connection refused")
    me = elector(server, clock, ME)
    stop = threading.Event()
    count = []

    def tick(seconds):
        count.append(seconds)
        if len(count) == 3:
            stop.set()
        return stop.is_set()

    stop.wait = tick
    assert me.acquire(stop) is False and len(count) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "reading or taking the lease ns/kubetune-operator failed: ConnectionRefusedError: connection refused"
    ]


def test_the_leader_loses_at_once_when_another_holds_the_lease(server, clock):
    lost: list[str] = []
    me = elector(server, clock, ME, lost=lost)
    me.round()
    server.lease["spec"]["holderIdentity"] = OTHER  # taken over (this leader was paused, say)
    server.version += 1
    server.lease["metadata"]["resourceVersion"] = str(server.version)
    me.renew_once()
    assert lost == [f"lease ns/kubetune-operator is held by {OTHER}"]
    assert metrics.REGISTRY.get_sample_value("kubetune_operator_leader") == 0
    me.renew_once()
    assert len(lost) == 1  # once


def test_a_failed_renewal_is_retried_until_the_renew_deadline_then_lost(server, clock):
    lost: list[str] = []
    me = elector(server, clock, ME, Timing(15, 10, 2), lost=lost)
    me.round()
    server.fail = TimeoutError("read timed out")
    for _ in range(4):
        clock.t += 2
        me.renew_once()
        assert me.check_deadline() == pytest.approx(10 - (clock.t - 1000))
    assert not lost
    clock.t += 1.999
    assert me.check_deadline() == pytest.approx(0.001) and not lost
    server.fail = None  # the API answers again just in time: the deadline starts over
    me.renew_once()
    assert me.check_deadline() == pytest.approx(10)
    server.fail = TimeoutError("read timed out")
    clock.t += 10
    assert me.check_deadline() == 0.0
    assert lost == ["could not renew lease ns/kubetune-operator for 10.0s (renew deadline 10s)"]


def test_the_deadline_runs_from_before_the_write_not_after_a_slow_answer(server, clock):
    """A renewal whose answer took 6 s leaves 4 s, not 10: the API server may have stored it
    (and a standby seen it) right when it was sent."""
    lost: list[str] = []
    me = elector(server, clock, ME, lost=lost)
    me.round()
    slow_replace = server.replace

    def replace(lease):
        clock.t += 6
        return slow_replace(lease)

    server.replace = replace
    me.renew_once()
    assert me.check_deadline() == pytest.approx(4.0)


def test_a_slow_read_costs_neither_the_leader_nor_the_standby(server, clock):
    """The leader's deadline starts just before its write, not before the read that preceded it;
    a standby's wait starts when its read came back (the record it saw was stored by then)."""
    lost: list[str] = []
    a, b = elector(server, clock, ME, lost=lost), elector(server, clock, OTHER)
    slow_get = server.get

    def get():
        clock.t += 5
        return slow_get()

    server.get = get
    a.round()
    assert a.check_deadline() == pytest.approx(10.0)
    assert b.round() == ME and b.observation.at == clock.t  # after its 5 s read


def test_release_frees_the_lease_for_the_standby_at_once(server, clock):
    a, b = elector(server, clock, ME), elector(server, clock, OTHER)
    a.round()
    assert b.round() == ME
    assert a.release() is True
    assert (server.spec["holderIdentity"], server.spec["leaseDurationSeconds"]) == ("", 1)
    assert b.round() == OTHER  # no waiting out the lease
    assert server.spec["leaseTransitions"] == 1
    assert a.release() is False and server.spec["holderIdentity"] == OTHER  # not ours: untouched


# --- threads, signals, probes, the process -------------------------------------------------------


def test_hold_renews_in_the_background_until_left(server):
    me = Elector(server, ME, Timing(3, 2, 0.1), on_lost=pytest.fail)
    assert me.round() == ME
    with me.hold():
        deadline = time.monotonic() + 10
        while len(server.writes) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(server.writes) >= 4 and not me.lost
    renew_times = [w["renewTime"] for w in server.writes]
    assert renew_times == sorted(renew_times) and len(set(renew_times)) == len(renew_times)
    writes = len(server.writes)
    time.sleep(0.3)
    assert len(server.writes) == writes  # left the block: no more renewals


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_standby_answers_its_liveness_url_and_frees_the_port():
    port = free_port()
    probe = leader.StandbyProbe(f"http://127.0.0.1:{port}/healthz", lambda: OTHER)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read()) == {"leader": False, "holder": OTHER}
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert missing.value.code == 404
    finally:
        probe.close()
    with socket.socket() as s:  # what kopf does next: bind the same port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_run_elected_leads_then_releases(server, clock):
    me = elector(server, clock, ME)
    led = []

    def lead(stop):
        led.append(server.spec["holderIdentity"])

    assert leader.run_elected(me, lead) == 0
    assert led == [ME]
    assert server.spec["holderIdentity"] == "" and server.spec["leaseDurationSeconds"] == 1


def test_sigterm_while_standing_by_ends_without_leading(server, clock):
    elector(server, clock, OTHER).round()
    me = Elector(server, ME, Timing(15, 10, 0.05), clock=clock, wall=clock.wall, on_lost=pytest.fail)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    before = signal.getsignal(signal.SIGTERM)
    assert leader.run_elected(me, lambda stop: pytest.fail("led")) == 0
    assert signal.getsignal(signal.SIGTERM) is before  # restored
    assert server.spec["holderIdentity"] == OTHER


def test_a_leader_that_cannot_renew_exits_hard_with_its_code_and_one_line(tmp_path):
    """The real exit: a process whose API stops answering leaves within the renew deadline, while
    its main thread is busy (kopf, here a sleep), with exit code 3 and one log line."""
    script = textwrap.dedent("""
        import logging, sys, time
        from kubetune_operator import leader
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")

        class Api:
            namespace, name = "ns", "kubetune-operator"
            lease = None
            def get(self):
                if self.lease and self.lease["spec"]["renewTime"]:
                    raise TimeoutError("read timed out")  # after the first write: unreachable
                return self.lease
            def create(self, lease):
                lease["metadata"]["resourceVersion"] = "1"
                self.lease = lease
                return lease
            replace = create

        me = leader.Elector(Api(), "me_1", leader.Timing(2, 1.0, 0.2))
        assert me.round() == "me_1"
        started = time.monotonic()
        with me.hold():
            time.sleep(30)
        print("still running", time.monotonic() - started)
    """)
    package_dir = Path(leader.__file__).resolve().parents[1]  # the kubetune_operator under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(package_dir), str(REPO / "core")))}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == leader.LOST_LEASE_EXIT == 3, done.stderr
    assert "still running" not in done.stdout
    lost = [line for line in done.stderr.splitlines() if "lost the lease" in line]
    assert lost == [
        "ERROR lost the lease: could not renew lease ns/kubetune-operator for 1.0s (renew deadline 1s); "
        "exiting (code 3) to restart as a standby"
    ], done.stderr
    assert elapsed < 20  # a 1 s deadline, not the 30 s sleep (interpreter start-up on a busy machine aside)


def test_bad_election_options_are_one_line_and_exit_2(capsys):
    from kubetune.cli import main

    code = main(
        ["operator", "--leader-elect", "--leader-elect-lease-duration", "5", "--leader-elect-renew-deadline", "6"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (
        "kubetune operator: --leader-elect-lease-duration (5s) must be longer than --leader-elect-renew-deadline (6s)"
    )
    assert main(["operator", "--leader-elect", "--leader-elect-lease", "No_Such"]) == 2
    assert "--leader-elect-lease 'No_Such' is not a valid object name" in capsys.readouterr().err


@pytest.mark.parametrize("signalled", [True, False])
def test_a_sigterm_before_kopf_was_ready_is_sent_again_once_it_is(signalled):
    """A SIGTERM between taking the Lease and kopf installing its handlers only set `stop`: kopf
    gets it again once ready (its handler here: the loop's), so it stops and the Lease is released."""
    from kubetune_operator.main import forward_early_signal

    loop = asyncio.new_event_loop()
    got: list[str] = []
    loop.add_signal_handler(signal.SIGTERM, got.append, "SIGTERM")
    stop, ready = threading.Event(), asyncio.Event()
    if signalled:
        stop.set()

    async def scenario():
        task = asyncio.create_task(forward_early_signal(ready, stop))
        await asyncio.sleep(0.05)
        assert not got  # not before kopf is ready
        ready.set()
        await asyncio.wait_for(task, 5)
        await asyncio.sleep(0.1)  # the handler runs in the loop

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.close()
    assert got == (["SIGTERM"] if signalled else [])

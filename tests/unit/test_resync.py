"""The resync loop and the operator's runner, with fake reconciles (no cluster): one object whose
reconcile hangs (a pod dripping its metrics, a replica that never answers) delays only its own
status while every other object keeps being reconciled every round; at most one reconcile per
object is in flight; a reconcile past its deadline gives its slot back; bursts of requests for one
object coalesce into one follow-up; objects that need no polling are left to their events."""

import asyncio
import threading
import time
from collections import Counter

from kubetune_operator import metrics, resync
from kubetune_operator import state as operator_state
from kubetune_operator.config import OperatorConfig
from kubetune_operator.finetunejob import handlers as ftjh
from kubetune_operator.resync import Resync
from kubetune_operator.state import OperatorState

INTERVAL = 0.05
WAIT = 5.0  # the most a blocked fake reconcile waits: every test releases it well before


def make_state(**runner) -> OperatorState:
    state = OperatorState(OperatorConfig(metrics_scrape_interval_seconds=INTERVAL), client=None)  # type: ignore[arg-type]
    if runner:
        state.work = operator_state.KeyedRunner(**runner)
    return state


class Reconciles:
    """A fake reconcile: counts calls per name; the names in `blocked` wait until `release`."""

    def __init__(self, *blocked: str):
        self.calls: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.most_in_flight: Counter[str] = Counter()
        self.blocked = set(blocked)
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, state, namespace: str, name: str) -> None:
        with self.lock:
            self.calls[name] += 1
            self.in_flight[name] += 1
            self.most_in_flight[name] = max(self.most_in_flight[name], self.in_flight[name])
        try:
            if name in self.blocked:
                self.release.wait(WAIT)
            if name == "broken":
                raise RuntimeError("this object's reconcile always fails")
        finally:
            with self.lock:
                self.in_flight[name] -= 1


def run_loop(state: OperatorState, part: Resync, index: dict, seconds: float, fake: Reconciles) -> Counter[str]:
    """Run the resync loop for `seconds`; the calls counted by then (the blocked reconciles are
    released afterwards, and everything is stopped)."""

    async def main() -> Counter[str]:
        task = asyncio.create_task(resync.loop(state, part, index))
        await asyncio.sleep(seconds)
        seen = Counter(fake.calls)
        fake.release.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        work = getattr(state, "work", None)
        if work is not None:
            await work.close()
        return seen

    return asyncio.run(main())


def part_for(fake: Reconciles, **extra) -> Resync:
    return Resync("FineTuneJob", "finetunejobs", due=lambda index: sorted(index), reconcile=fake, **extra)


def test_one_hanging_object_does_not_stall_the_others():
    fake = Reconciles("slow")
    index = {("ml", name): [True] for name in ("a", "b", "slow", "c")}
    seen = run_loop(make_state(), part_for(fake), index, 0.8, fake)
    rounds = 0.8 / INTERVAL
    # The others were reconciled round after round (a loaded machine gets fewer rounds in; the
    # old loop, which waited for every object of a round, managed exactly one).
    assert min(seen["a"], seen["b"], seen["c"]) >= 4, (seen, rounds)
    # The hanging one was started once and skipped while in flight: not queued round after round.
    assert seen["slow"] == 1
    assert fake.most_in_flight["slow"] == 1


def test_a_failing_object_is_logged_and_the_rounds_go_on():
    fake = Reconciles()
    index = {("ml", "broken"): [True], ("ml", "fine"): [True]}
    seen = run_loop(make_state(), part_for(fake), index, 0.5, fake)
    assert seen["broken"] >= 3 and seen["fine"] >= 3


def test_at_most_the_bound_run_at_once_and_an_overrun_gives_its_slot_back():
    """Concurrency 1: the hanging reconcile holds the only slot until its deadline, then the
    others run in it; the hanging object itself stays in flight (never a second call)."""
    fake = Reconciles("slow")
    overruns = metrics.REGISTRY.get_sample_value("kubetune_operator_reconcile_overruns_total", {"kind": "FineTuneJob"})
    index = {("ml", "slow"): [True], ("ml", "a"): [True], ("ml", "b"): [True]}
    seen = run_loop(make_state(limit=1, deadline=0.2), part_for(fake), index, 1.0, fake)
    assert seen["slow"] == 1
    assert seen["a"] >= 2 and seen["b"] >= 2, seen
    after = metrics.REGISTRY.get_sample_value("kubetune_operator_reconcile_overruns_total", {"kind": "FineTuneJob"})
    assert after == (overruns or 0) + 1
    assert max(fake.most_in_flight.values()) == 1


def test_requests_for_one_object_coalesce():
    """Fifty requests while a reconcile of the object runs make one more run after it, not fifty;
    fifty while one is waiting to start make none more."""
    runner = operator_state.KeyedRunner(limit=4, deadline=5)
    fake = Reconciles("x")
    key = ("FineTuneJob", "ml", "x")

    async def main() -> None:
        assert runner.start(key, lambda: fake(None, "ml", "x"), "resync")
        await asyncio.sleep(0.05)
        assert not runner.start(key, lambda: fake(None, "ml", "x"), "resync")  # in flight: skipped
        for _ in range(50):
            runner.request(key, lambda: fake(None, "ml", "x"), "event")
        fake.release.set()
        for _ in range(50):
            runner.request(("FineTuneJob", "ml", "y"), lambda: fake(None, "ml", "y"), "event", delay=0.05)
        deadline = time.monotonic() + WAIT
        while (fake.calls["x"] < 2 or fake.calls["y"] < 1 or runner.busy(key)) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # anything more would have run by now
        await runner.close()

    asyncio.run(main())
    assert fake.calls == Counter({"x": 2, "y": 1})


def test_pod_and_job_events_of_one_job_make_one_status_refresh(monkeypatch):
    """The events of a job's children ask the runner for a refresh instead of each running one:
    a burst of them (pods created, scheduled, the Job's counters) costs one status read."""
    state = make_state()
    refreshed: Counter[str] = Counter()
    monkeypatch.setattr(ftjh, "EVENT_DELAY", 0.05, raising=False)
    monkeypatch.setattr(ftjh, "reconcile_status", lambda state, namespace, name, **_: refreshed.update([name]))

    class Memo:
        operator = state

    def child(job: str) -> dict:
        return {"metadata": {"namespace": "ml", "name": f"{job}-0", "labels": {"kubetune.io/job": job}}}

    async def main() -> None:
        for _ in range(20):
            result = ftjh.pod_event(body=child("a"), memo=Memo())
            if asyncio.iscoroutine(result):
                await result
            result = ftjh.job_event(body=child("b"), memo=Memo())
            if asyncio.iscoroutine(result):
                await result
        deadline = time.monotonic() + WAIT
        while sum(refreshed.values()) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        await state.work.close()

    asyncio.run(main())
    assert refreshed == Counter({"a": 1, "b": 1})


def test_only_running_jobs_are_polled_every_round():
    """A job whose status changes only through events (Admitted, Suspended) is left out of the
    rounds while something reconciled it recently; a running one is polled (its metrics) always."""
    state = make_state()
    index = {("ml", "admitted"): [ftjh.Tracked("Admitted", 1)], ("ml", "running"): [ftjh.Tracked("Running", 1)]}
    part = ftjh.RESYNC
    assert resync.round_keys(state, part, index) == [("ml", "admitted"), ("ml", "running")]
    for name in ("admitted", "running"):
        state.work.touched(("FineTuneJob", "ml", name))
    assert resync.round_keys(state, part, index) == [("ml", "running")]
    state.work._fresh[("FineTuneJob", "ml", "admitted")] -= resync.SAFETY_NET_ROUNDS * INTERVAL
    assert resync.round_keys(state, part, index) == [("ml", "admitted"), ("ml", "running")]

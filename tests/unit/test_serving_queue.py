"""The serving engine's request queue: at most `max_queued` generations wait for the model, one more
is a 429 the API answers with Retry-After, and the in-flight count an autoscaler reads is exact.
No model is loaded: the queue is the engine's lock and two counters."""

import threading

import pytest

from kubetune_serve.engine import Engine, EngineError


def engine(tmp_path, max_queued: int) -> Engine:
    return Engine("unused", "tiny", cache_dir=tmp_path, max_queued=max_queued)


def test_one_more_than_the_queue_holds_is_429_and_the_counts_are_exact(tmp_path):
    served = engine(tmp_path, max_queued=2)
    running, release = threading.Event(), threading.Event()

    def hold():
        with served._queued():
            running.set()
            assert release.wait(10)

    def wait_in_line():
        with served._queued():
            pass

    holder = threading.Thread(target=hold)
    holder.start()
    assert running.wait(10)
    waiters = [threading.Thread(target=wait_in_line) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    for _ in range(1000):  # bounded: until both wait behind the running one
        if served._waiting == 2:
            break
        threading.Event().wait(0.01)
    assert (served._running, served._waiting, served.in_flight) == (1, 2, 3)
    with pytest.raises(EngineError) as refused:
        with served._queued():
            pass
    assert refused.value.status == 429 and refused.value.type == "RateLimitError"
    assert "at most 2" in str(refused.value)
    release.set()
    for thread in (holder, *waiters):
        thread.join(10)
        assert not thread.is_alive()
    assert served.in_flight == 0 and not served._lock.locked()


def test_a_failure_under_the_lock_releases_it_and_the_count(tmp_path):
    served = engine(tmp_path, max_queued=1)
    with pytest.raises(RuntimeError):
        with served._queued():
            assert served.in_flight == 1
            raise RuntimeError("generation failed")
    assert served.in_flight == 0 and not served._lock.locked()

"""Continuous batching without a model (kubetune_serve.batching): the queue bound and its 429, rows
joining and leaving the running batch, cancellation, a failing forward, the KV cache's masks, and
per-row sampling. The forward is a stand-in that records what it was given and answers logits whose
greedy token is the row's last token + 1, so every count below is exact."""

import threading

import pytest
import torch

from kubetune_serve.batching import Batcher, KVCache, Row, next_tokens
from kubetune_serve.engine import EngineError, Sampling

pytestmark = pytest.mark.unit

VOCAB = 50
EOS = 49


class Tracker:
    """What the batcher needs of a TextTracker: token ids, an end token, a finish reason."""

    def __init__(self, eos_ids=(EOS,)):
        self.token_ids, self.eos_ids, self.finish_reason, self.ended = [], set(eos_ids), None, False

    @property
    def done(self):
        return self.finish_reason is not None

    def add(self, token):
        self.token_ids.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"

    def end(self):
        self.ended = True


class Model:
    """A forward that records each call's lane and rows; the next greedy token is the last one + 1."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on
        self.gate = threading.Event()
        self.gate.set()

    def forward(self, lane, rows, cache, ids, positions, mask):
        assert self.gate.wait(10)
        self.calls.append((lane, [row.prompt[0] for row in rows], ids.shape[1]))
        if self.fail_on is not None and any(row.prompt[0] == self.fail_on for row in rows):
            raise RuntimeError("device lost")
        logits = torch.zeros(len(rows), VOCAB)
        logits[torch.arange(len(rows)), (ids[:, -1] + 1) % VOCAB] = 1.0
        return logits

    def step_lock(self):
        return threading.Lock()


def batcher(model, max_running=8, max_queued=8):
    return Batcher(
        model.forward,
        model.step_lock,
        [EOS],
        torch.device("cpu"),
        torch.float32,
        max_running=max_running,
        max_queued=max_queued,
    )


def row(first: int, max_tokens: int, length: int = 3, cancelled=None, adapter=None, eos=(EOS,)) -> Row:
    prompt = [first] + [1] * (length - 1)
    return Row(prompt, Sampling(max_tokens=max_tokens, temperature=0), adapter, Tracker(eos), cancelled)


def wait(rows):
    for r in rows:
        assert r.done.wait(20), "the batcher never finished a row"


def test_each_row_gets_its_own_tokens_and_finish_reason():
    model = Model()
    rows = [row(10, max_tokens=5), row(20, max_tokens=2, length=1), row(47, max_tokens=9)]
    served = batcher(model)
    for r in rows:
        served.submit(r)
    wait(rows)
    assert rows[0].tracker.token_ids == [2, 3, 4, 5, 6] and rows[0].finish == "length"
    assert rows[1].tracker.token_ids == [21, 22] and rows[1].finish == "length"
    assert rows[2].tracker.token_ids == [2, 3, 4, 5, 6, 7, 8, 9, 10]  # the prompt ends in 1, not 47
    stopping = row(5, max_tokens=9, length=1)
    stopping.prompt = [46]
    served.submit(stopping)
    wait([stopping])
    assert stopping.tracker.token_ids == [47, 48, 49] and stopping.finish == "stop" and stopping.tracker.ended
    assert served.in_flight == 0


def test_requests_join_and_leave_the_running_batch():
    model = Model()
    served = batcher(model, max_running=2)
    short, long, late = row(10, max_tokens=2), row(20, max_tokens=6), row(30, max_tokens=2)
    with served.changed:  # the stepper admits nothing until all three are queued
        for r in (short, long, late):
            served.submit(r)
    wait([short, long, late])
    assert max(len(rows) for _, rows, _ in model.calls) == 2  # never more than max_running
    prefills = [(rows, width) for _, rows, width in model.calls if width > 1]
    assert prefills[0] == ([10, 20], 3) and prefills[1] == ([30], 3)
    # `late` joined when `short` left, while `long` was still generating: decode steps with both.
    assert any(rows == [20, 30] and width == 1 for _, rows, width in model.calls)
    assert [len(r.tracker.token_ids) for r in (short, long, late)] == [2, 6, 2]


def test_one_more_than_the_queue_holds_is_429_and_in_flight_is_exact():
    model = Model()
    model.gate.clear()  # the first step blocks: nothing leaves
    served = batcher(model, max_running=1, max_queued=2)
    first = row(10, max_tokens=1)
    served.submit(first)
    for _ in range(1000):  # bounded: until the stepper took `first` and waits in its forward
        if served.prefilling:
            break
        threading.Event().wait(0.01)
    waiting = [row(20, max_tokens=1), row(30, max_tokens=1)]
    for r in waiting:
        served.submit(r)
    assert served.in_flight == 3
    with pytest.raises(EngineError) as refused:
        served.submit(row(40, max_tokens=1))
    assert refused.value.status == 429 and refused.value.type == "RateLimitError" and "at most 2" in str(refused.value)
    model.gate.set()
    wait([first, *waiting])
    assert served.in_flight == 0


def test_a_cancelled_row_ends_with_abort_and_frees_its_place():
    model = Model()
    gone = threading.Event()
    leaving = row(10, max_tokens=1000, cancelled=gone.is_set, eos=())
    served = batcher(model, max_running=1)
    served.submit(leaving)
    for _ in range(1000):
        if len(leaving.tracker.token_ids) > 3:
            break
        threading.Event().wait(0.01)
    gone.set()
    nxt = row(20, max_tokens=2)
    served.submit(nxt)
    wait([leaving, nxt])
    assert leaving.finish == "abort" and 3 < len(leaving.tracker.token_ids) < 1000
    assert nxt.tracker.token_ids == [2, 3]


def test_a_failing_forward_fails_its_rows_with_500_and_serving_goes_on():
    model = Model(fail_on=13)
    served = batcher(model)
    bad = row(13, max_tokens=3)
    served.submit(bad)
    wait([bad])
    assert bad.error.status == 500 and "device lost" in bad.error.message
    good = row(14, max_tokens=3)
    served.submit(good)
    wait([good])
    assert good.error is None and good.tracker.token_ids == [2, 3, 4]


def test_rows_of_an_adapter_served_by_adapter_run_in_their_own_lane():
    class Adapter:
        def __init__(self, name, lane):
            self.name, self.lane, self.detached = name, lane, False

    model = Model()
    dora, plain = Adapter("d", "peft_d"), Adapter("p", None)
    rows = [row(10, 2, adapter=dora), row(20, 2, adapter=plain), row(30, 2)]
    served = batcher(model)
    with served.changed:
        for r in rows:
            served.submit(r)
    wait(rows)
    lanes = {(lane, tuple(firsts)) for lane, firsts, _ in model.calls}
    assert ("peft_d", (10,)) in lanes and (None, (20, 30)) in lanes


def test_a_row_whose_adapter_was_detached_ends_with_404_before_the_next_forward():
    class Adapter:
        name, lane, detached = "gone", None, False

    model = Model()
    adapter = Adapter()
    long = row(10, max_tokens=1000, adapter=adapter, eos=())
    served = batcher(model)
    served.submit(long)
    for _ in range(1000):
        if len(long.tracker.token_ids) > 2:
            break
        threading.Event().wait(0.01)
    adapter.detached = True
    wait([long])
    assert long.error.status == 404 and "gone" in long.error.message


def test_the_cache_masks_padding_and_each_row_writes_its_own_next_column():
    cache = KVCache(torch.device("cpu"))
    ids, positions, mask = cache.begin_prefill([[5, 6, 7], [8]], torch.float32)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    allowed = mask == 0
    assert allowed[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert allowed[1, 0, 2].tolist() == [False, False, True]  # the padding is never attended to
    keys = torch.randn(2, 1, 3, 4)
    cache.update(keys, keys, 0)
    cache.keep([1])  # the first row finished
    other = KVCache(torch.device("cpu"))
    other.begin_prefill([[1, 2, 3, 4, 5]], torch.float32)
    other.update(torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4), 0)
    cache.extend(other)
    decode = cache.begin_decode(torch.float32) == 0
    assert cache.write.tolist() == [3, 5] and decode.shape == (2, 1, 1, 6)
    assert decode[0, 0, 0].tolist() == [False, False, True, True, False, False]
    assert decode[1, 0, 0].tolist() == [True] * 6
    new = torch.randn(2, 1, 1, 4)
    out_keys, _ = cache.update(new, new, 0)
    assert torch.equal(out_keys[0, :, 3], new[0, :, 0]) and torch.equal(out_keys[1, :, 5], new[1, :, 0])
    assert torch.equal(out_keys[0, :, 2], keys[1, :, 2])  # the kept row's prompt stays where it was
    cache.commit_decode()
    assert cache.write.tolist() == [4, 6] and cache.valid[0, :4].tolist() == [False, False, True, True]


def test_sampling_is_per_row():
    logits = torch.tensor([[0.0, 3.0, 2.9, 0.0], [0.0, 1.0, 0.0, 9.0], [1.0, 1.1, 1.2, 1.3]])
    greedy = Row([1], Sampling(max_tokens=4, temperature=0), None, Tracker())
    no_eos = Row([1], Sampling(max_tokens=4, temperature=0, ignore_eos=True), None, Tracker())
    top1 = Row([1], Sampling(max_tokens=4, temperature=5.0, top_k=1), None, Tracker())
    assert next_tokens(logits.clone(), [greedy, no_eos, top1], eos_ids=[3]) == [1, 1, 3]
    seeded = [Row([1], Sampling(max_tokens=4, temperature=1.0, seed=7), None, Tracker()) for _ in range(2)]
    flat = torch.zeros(1, 1000)
    draws = [[next_tokens(flat.clone(), [r], [])[0] for _ in range(5)] for r in seeded]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1  # the same seed, the same draws; not constant
    nucleus = Row([1], Sampling(max_tokens=4, temperature=1.0, top_p=0.5), None, Tracker())
    peaked = torch.tensor([[0.0, 10.0, 0.0, 0.0]])
    assert {next_tokens(peaked.clone(), [nucleus], [])[0] for _ in range(20)} == {1}

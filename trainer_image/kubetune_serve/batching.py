"""Continuous batching: the requests being generated share every forward pass, token step by token step.

One thread (the stepper) owns the model's forward passes. A request joins the queue (`Batcher.submit`,
429 when `max_queued` are already waiting); at the next step it is admitted while fewer than
`max_running` rows run, its prompt is read in one prefill pass with the other newcomers (left-padded
to the longest), and from then on it takes one token per decode step with every other running row.
A row leaves the batch the step it finishes (end of sequence, a stop string, `max_tokens`, or its
client gone), and its place is free for the next one: requests join and leave the running batch.

Rows are grouped in lanes. Lane `None` holds the base model's rows and every row whose adapter the
grouped LoRA path serves (`grouped.Rows`): one forward for all of them, each token with its adapter's
slot. An adapter that path cannot serve (DoRA, ...) gets a lane of its own: one more forward per
step, with PEFT's own forward and that adapter active ("grouped by adapter").

The keys and values of a lane live in `KVCache`: per layer `[rows, kv_heads, columns, head_dim]`,
with a boolean mask of the columns each row attends to and the column each row writes next. Positions
are the rows' own (RoPE is applied before keys are cached, so a column is only storage): a row that
joins later starts at column 0 in its own row, whatever the others hold. The attention mask is built
here and handed to the model as a 4-D mask, which transformers uses as given; the model is called
with our cache object as `past_key_values` (transformers' attention only calls its `update`).

Greedy decoding of a row does not depend on the rows beside it: padding columns are masked out
exactly, so a batched greedy request gives the text it gives alone (up to float rounding of the
batched matrix products, which the tests check does not change the tokens on the tiny model).
Attention windows (sliding-window layers) are not applied: exact below the window, which is the
case for every request that fits the context of the models served here.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import EngineError

__all__ = ["Batcher", "KVCache", "Row", "next_tokens"]

_COLUMN_CHUNK = 64  # columns the cache grows by: few reallocations, little unused room
PREFILL_TOKENS = 8192  # prompt tokens (padding included) read in one prefill pass, at most


class KVCache:
    """Keys and values of the rows of one lane, per layer, as transformers' attention layers store them.

    `update` is the only method the model calls (from each attention layer, with that layer's new keys
    and values); the batcher calls `begin_prefill`/`begin_decode` before a forward (which fix the
    columns written and return the attention mask) and `commit_decode` after it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=device)  # [rows, columns]: attended to
        self.write = torch.zeros(0, dtype=torch.long, device=device)  # [rows]: the next column
        self._decoding = False
        self._width = 0  # columns the current decode attends over

    @property
    def rows(self) -> int:
        return self.write.shape[0]

    @property
    def columns(self) -> int:
        return self.valid.shape[1]

    # --- the model's side ------------------------------------------------------------------------

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int, *args, **kwargs):
        """Store this step's keys/values of `layer` ([rows, heads, q, dim]); all of the layer's, for attention."""
        if not self._decoding:  # prefill of a fresh cache: the prompt block is the whole cache
            if layer == len(self.keys):
                self.keys.append(_with_room(key, self.columns))
                self.values.append(_with_room(value, self.columns))
            return key, value
        rows = torch.arange(self.rows, device=self.device)
        self.keys[layer][rows, :, self.write] = key[:, :, 0]
        self.values[layer][rows, :, self.write] = value[:, :, 0]
        return self.keys[layer][:, :, : self._width], self.values[layer][:, :, : self._width]

    def get_seq_length(self, layer: int = 0) -> int:  # asked by some models when no positions are given
        return int(self.write.max()) if self.rows else 0

    # --- the batcher's side ----------------------------------------------------------------------

    def begin_prefill(self, prompts: list[list[int]], dtype: torch.dtype):
        """For a fresh cache: (input_ids, position_ids, mask) of `prompts` left-padded to the longest."""
        longest = max(map(len, prompts))
        columns = _rounded(longest)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        positions = torch.zeros(len(prompts), longest, dtype=torch.long)
        valid = torch.zeros(len(prompts), columns, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            pad = longest - len(prompt)
            ids[row, pad:] = torch.tensor(prompt, dtype=torch.long)
            positions[row, pad:] = torch.arange(len(prompt))
            valid[row, pad:longest] = True
        self.valid = valid.to(self.device)
        self.write = torch.full((len(prompts),), longest, dtype=torch.long, device=self.device)
        self._decoding = False
        causal = torch.ones(longest, longest, dtype=torch.bool, device=self.device).tril()
        allowed = causal.unsqueeze(0) & self.valid[:, None, :longest]
        return ids.to(self.device), positions.to(self.device), _additive(allowed.unsqueeze(1), dtype)

    def begin_decode(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask of one decode step: each row attends to its own columns and the one it writes now."""
        self._grow(int(self.write.max()) + 1)
        self._decoding = True
        self._width = int(self.write.max()) + 1
        allowed = self.valid[:, : self._width].clone()
        allowed[torch.arange(self.rows, device=self.device), self.write] = True
        return _additive(allowed[:, None, None, :], dtype)

    def commit_decode(self) -> None:
        self.valid[torch.arange(self.rows, device=self.device), self.write] = True
        self.write = self.write + 1

    def extend(self, other: KVCache) -> None:
        """Append `other`'s rows (a finished prefill) below this cache's."""
        if not self.rows:
            self.keys, self.values, self.valid, self.write = other.keys, other.values, other.valid, other.write
            return
        width = max(self.columns, other.columns)
        self._grow(width)
        other._grow(width)
        self.keys = [torch.cat(pair) for pair in zip(self.keys, other.keys, strict=True)]
        self.values = [torch.cat(pair) for pair in zip(self.values, other.values, strict=True)]
        self.valid = torch.cat([self.valid, other.valid])
        self.write = torch.cat([self.write, other.write])

    def keep(self, rows: list[int]) -> None:
        """Only these rows stay (the others finished), in this order."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.valid, self.write = self.valid.index_select(0, index), self.write.index_select(0, index)

    def _grow(self, needed: int) -> None:
        if needed <= self.columns:
            return
        columns = _rounded(needed)
        self.keys = [_with_room(k, columns) for k in self.keys]
        self.values = [_with_room(v, columns) for v in self.values]
        more = torch.zeros(self.rows, columns - self.columns, dtype=torch.bool, device=self.device)
        self.valid = torch.cat([self.valid, more], dim=1)


def _rounded(columns: int) -> int:
    return -(-columns // _COLUMN_CHUNK) * _COLUMN_CHUNK


def _with_room(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """`tensor` ([rows, heads, q, dim]) with zero columns added up to `columns`."""
    missing = columns - tensor.shape[2]
    if missing <= 0:
        return tensor.contiguous()
    shape = (tensor.shape[0], tensor.shape[1], missing, tensor.shape[3])
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=2)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attend-mask as the additive float mask both eager and SDPA attention take: 0 or the
    dtype's lowest (not -inf: a padding query that attends to nothing gets no NaN)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


@dataclass
class Row:
    """One request, from the queue to its last token."""

    prompt: list[int]
    sampling: object  # engine.Sampling
    adapter: object | None  # engine.Adapter, or None for the base model
    tracker: object  # text.TextTracker
    cancelled: Callable[[], bool] | None = None
    called: float = field(default_factory=time.monotonic)
    queued: float = 0.0
    first_token: float | None = None
    generator: torch.Generator | None = None
    position: int = 0  # of the next token fed to the model
    last: int = 0  # the token fed to the model at the next step
    finish: str | None = None
    error: EngineError | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def generated(self) -> int:
        return len(self.tracker.token_ids)

    def lane(self) -> str | None:
        return getattr(self.adapter, "lane", None)

    def gone(self) -> bool:
        return self.cancelled is not None and self.cancelled()


def next_tokens(logits: torch.Tensor, rows: list[Row], eos_ids: list[int]) -> list[int]:
    """Each row's next token from its logits ([rows, vocab]), with its own sampling parameters:
    greedy at temperature 0, else temperature, top-k, top-p (in that order, as transformers applies
    them) and a draw from the row's own generator (seeded when the request gave a seed)."""
    logits = logits.float()
    for i, row in enumerate(rows):
        if row.sampling.ignore_eos and eos_ids:  # as min_new_tokens: the end token is never drawn
            logits[i, eos_ids] = float("-inf")
    chosen = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if row.sampling.temperature > 0:
            chosen[i] = _draw(logits[i], row)
    return chosen


def _draw(logits: torch.Tensor, row: Row) -> int:
    sampling = row.sampling
    scores = logits / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, scores.shape[-1])
        scores = scores.masked_fill(scores < scores.topk(k).values[-1], float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = scores.sort(descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # the mass ranked above each token
        drop = before >= sampling.top_p  # the top token always stays
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    if row.generator is None:
        row.generator = torch.Generator(device=logits.device)
        row.generator.manual_seed(sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8)) >> 1)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=row.generator))


class Batcher:
    """The queue, the running lanes and the stepper thread that runs them.

    `forward(lane, rows, cache, ids, positions, mask)` is the engine's: one model pass over a lane's
    rows, returning the last position's logits ([rows, vocab]). `step_lock()` is the engine's context
    manager around each step (so loading an adapter never happens during a forward); `on_step` is
    called after each step (the engine's progress mark).
    """

    def __init__(
        self,
        forward: Callable,
        step_lock: Callable,
        eos_ids: list[int],
        device: torch.device,
        dtype: torch.dtype,
        *,
        max_running: int,
        max_queued: int,
        on_step: Callable[[], None] = lambda: None,
    ):
        self.forward, self.step_lock, self.eos_ids = forward, step_lock, eos_ids
        self.device, self.dtype = device, dtype  # the model's: masks are built in its dtype
        self.max_running, self.max_queued, self.on_step = max_running, max_queued, on_step
        self.waiting: collections.deque[Row] = collections.deque()
        self.lanes: dict[str | None, tuple[list[Row], KVCache]] = {}
        self.prefilling: list[Row] = []  # admitted, prompt being read
        self.changed = threading.Condition()
        self.closed = False
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> int:
        return sum(len(rows) for rows, _ in self.lanes.values())

    @property
    def in_flight(self) -> int:
        """Requests waiting or being generated: what an autoscaler reads."""
        return len(self.waiting) + sum(1 for row in self._admitted() if not row.done.is_set())

    def _admitted(self) -> list[Row]:
        """The rows past the queue (a snapshot: the stepper changes the lanes as other threads read)."""
        return [*self.prefilling, *(row for rows, _ in list(self.lanes.values()) for row in list(rows))]

    @property
    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def submit(self, row: Row) -> None:
        with self.changed:
            if len(self.waiting) >= self.max_queued:
                raise EngineError(
                    f"too many requests waiting for the model (at most {self.max_queued} queue); retry later",
                    429,
                    "RateLimitError",
                )
            self.waiting.append(row)
            self.changed.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kubetune-batcher", daemon=True)
                self._thread.start()

    def wait_unused(self, adapter: object, timeout: float) -> bool:
        """Wait until no request waits or runs with `adapter`; False when `timeout` passed first."""
        with self.changed:
            return self.changed.wait_for(lambda: not self._uses(adapter), timeout=timeout)

    def _uses(self, adapter: object) -> bool:
        return any(row.adapter is adapter for row in [*self.waiting, *self._admitted()])

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    # --- the stepper -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.closed or self.waiting or self.lanes)
                if self.closed:
                    return
                newcomers = self.prefilling = self._admit()
            try:
                with self.step_lock():
                    self._prefill(newcomers)
                    for lane in list(self.lanes):
                        self._decode(lane)
            except Exception as error:  # noqa: BLE001 - outside a forward: a bug; fail what runs, keep serving
                self._fail_all(newcomers, error)
            self.on_step()
            with self.changed:
                self.lanes = {lane: entry for lane, entry in self.lanes.items() if entry[0]}
                self.prefilling = []
                self.changed.notify_all()

    def _fail_all(self, newcomers: list[Row], error: Exception) -> None:
        failure = EngineError(f"internal error: {type(error).__name__}: {error}", 500, "InternalServerError")
        for row in [*newcomers, *(row for rows, _ in self.lanes.values() for row in rows)]:
            if not row.done.is_set():
                self._fail(row, failure)
        self.lanes = {}

    def _admit(self) -> list[Row]:
        room, newcomers, now = self.max_running - self.running, [], time.monotonic()
        while self.waiting and room > 0:
            row = self.waiting.popleft()
            row.queued = now - row.called
            if row.gone():  # the client left while waiting
                self._finish(row, "abort")
                continue
            newcomers.append(row)
            room -= 1
        return newcomers

    def _prefill(self, newcomers: list[Row]) -> None:
        by_lane: dict[str | None, list[Row]] = {}
        for row in newcomers:
            by_lane.setdefault(row.lane(), []).append(row)
        for lane, rows in by_lane.items():
            for group in _prefill_groups(rows):
                cache = KVCache(self.device)
                if not self._guarded(group, self._first_tokens, lane, group, cache):
                    continue
                running = [row for row in group if not self._finished(row)]
                if running:
                    cache.keep([group.index(row) for row in running])
                    held = self.lanes.setdefault(lane, ([], KVCache(self.device)))
                    held[1].extend(cache)
                    held[0].extend(running)

    def _first_tokens(self, lane: str | None, rows: list[Row], cache: KVCache) -> None:
        ids, positions, mask = cache.begin_prefill([row.prompt for row in rows], self.dtype)
        logits = self.forward(lane, rows, cache, ids, positions, mask)
        now = time.monotonic()
        for row, token in zip(rows, next_tokens(logits, rows, self.eos_ids), strict=True):
            row.first_token = now - row.called
            row.position, row.last = len(row.prompt), token
            row.tracker.add(token)

    def _decode(self, lane: str | None) -> None:
        self._drop_detached(lane)
        rows, cache = self.lanes[lane]
        if not rows:
            return

        def step() -> None:
            ids = torch.tensor([[row.last] for row in rows], dtype=torch.long, device=self.device)
            positions = torch.tensor([[row.position] for row in rows], dtype=torch.long, device=self.device)
            mask = cache.begin_decode(self.dtype)
            logits = self.forward(lane, rows, cache, ids, positions, mask)
            cache.commit_decode()
            for row, token in zip(rows, next_tokens(logits, rows, self.eos_ids), strict=True):
                row.position, row.last = row.position + 1, token
                row.tracker.add(token)

        if not self._guarded(rows, step):
            self.lanes[lane] = ([], KVCache(self.device))
            return
        staying = [i for i, row in enumerate(rows) if not self._finished(row)]
        if len(staying) < len(rows):
            cache.keep(staying)
            self.lanes[lane] = ([rows[i] for i in staying], cache)

    def _finished(self, row: Row) -> bool:
        """Whether `row` is done after its latest token (and if so, hand its result over)."""
        if row.tracker.done:
            self._finish(row, row.tracker.finish_reason)
        elif row.generated >= row.sampling.max_tokens:
            self._finish(row, "length")
        elif row.gone():
            self._finish(row, "abort")
        return row.done.is_set()

    def _drop_detached(self, lane: str | None) -> None:
        """Rows whose adapter was unloaded under them (after the unload's wait for them ran out) end
        with a 404 before the next forward, which no longer has their adapter."""
        rows, cache = self.lanes[lane]
        staying = [i for i, row in enumerate(rows) if not getattr(row.adapter, "detached", False)]
        if len(staying) == len(rows):
            return
        for row in rows:
            if getattr(row.adapter, "detached", False):
                self._fail(row, EngineError(f"the adapter {row.adapter.name} was unloaded", 404, "NotFoundError"))
        cache.keep(staying)
        self.lanes[lane] = ([rows[i] for i in staying], cache)

    def _guarded(self, rows: list[Row], work: Callable, *args) -> bool:
        """`work(*args)` (a forward); when it raises, `rows` fail with a 500 and the stepper keeps going."""
        try:
            work(*args)
            return True
        except Exception as error:  # noqa: BLE001 - one bad batch must not stop serving
            failure = EngineError(f"internal error: {type(error).__name__}: {error}", 500, "InternalServerError")
            for row in rows:
                self._fail(row, failure)
            return False

    @staticmethod
    def _finish(row: Row, reason: str) -> None:
        row.tracker.end()
        row.finish = reason
        row.done.set()

    @staticmethod
    def _fail(row: Row, error: EngineError) -> None:
        row.error = error
        row.done.set()


def _prefill_groups(rows: list[Row]) -> list[list[Row]]:
    """`rows` in prefill passes of at most PREFILL_TOKENS padded tokens each."""
    groups: list[list[Row]] = []
    for row in sorted(rows, key=lambda r: len(r.prompt)):
        if groups and (len(groups[-1]) + 1) * len(row.prompt) <= PREFILL_TOKENS:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups

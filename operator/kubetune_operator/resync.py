"""Per-object background work: the periodic resync of both kinds, and the status refreshes their
children's events ask for, run by one `KeyedRunner`.

The resync: every interval, each kind reconciles again the objects its kopf index lists (so a missed
event is never lost for long, and what only polling can see, rank 0's metrics or a replica's
adapters, is seen). A round starts each object's reconcile and does not wait for them: one object
whose pod answers slowly (a scrape running to its deadline, a replica loading an adapter) delays
only its own status, and an object still in flight from an earlier round is skipped, not queued.

The runner (`state.KeyedRunner`, one per operator): blocking reconciles in threads, at most one
per object in flight, at most `state.CONCURRENCY` at a time in all. A request for an object in
flight is remembered and runs once more after it (any number of requests meanwhile make one
follow-up), so a burst of pod and Job events costs one or two status reads, not one per event. A
call that runs past `state.DEADLINE` gives its concurrency slot back (a thread cannot be stopped;
its object stays in flight, and skipped by the rounds, until it ends).

The loop is an asyncio task started by the startup handler, not a kopf timer or daemon: kopf puts a
finalizer on every object a timer or daemon watches, and kubetune objects must stay deletable with
the operator stopped. The index (`@kopf.index`) is kopf's own in-memory view of the objects, kept
current by the watch stream without writing anything onto them.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .state import Key, OperatorState

log = logging.getLogger("kubetune.operator")
# An object that needs no polling (its state changes only through watched events) is resynced once
# in this many rounds: the safety net for a missed event, not a second source of truth.
SAFETY_NET_ROUNDS = 4


@dataclass(frozen=True)
class Resync:
    """One kind's part in the loop. `index`: the name of its kopf index, keyed by (namespace, name).
    `due`: the keys to reconcile this round. `reconcile(state, namespace, name)`: blocking, run in a
    thread. `tick(state, index, seconds)`: once per round before the reconciles, with the seconds
    since the previous round (gauges, counters, forgetting what belongs to deleted objects).
    `needs_poll(index, key)`: when given, an object it says False for is resynced only when
    nothing reconciled it for `SAFETY_NET_ROUNDS` intervals (only what polling alone can see, a
    running job's metrics, needs every round)."""

    kind: str
    index: str
    due: Callable[[Mapping[Key, Any]], list[Key]]
    reconcile: Callable[[OperatorState, str, str], None]
    tick: Callable[[OperatorState, Mapping[Key, Any], float], None] | None = None
    needs_poll: Callable[[Mapping[Key, Any], Key], bool] | None = None


def start(state: OperatorState, part: Resync, index: Mapping[Key, Any]) -> "asyncio.Task[None]":
    return asyncio.create_task(loop(state, part, index), name=f"kubetune-resync-{part.kind}")


def round_keys(state: OperatorState, part: Resync, index: Mapping[Key, Any]) -> list[Key]:
    """What this round starts: the due keys not in flight, less, for a kind that says which of its
    objects need polling, those that do not and were reconciled (by anything) within the last
    `SAFETY_NET_ROUNDS` intervals."""
    keys = []
    for key in part.due(index):
        runner_key = (part.kind, *key)
        if state.work.busy(runner_key):
            continue
        if (
            part.needs_poll is not None
            and not part.needs_poll(index, key)
            and state.work.fresh_within(runner_key, SAFETY_NET_ROUNDS * state.interval)
        ):
            continue
        keys.append(key)
    return keys


async def loop(state: OperatorState, part: Resync, index: Mapping[Key, Any]) -> None:
    """Forever: sleep an interval, tick, start the reconciles that are due without waiting for
    them. Errors are logged per object and never stop the loop."""
    last = time.monotonic()
    while True:
        await asyncio.sleep(state.interval)
        now = time.monotonic()
        if part.tick is not None:
            try:
                part.tick(state, index, now - last)
            except Exception:  # noqa: BLE001 - a gauge must not stop the reconciles
                log.exception("resync tick of %s failed", part.kind)
        last = now
        state.work.forget(lambda key: not (isinstance(key, tuple) and key[0] == part.kind) or key[1:] in index)
        for key in round_keys(state, part, index):
            state.work.start((part.kind, *key), _bound(part.reconcile, state, key), trigger="resync")


def _bound(reconcile: Callable[[OperatorState, str, str], None], state: OperatorState, key: Key) -> Callable[[], None]:
    return lambda: reconcile(state, *key)

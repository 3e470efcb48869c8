"""The periodic resync, one loop for both kinds: every interval, each kind reconciles again the objects
its kopf index lists (so a missed event is never lost for long, and what only polling can see, rank
0's metrics or a replica's adapters, is seen).

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
CONCURRENCY = 8  # reconciles of one kind at a time


@dataclass(frozen=True)
class Resync:
    """One kind's part in the loop. `index`: the name of its kopf index, keyed by (namespace, name).
    `due`: the keys to reconcile this round. `reconcile(state, namespace, name)`: blocking, run in a
    thread. `tick(state, index, seconds)`: once per round before the reconciles, with the seconds
    since the previous round (gauges, counters, forgetting what belongs to deleted objects)."""

    kind: str
    index: str
    due: Callable[[Mapping[Key, Any]], list[Key]]
    reconcile: Callable[[OperatorState, str, str], None]
    tick: Callable[[OperatorState, Mapping[Key, Any], float], None] | None = None


def start(state: OperatorState, part: Resync, index: Mapping[Key, Any]) -> "asyncio.Task[None]":
    return asyncio.create_task(loop(state, part, index), name=f"kubetune-resync-{part.kind}")


async def loop(state: OperatorState, part: Resync, index: Mapping[Key, Any]) -> None:
    """Forever: sleep an interval, tick, reconcile what is due. Errors are logged per object and
    never stop the loop."""
    limit = asyncio.Semaphore(CONCURRENCY)
    last = time.monotonic()

    async def one(key: Key) -> None:
        async with limit:
            try:
                await asyncio.to_thread(part.reconcile, state, *key)
            except Exception:  # noqa: BLE001 - one object's trouble must not stop the others
                log.exception("resync of %s %s/%s failed", part.kind, *key)

    while True:
        await asyncio.sleep(state.interval)
        now = time.monotonic()
        if part.tick is not None:
            try:
                part.tick(state, index, now - last)
            except Exception:  # noqa: BLE001 - a gauge must not stop the reconciles
                log.exception("resync tick of %s failed", part.kind)
        last = now
        await asyncio.gather(*(one(key) for key in part.due(index)))

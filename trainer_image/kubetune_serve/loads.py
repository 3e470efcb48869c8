"""Runtime adapter loads, off the request path.

A load fetches a source that may be slow or hostile (a stalled S3 endpoint, a huge file), so it runs
in a small pool of its own threads, never in the threads that serve inference:

* at most `max_concurrent` loads run at once; one more is answered 429 at once, with Retry-After
  (a slot is held until its thread really ends, so a stalled fetch cannot multiply threads);
* each load has a total deadline: past it the client gets 504, the load is told to stop at its next
  chunk, and whatever it fetched is thrown away, even if it finishes later;
* only the final attach takes the engine's lock, after every byte is local and checked.

A merged adapter (`lora_path` a `merge:` path, see `kubetune.api.merging`) is one load: every source
is checked against the allow-list before any is fetched, all are fetched within the one deadline and
the one size cap, and the merge is built in the attach.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, InvalidStateError

from .engine import Adapter, Engine, EngineError, Prepared

BUSY_RETRY_AFTER_S = 5


def busy() -> EngineError:
    return EngineError("too many adapter loads in progress; retry later", 429, "RateLimitError")


def timed_out(seconds: float) -> EngineError:
    return EngineError(f"loading the adapter took longer than {seconds:g}s; it was abandoned", 504, "TimeoutError")


class Loads:
    def __init__(self, engine: Engine, allowed: tuple[str, ...], max_concurrent: int = 2, timeout: float = 300.0):
        self.engine, self.allowed, self.timeout = engine, allowed, timeout
        self.max_concurrent = max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._running = 0
        self._count_lock = threading.Lock()

    @property
    def running(self) -> int:
        return self._running

    async def load(self, name: str, uri: str) -> Adapter:
        """Load `uri` as `name` within the deadline; EngineError (429, 504, the engine's own) otherwise."""
        if not self._slots.acquire(blocking=False):
            raise busy()
        future: Future[Adapter] = Future()
        abandoned = threading.Event()
        thread = threading.Thread(
            target=self._work, args=(name, uri, abandoned, future), name="kubetune-adapter-load", daemon=True
        )
        with self._count_lock:
            self._running += 1
        try:
            thread.start()
        except BaseException:
            self._release()
            raise
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except TimeoutError:
            abandoned.set()  # the worker discards its result, whenever it ends
            raise timed_out(self.timeout) from None
        except asyncio.CancelledError:
            abandoned.set()  # the server is stopping: nobody is waiting for this load any more
            raise

    def _work(self, name: str, uri: str, abandoned: threading.Event, future: Future[Adapter]) -> None:
        try:
            prepared = self.engine.prepare_adapter(name, uri, allowed=self.allowed, cancelled=abandoned.is_set)
            if isinstance(prepared, Prepared):
                if abandoned.is_set():
                    Engine.discard(prepared)
                    return
                adapter = self.engine.attach(prepared)
            else:
                adapter = prepared
            if abandoned.is_set() or not _settle(future, adapter):
                self._undo(adapter, prepared)
        except BaseException as error:  # noqa: BLE001 - handed to the request, or dropped when abandoned
            if not abandoned.is_set():
                _settle(future, error)
        finally:
            self._release()

    def _undo(self, adapter: Adapter, prepared: Prepared | Adapter) -> None:
        """The client was told 504: a load it gave up on must not appear later."""
        if isinstance(prepared, Prepared):
            try:
                self.engine.unload_adapter(adapter.name)
            except EngineError:
                pass

    def _release(self) -> None:
        with self._count_lock:
            self._running -= 1
        self._slots.release()


def _settle(future: Future[Adapter], outcome: Adapter | BaseException) -> bool:
    """Hand the outcome to the waiting request; False when it already gave up (the future was cancelled)."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        return False
    return True

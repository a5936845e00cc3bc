"""Drives an `LLMEngine` from asyncio code (Ray Serve replicas, the HTTP server).

The engine is single-threaded, so it lives in one background thread that alternates between applying queued
commands (add, abort, anything else that touches engine state) and running steps. Outputs go back to each request's
asyncio queue on the caller's event loop. A request whose consumer goes away (client disconnect, cancellation) is
aborted, so its blocks return to the pool.
"""

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from .outputs import RequestOutput
from .protocol import Engine

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class EngineStopped(RuntimeError):
    """The engine was shut down (its replica is being removed) before the request finished; retrying elsewhere
    gives the full output."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._error: BaseException | None = None
        self._unsettled: set[asyncio.Future] = set()  # submitted commands not yet run
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # ---- engine thread ----
    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_commands()
                if self._stopped:
                    break
                if not self.engine.has_work:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as e:  # surface to every waiter instead of hanging them
            log.exception("engine loop died")
            self._error = e  # before the sweep below: a later submit raises instead of queueing
            self._end_all(self._dead)
            return
        self._end_all(_stopped)

    def _end_all(self, error: Callable[[], BaseException]) -> None:
        """Every open stream and every command that will never run gets `error()`."""
        for rid in list(self._streams):
            self._deliver(rid, error())
        for future in list(self._unsettled):
            future.get_loop().call_soon_threadsafe(_settle, future, None, error())

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    # ---- any thread ----
    def check_alive(self) -> None:
        """Raise EngineDeadError once the engine loop has died (Ray Serve's health check calls this), EngineStopped
        once it was shut down."""
        if self._error is not None:
            raise self._dead()
        if self._stopped:
            raise _stopped()

    def _dead(self) -> EngineDeadError:
        return EngineDeadError(f"engine loop died: {self._error!r}")

    def submit(self, command: Callable[[], Any]) -> "asyncio.Future[Any]":
        """Run `command()` on the engine thread between steps; the future resolves with its result (or, should the
        engine loop die or stop first, with EngineDeadError or EngineStopped)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._unsettled.add(future)  # before the check: the loop either sees it when ending or has ended already
        try:
            self.check_alive()
        except (EngineDeadError, EngineStopped):
            self._unsettled.discard(future)
            raise

        def run() -> None:
            self._unsettled.discard(future)
            try:
                result = command()
            except BaseException as e:
                loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        self._commands.put(run)
        self._wake.set()
        return future

    async def generate(
        self,
        request_id: str,
        add: Callable[[], Any],
        on_added: Callable[[Any], AsyncIterator[RequestOutput]] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. `add` queues it (on the engine thread; what it raises, e.g. InvalidRequest,
        comes back here); `on_added`, given what `add` returned, may yield the first outputs itself (a remote
        prefill). If the consumer leaves early, the request is aborted and its blocks freed."""
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            added = await self.submit(add)
            if on_added is not None:
                async for out in on_added(added):
                    finished = out.finished
                    yield out
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(lambda: self.engine.abort(request_id))
                self._wake.set()

    def shutdown(self) -> None:
        """Stop the loop. Requests still open are aborted first, so their blocks return to the pool, and their
        streams end with EngineStopped (a retryable error) rather than hang."""

        def stop() -> None:
            for rid in list(self._streams):
                self.engine.abort(rid)
            self._stopped = True

        if self._thread.is_alive():
            self._commands.put(stop)
            self._wake.set()
            self._thread.join(timeout=5)
        self._stopped = True


def _stopped() -> EngineStopped:
    return EngineStopped("this replica shut down before the request finished; retry it")


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

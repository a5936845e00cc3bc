"""Runs batches: claims one from the store, validates its input file, sends its lines through the same handlers the
online API answers with (`OpenAIServer.chat` / `.completions`: same validation, template, sampling and response
shape), records each result as it finishes, and writes the output and error files at the end.

Priority below online requests. The engine has no priorities, so the runner yields by admission: it keeps at most
`max_concurrency` lines in flight while the replica is idle and at most `busy_concurrency` while online requests are
in flight on it (or ended less than `idle_s` ago), as `OnlineLoad` counts them at the HTTP layer. A line already
admitted runs to its end; new lines wait. So under online load a batch holds `busy_concurrency` engine slots (plus
the lines that were running when the load came, until they end), and it takes the rest back once the load is gone.

Lines that share a prompt prefix run leader first (`grouping.PrefixScheduler`), so their document is prefilled once.

Stops: a cancel (seen within `poll_s`, at once when asked through this process) aborts the lines in flight and
writes what had finished; a lease lost to another runner stops this one without writing anything; the completion
window's end aborts what runs and writes the unfinished lines to the error file as `batch_expired`. A line that
fails (its body refused by the endpoint, an error of the engine) goes to the error file and the rest go on; a 429 or
503 (overload, a restarting engine) is retried `retries` times first.
"""

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from glmserve.api.errors import APIError, RateLimitError, ServiceUnavailableError

from .grouping import PrefixScheduler, group_by_prefix
from .lines import (
    LineError,
    Request,
    RequestRef,
    TooManyLines,
    error_line,
    output_line,
    parse_line,
    read_request,
    scan_lines,
)
from .options import BatchOptions
from .store import BatchRecord, BatchStore, LeaseLost, Owner

log = logging.getLogger(__name__)
Handler = Callable[[bytes], Awaitable[Any]]  # a request body in, a pydantic response out (or an APIError raised)
_TICK_S = 0.05
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


class OnlineLoad:
    """Online requests in flight on this replica, and when the last one ended (fed by `OnlineLoadMiddleware`)."""

    def __init__(self, idle_s: float = 1.0):
        self.idle_s = idle_s
        self.in_flight = 0
        self._last_end = -math.inf

    def begin(self) -> None:
        self.in_flight += 1

    def end(self) -> None:
        self.in_flight -= 1
        self._last_end = time.monotonic()

    def busy(self) -> bool:
        return self.in_flight > 0 or time.monotonic() - self._last_end < self.idle_s


class OnlineLoadMiddleware:
    """Counts the online generation requests (chat, completions, responses) from arrival to the last byte sent."""

    PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")

    def __init__(self, app, load: OnlineLoad):
        self.app = app
        self.load = load

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.PATHS:
            await self.app(scope, receive, send)
            return
        self.load.begin()
        ended = False

        async def counted_send(message) -> None:
            nonlocal ended
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and not ended:
                ended = True
                self.load.end()

        try:
            await self.app(scope, receive, counted_send)
        finally:
            if not ended:
                self.load.end()


class BatchRunner:
    def __init__(
        self,
        store: BatchStore,
        handlers: Mapping[str, Handler],
        options: BatchOptions | None = None,
        load: OnlineLoad | None = None,
        served_by: str | None = None,
    ):
        """`served_by`: run only the batches created through a server of this name (several deployments may
        share a store directory)."""
        self.store = store
        self.served_by = served_by
        self.handlers = dict(handlers)
        self.options = options or BatchOptions()
        self.load = load or OnlineLoad(self.options.idle_s)
        self.owner = Owner()
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._current: str | None = None  # the batch being run
        self._status: str | None = None  # its status as last read
        self._lost = False

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(self.handlers)

    # ---- lifecycle ----
    def start(self) -> None:
        """Begin looking for work (on the running event loop): batches left in progress by an earlier process
        resume now."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batch-runner")
            log.info("batch runner %s started on %s", self.owner, self.store.root)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def poke(self) -> None:
        """Something changed (a batch was created or cancelled here): look now rather than at the next poll."""
        if self._wake is not None:
            self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                record = await asyncio.to_thread(self.store.claim, self.owner, self.options.lease_s, self.served_by)
            except Exception:
                log.exception("batch runner: could not read the store")
                record = None
            if record is None:
                await self._sleep(self.options.poll_s)
                continue
            try:
                await self._run(record)
            except asyncio.CancelledError:
                await asyncio.shield(asyncio.to_thread(self.store.release, record.id, self.owner))
                raise
            except LeaseLost as e:
                log.warning("%s", e)
            except Exception:
                log.exception("batch %s: runner failed; it will be resumed", record.id)
                await asyncio.to_thread(self.store.release, record.id, self.owner)
                await self._sleep(self.options.poll_s)

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
        self._wake.clear()

    # ---- one batch ----
    async def _run(self, record: BatchRecord) -> None:
        self._current, self._status, self._lost = record.id, record.status, False
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(record.id))
        try:
            if record.status == "validating" and not await self._validate(record):
                return
            if self._status == "in_progress":
                outcome = await self._work(record)
                if self._lost:
                    raise LeaseLost(f"batch {record.id}: lost its lease mid-run")
                if outcome == "expired":
                    await asyncio.to_thread(self.store.finish, record.id, self.owner, "expired")
                    log.info("batch %s: expired", record.id)
                    return
                if outcome == "done" and await asyncio.to_thread(
                    self.store.set_status, record.id, self.owner, "finalizing", ("in_progress",)
                ):
                    self._status = "finalizing"
                else:
                    self._status = "cancelling"
            if self._status in ("finalizing", "cancelling"):
                final = "completed" if self._status == "finalizing" else "cancelled"
                done = await asyncio.to_thread(self.store.finish, record.id, self.owner, final)
                counts = done.to_api().request_counts
                log.info("batch %s: %s (%d done, %d failed of %d)", record.id, final, counts.completed,
                         counts.failed, counts.total)  # fmt: skip
        finally:
            keeper.cancel()
            self._current = None

    async def _keep_lease(self, batch_id: str) -> None:
        period = min(self.options.poll_s, self.options.lease_s / 3)
        while True:
            try:
                status = await asyncio.to_thread(self.store.renew, batch_id, self.owner, self.options.lease_s)
            except Exception:
                log.exception("batch %s: could not renew the lease", batch_id)
            else:
                if status is None:
                    self._lost = True
                    return
                self._status = status
            await self._sleep(period)

    async def _validate(self, record: BatchRecord) -> bool:
        """validating -> in_progress with the malformed lines already in the error file; or the batch fails."""
        path = self.store.file_path(record.input_file_id)

        def scan() -> tuple[int, list[tuple[int, str]]]:
            total, errors = 0, []
            with open(path, "rb") as f:
                for item in scan_lines(f, (record.endpoint,), self.options.max_lines):
                    total += 1
                    if isinstance(item, LineError):
                        errors.append((item.line, json.dumps(error_line(item.custom_id, item.code, item.message,
                                                                        item.line))))  # fmt: skip
            return total, errors

        failure = None
        try:
            total, errors = await asyncio.to_thread(scan)
            if total == 0:
                failure = {"code": "empty_file", "message": "the input file has no requests"}
        except TooManyLines as e:
            failure = {"code": "too_many_requests", "message": str(e)}
        except FileNotFoundError:
            failure = {"code": "file_not_found", "message": f"the input file {record.input_file_id} is gone"}
        if failure is not None:
            await asyncio.to_thread(self.store.finish, record.id, self.owner, "failed", [failure])
            log.info("batch %s: failed validation: %s", record.id, failure["message"])
            return False
        await asyncio.to_thread(self.store.start, record.id, self.owner, total, errors)
        if self._status == "validating":
            self._status = "in_progress"
        log.info("batch %s: %d requests, %d malformed", record.id, total, len(errors))
        return True

    async def _work(self, record: BatchRecord) -> str:
        """Run every line without a result; "done", "cancel" (cancelled or lease lost) or "expired"."""
        path = self.store.file_path(record.input_file_id)

        def pending() -> list[RequestRef]:
            done = self.store.done_lines(record.id)
            with open(path, "rb") as f:
                return [
                    item.ref()
                    for item in scan_lines(f, (record.endpoint,))
                    if isinstance(item, Request) and item.line not in done
                ]

        refs = await asyncio.to_thread(pending)
        if refs:
            log.info("batch %s: %d lines to run", record.id, len(refs))
        scheduler = PrefixScheduler(group_by_prefix(refs, text=lambda r: r.prefix))
        running: dict[asyncio.Task, RequestRef] = {}
        outcome = "done"
        try:
            while True:
                if self._lost or self._status == "cancelling":
                    outcome = "cancel"
                    break
                if record.expires_at is not None and time.time() >= record.expires_at:
                    outcome = "expired"
                    break
                limit = self.options.busy_concurrency if self.load.busy() else self.options.max_concurrency
                while len(running) < limit and (ref := scheduler.next()) is not None:
                    task = asyncio.get_running_loop().create_task(self._one(record, path, ref))
                    running[task] = ref
                if scheduler.finished and not running:
                    break
                if running:
                    finished, _ = await asyncio.wait(running, timeout=_TICK_S, return_when=asyncio.FIRST_COMPLETED)
                    for task in finished:
                        scheduler.done(running.pop(task))
                        task.result()  # a failure of the store itself ends the run (it is resumed later)
                else:
                    await asyncio.sleep(_TICK_S)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        if outcome == "expired":
            await self._expire(record, path)
        return outcome

    async def _expire(self, record: BatchRecord, path: Path) -> None:
        def write() -> None:
            done = self.store.done_lines(record.id)
            with open(path, "rb") as f:
                for item in scan_lines(f, (record.endpoint,)):
                    if isinstance(item, Request) and item.line not in done:
                        line = error_line(item.custom_id, "batch_expired", EXPIRED_MESSAGE, item.line)
                        self.store.record(record.id, item.line, item.custom_id, False, json.dumps(line), self.owner)

        await asyncio.to_thread(write)

    async def _one(self, record: BatchRecord, path: Path, ref: RequestRef) -> None:
        raw = await asyncio.to_thread(read_request, path, ref.offset, ref.length)
        item = parse_line(raw, ref.line, (record.endpoint,))
        if isinstance(item, LineError):  # the file changed under us; input files are never rewritten
            ok, line = False, error_line(ref.custom_id, item.code, item.message, ref.line)
        else:
            ok, line = await self.execute(record.endpoint, item)
        await asyncio.to_thread(self.store.record, record.id, ref.line, ref.custom_id, ok, json.dumps(line),
                                self.owner)  # fmt: skip

    async def execute(self, endpoint: str, request: Request) -> tuple[bool, dict[str, Any]]:
        return await run_request(self.handlers[endpoint], request, self.options.retries)


async def run_request(handler: Handler, request: Request, retries: int = 2) -> tuple[bool, dict[str, Any]]:
    """One request through its endpoint's handler: (succeeded, its result line). A 429/503 is retried `retries`
    times after its Retry-After (at most 30 s); any other failure is the line's result."""
    body = request.raw_body
    for attempt in range(retries + 1):
        try:
            result = await handler(body)
            return True, output_line(request.custom_id, 200, json.loads(result.model_dump_json()))
        except (RateLimitError, ServiceUnavailableError) as e:
            if attempt == retries:
                return False, output_line(request.custom_id, e.status_code, e.body())
            await asyncio.sleep(min(e.retry_after, 30.0))
        except APIError as e:
            return False, output_line(request.custom_id, e.status_code, e.body())
        except Exception as e:  # our bug, not the line's: say so, and go on with the others
            log.exception("batch line %d (%r) failed", request.line, request.custom_id)
            error = APIError(f"the server failed on this request: {type(e).__name__}: {e}")
            return False, output_line(request.custom_id, error.status_code, error.body())
    raise AssertionError("unreachable")

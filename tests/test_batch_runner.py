"""The batch runner with stand-in handlers (no model): priority below online requests, retries after 503, a failing
handler that fails only its line, the completion window, a lost lease, and the online-load middleware."""

import asyncio
import io
import json
import time

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from glmserve.api.errors import InvalidRequestError, ServiceUnavailableError
from glmserve.batch.options import BatchOptions
from glmserve.batch.runner import BatchRunner, OnlineLoad, OnlineLoadMiddleware
from glmserve.batch.store import BatchStore, Owner

URL = "/v1/completions"


class Echo(BaseModel):
    text: str


def _file(store: BatchStore, n: int, prompt=lambda i: f"p{i}") -> str:
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": URL, "body": {"prompt": prompt(i)}})
             for i in range(n)]  # fmt: skip
    return store.create_file("batch", "in.jsonl", io.BytesIO("\n".join(lines).encode()), 1 << 20).id


def _batch(store: BatchStore, n: int, window_s: int = 3600) -> str:
    return store.create_batch(_file(store, n), URL, window_s, "24h", None, max_active=10).id


async def _until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _lines(store: BatchStore, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in store.file_path(file_id).read_text().splitlines()] if file_id else []


def test_batch_yields_to_online_load(tmp_path):
    store = BatchStore(tmp_path)
    batch_id = _batch(store, 40)
    in_flight, seen = 0, {"busy": 0, "idle": 0}
    load = OnlineLoad(idle_s=0.0)

    async def handler(body: bytes) -> Echo:
        nonlocal in_flight
        in_flight += 1
        phase = "busy" if load.busy() else "idle"
        seen[phase] = max(seen[phase], in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return Echo(text=json.loads(body)["prompt"])

    async def main() -> None:
        options = BatchOptions(max_concurrency=6, busy_concurrency=1, poll_s=0.05, idle_s=0.0)
        runner = BatchRunner(store, {URL: handler}, options, load)
        load.begin()  # an online request is in flight from the start
        runner.start()
        await _until(lambda: store.get_batch(batch_id).completed >= 8)
        assert store.get_batch(batch_id).completed < 30
        load.end()  # online load gone: the batch takes the idle capacity
        await _until(lambda: store.get_batch(batch_id).status == "completed")
        await runner.stop()

    asyncio.run(main())
    assert seen == {"busy": 1, "idle": 6}
    outputs = _lines(store, store.get_batch(batch_id).output_file_id)
    assert [o["custom_id"] for o in outputs] == [f"r{i}" for i in range(40)]
    assert outputs[3]["response"] == {**outputs[3]["response"], "status_code": 200, "body": {"text": "p3"}}


def test_retries_then_errors_only_fail_their_line(tmp_path):
    store = BatchStore(tmp_path)
    batch_id = _batch(store, 5)
    attempts: dict[str, int] = {}

    async def handler(body: bytes) -> Echo:
        prompt = json.loads(body)["prompt"]
        attempts[prompt] = attempts.get(prompt, 0) + 1
        if prompt == "p1" and attempts[prompt] == 1:
            raise ServiceUnavailableError("restarting", retry_after=0.01)
        if prompt == "p2":
            raise ServiceUnavailableError("always down", retry_after=0.01)
        if prompt == "p3":
            raise InvalidRequestError("max_tokens is too large", param="max_tokens")
        if prompt == "p4":
            raise KeyError("a bug")
        return Echo(text=prompt)

    async def main() -> None:
        runner = BatchRunner(store, {URL: handler}, BatchOptions(poll_s=0.05, retries=2))
        runner.start()
        await _until(lambda: store.get_batch(batch_id).status == "completed")
        await runner.stop()

    asyncio.run(main())
    batch = store.get_batch(batch_id)
    assert (batch.completed, batch.failed) == (2, 3)
    assert attempts == {"p0": 1, "p1": 2, "p2": 3, "p3": 1, "p4": 1}
    errors = {e["custom_id"]: e["response"] for e in _lines(store, batch.error_file_id)}
    assert errors["r2"]["status_code"] == 503
    assert errors["r3"]["status_code"] == 400 and errors["r3"]["body"]["error"]["param"] == "max_tokens"
    assert errors["r4"]["status_code"] == 500 and "KeyError" in errors["r4"]["body"]["error"]["message"]


def test_completion_window_end_expires_the_rest(tmp_path):
    store = BatchStore(tmp_path)
    batch_id = _batch(store, 30, window_s=2)  # ends 1-2 s from now (whole seconds): mid-run

    async def handler(body: bytes) -> Echo:
        await asyncio.sleep(0.2)
        return Echo(text="x")

    async def main() -> None:
        runner = BatchRunner(store, {URL: handler}, BatchOptions(poll_s=0.05, max_concurrency=2))
        runner.start()
        await _until(lambda: store.get_batch(batch_id).status == "expired")
        await runner.stop()

    asyncio.run(main())
    batch = store.get_batch(batch_id)
    assert batch.expired_at and 0 < batch.completed < 30 and batch.completed + batch.failed == 30
    errors = _lines(store, batch.error_file_id)
    assert len(errors) == batch.failed and {e["error"]["code"] for e in errors} == {"batch_expired"}


def test_a_runner_that_loses_its_lease_stops_and_writes_nothing(tmp_path):
    store = BatchStore(tmp_path)
    batch_id = _batch(store, 50)
    calls = 0

    async def handler(body: bytes) -> Echo:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return Echo(text="x")

    async def main() -> None:
        runner = BatchRunner(store, {URL: handler}, BatchOptions(poll_s=0.05, max_concurrency=2, lease_s=0.3))
        runner.start()
        await _until(lambda: store.get_batch(batch_id).completed >= 2)
        thief = Owner()
        with store._write() as c:  # another replica took it (as after a long pause of this one)
            c.execute("UPDATE batches SET owner = ?, lease_until = ? WHERE id = ?", (str(thief), time.time() + 3600,
                                                                                   batch_id))  # fmt: skip
        await asyncio.sleep(0.5)
        stopped_at = calls
        await asyncio.sleep(0.3)
        assert calls == stopped_at  # it stopped sending lines
        await runner.stop()

    asyncio.run(main())
    batch = store.get_batch(batch_id)
    assert batch.status == "in_progress" and batch.output_file_id is None and batch.completed < 50


@pytest.mark.parametrize("stream", [False, True])
def test_online_load_middleware_counts_until_the_last_byte(stream):
    load = OnlineLoad(idle_s=0.0)
    app = FastAPI()
    seen = []

    @app.post("/v1/completions")
    async def completions():
        seen.append(load.in_flight)
        if stream:
            from fastapi.responses import StreamingResponse

            async def chunks():
                yield "a"
                seen.append(load.in_flight)
                yield "b"

            return StreamingResponse(chunks())
        return {"ok": True}

    @app.get("/v1/batches")
    async def batches():
        seen.append(load.in_flight)
        return {}

    app.add_middleware(OnlineLoadMiddleware, load=load)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            await client.post("/v1/completions")
            await client.get("/v1/batches")

    asyncio.run(main())
    assert seen == ([1, 1, 0] if stream else [1, 0]) and load.in_flight == 0

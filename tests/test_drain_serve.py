"""Draining on a real Ray Serve app (the embedded model, colocated): scaling decode from 2 replicas to 1, then
redeploying with a changed config (every replica replaced), each while 20 streams run. No request is lost: each ends
with all its tokens, or with the retryable `replica_stopping` error; afterwards no replica holds a request or a KV
block, and the app answers as before."""

import asyncio
import time

import httpx
import openai
import pytest
from ray import serve
from ray_fixtures import local_ray
from server_process import free_port

from glmserve.cluster import serve_env
from glmserve.cluster.app import build_app
from glmserve.cluster.serving_config import ServingConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STREAMS = 20
MAX_TOKENS = 400
APP = "drain"


def config(decode_replicas: int, slo_tpot_ms: float = 200) -> ServingConfig:
    c = ServingConfig(slo_tpot_ms=slo_tpot_ms)
    c.prefill.replicas = 0
    c.decode.replicas = decode_replicas
    c.decode.graceful_shutdown_timeout_s = 120  # long enough for every stream to finish
    return c


@pytest.fixture(scope="module")
def base():
    serve_env.set_proxy_env()
    fixture = local_ray()
    next(fixture)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config(2)), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    next(fixture, None)


async def _stream(api: openai.AsyncOpenAI, i: int, streaming: set[int], all_streaming: asyncio.Event) -> tuple:
    """('ok', completion tokens, end time) or ('error', code, end time)."""
    try:
        stream = await api.completions.create(
            model="glm5-tiny",
            prompt=f"def f{i}(x):",
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        tokens = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                streaming.add(i)
                if len(streaming) == STREAMS:
                    all_streaming.set()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return "ok", tokens, time.monotonic()
    except openai.APIError as e:
        return "error", (e.body or {}).get("code"), time.monotonic()


def _during_streams(base: str, change) -> tuple[list[tuple], float]:
    """Start STREAMS streams, apply `change` (a blocking Serve call) once each has its first token, wait for all."""

    async def run():
        api = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
        streaming, all_streaming = set(), asyncio.Event()
        tasks = [asyncio.create_task(_stream(api, i, streaming, all_streaming)) for i in range(STREAMS)]
        await asyncio.wait_for(all_streaming.wait(), 120)
        changed_at = time.monotonic()
        await asyncio.to_thread(change)
        return await asyncio.gather(*tasks), changed_at

    return asyncio.run(run())


def _assert_none_lost(outcomes: list[tuple], changed_at: float) -> None:
    for kind, value, _ in outcomes:
        if kind == "ok":
            assert value == MAX_TOKENS  # every token, not a stream cut short with a 200
        else:
            assert value == "replica_stopping", value
    assert max(end for *_, end in outcomes) > changed_at  # the change did happen while streams ran


def _assert_idle(base: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        lines = [line for line in httpx.get(f"{base}/metrics").text.splitlines() if 'role="decode"' in line]
        busy = [line for line in lines if line.startswith(("glmserve:num_requests_running", "glmserve:kv_cache_usage"))]
        if busy and all(float(line.rsplit(" ", 1)[1]) == 0 for line in busy):
            return
        assert time.monotonic() < deadline, busy
        time.sleep(1)


def _replicas() -> int:
    return serve.status().applications[APP].deployments["DecodeServer"].replica_states.get("RUNNING", 0)


def test_scale_in_and_redeploy_lose_no_request(base):
    assert _replicas() == 2
    outcomes, changed_at = _during_streams(base, lambda: serve.run(build_app(config(1)), name=APP, route_prefix="/"))
    _assert_none_lost(outcomes, changed_at)
    _assert_idle(base)
    assert _replicas() == 1

    redeploy = config(1, slo_tpot_ms=150)  # new init args: Serve replaces the replica
    outcomes, changed_at = _during_streams(base, lambda: serve.run(build_app(redeploy), name=APP, route_prefix="/"))
    _assert_none_lost(outcomes, changed_at)
    _assert_idle(base)
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "def f(x):", "max_tokens": 8}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8

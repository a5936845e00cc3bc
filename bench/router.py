"""`glmserve bench router`: latency the OpenAI router adds over calling the decode deployment directly.

The same one-token request (a token-id prompt, max_tokens 1) is timed N times each way against one running app:
through HTTP (Serve's proxy -> DecodeServer's OpenAI API: validation, token prompt, JSON response -> its engine) and
through a DeploymentHandle from the driver straight to DecodeServer's engine (`generate`). Both take one Serve
request to the same replica and one engine request; the p50 difference is what the HTTP ingress and API cost.

To tell our API layer from Serve's HTTP path, the same requests are first timed in one process, without Ray: into a
DecodeWorker directly, and through the FastAPI app over httpx's ASGI transport (no network).
"""

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import numpy as np
import torch

from glmserve.bench.report import write_report
from glmserve.cluster.serving_config import ServingConfig
from glmserve.engine.request import EngineRequest
from glmserve.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
GOAL_MS = 2.0


PROMPT = list(range(100, 132))


_request_ids = itertools.count()


async def _direct_once(generate) -> float:
    """Seconds for one request through `generate(EngineRequest)` (an async iterator of outputs)."""
    t0 = time.perf_counter()
    request = EngineRequest(
        request_id=f"direct-{next(_request_ids)}",
        prompt_token_ids=PROMPT,
        params=SamplingParams(temperature=0, max_tokens=1),
    )
    async for _ in generate(request):
        pass
    return time.perf_counter() - t0


COMPLETION = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0}
Post = Callable[[], Awaitable[None]]  # one /v1/completions request, its whole response read


async def _http_once(post: Post) -> float:
    t0 = time.perf_counter()
    await post()
    return time.perf_counter() - t0


async def _time_interleaved(paths: dict[str, Callable[[], Awaitable[float]]], n: int) -> dict[str, np.ndarray]:
    """Milliseconds per request along each path (a coroutine timing one request), one request of each in turn after
    a warm-up: drift in the load of the two shared cores then falls on every path alike (timing all of one path and
    then all of the other let it bias the difference by more than the difference itself)."""
    for _ in range(min(20, n)):
        for once in paths.values():
            await once()
    times = {name: np.empty(n) for name in paths}
    for i in range(n):
        for name, once in paths.items():
            times[name][i] = await once()
    return {name: t * 1e3 for name, t in times.items()}


async def _time_in_process(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Milliseconds per request through the FastAPI app (ASGI, no network) and straight into the same worker."""
    from glmserve.api.app import create_app
    from glmserve.api.openai_server import OpenAIServer
    from glmserve.decode.server import DecodeWorker
    from glmserve.engine.engine_args import EngineArgs
    from glmserve.model.default_checkpoint import default_checkpoint
    from glmserve.model.tokenizer import Tokenizer

    torch.set_num_threads(1)  # as the decode replica runs on CPU (num_cpus 1, cluster/app.py)
    worker = DecodeWorker(EngineArgs())
    config = worker.engine.config
    tokenizer = Tokenizer.from_pretrained(default_checkpoint())
    server = OpenAIServer(worker, tokenizer, "glm5-tiny", config.max_position_embeddings)
    transport = httpx.ASGITransport(app=create_app(server))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process", timeout=60) as client:

            async def post() -> None:
                (await client.post("/v1/completions", json=COMPLETION)).raise_for_status()

            times = await _time_interleaved(
                {"http": lambda: _http_once(post), "direct": lambda: _direct_once(worker.generate)}, n
            )
            return times["http"], times["direct"]
    finally:
        worker.shutdown()


async def _time_serve(base: str, n: int) -> dict[str, np.ndarray]:
    """Milliseconds per request, interleaved: over HTTP with aiohttp ("http") and with httpx ("http_httpx"), and
    through a DeploymentHandle ("direct"). The driver's handle routes on this event loop, as the proxy's does
    (`serve_env`), so that both paths pay the same for routing. The router's figure uses aiohttp: the client shares
    the two cores with the server, and httpx's heavier per-request work would be counted as the router's; httpx is
    timed alongside to show how much."""
    from ray.serve.handle import DeploymentHandle

    handle = DeploymentHandle("DecodeServer", "glmserve")  # not serve's cached one: it must shut down in this loop
    handle._init(_run_router_in_separate_loop=False)
    generate = handle.options(stream=True).generate.remote
    timeout = 60
    try:
        async with (
            aiohttp.ClientSession(base, timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            httpx.AsyncClient(base_url=base, timeout=timeout) as client,
        ):

            async def post_aiohttp() -> None:
                async with session.post("/v1/completions", json=COMPLETION) as r:
                    r.raise_for_status()
                    await r.read()

            async def post_httpx() -> None:
                (await client.post("/v1/completions", json=COMPLETION)).raise_for_status()

            return await _time_interleaved(
                {
                    "http": lambda: _http_once(post_aiohttp),
                    "http_httpx": lambda: _http_once(post_httpx),
                    "direct": lambda: _direct_once(generate),
                },
                n,
            )
    finally:
        await handle.shutdown_async()


def run_bench_router(num_requests: int = 200, port: int = 8123, output_json: str | None = None) -> dict:
    import ray
    from ray import serve

    from glmserve.cluster.app import build_app, ray_init_kwargs

    local_http, local_direct = asyncio.run(_time_in_process(num_requests))
    config = ServingConfig(port=port)
    config.prefill.replicas = 0
    ray.init(**ray_init_kwargs())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="glmserve", route_prefix="/")
        times = asyncio.run(_time_serve(f"http://127.0.0.1:{port}", num_requests))
    finally:
        serve.shutdown()
        ray.shutdown()
    row: dict = {"num_requests": num_requests}
    for name, ms in times.items():
        row[f"{name}_p50_ms"] = float(np.median(ms))
        row[f"{name}_p90_ms"] = float(np.percentile(ms, 90))
    row["overhead_p50_ms"] = row["http_p50_ms"] - row["direct_p50_ms"]
    row["overhead_with_httpx_client_p50_ms"] = row["http_httpx_p50_ms"] - row["direct_p50_ms"]
    row["overhead_vs_goal"] = row["overhead_p50_ms"] / GOAL_MS
    row["in_process_direct_p50_ms"] = float(np.median(local_direct))
    row["in_process_api_p50_ms"] = float(np.median(local_http))
    row["in_process_api_overhead_p50_ms"] = row["in_process_api_p50_ms"] - row["in_process_direct_p50_ms"]
    print(f"router overhead, {num_requests} one-token requests (goal < {GOAL_MS} ms at p50)")
    print(f"{'path':<28}{'p50 ms':>9}{'p90 ms':>9}")
    print(f"{'DeploymentHandle -> decode':<28}{row['direct_p50_ms']:>9.2f}{row['direct_p90_ms']:>9.2f}")
    print(f"{'HTTP -> proxy -> decode':<28}{row['http_p50_ms']:>9.2f}{row['http_p90_ms']:>9.2f}")
    print(f"{'  the same, httpx client':<28}{row['http_httpx_p50_ms']:>9.2f}{row['http_httpx_p90_ms']:>9.2f}")
    print(f"{'added by the router':<28}{row['overhead_p50_ms']:>9.2f}   ({row['overhead_vs_goal']:.2f}x the goal)")
    print(f"{'  measured with httpx':<28}{row['overhead_with_httpx_client_p50_ms']:>9.2f}")
    print("in one process, without Ray:")
    print(f"{'DecodeWorker.generate':<28}{row['in_process_direct_p50_ms']:>9.2f}")
    print(f"{'FastAPI app (ASGI) -> worker':<28}{row['in_process_api_p50_ms']:>9.2f}")
    print(f"{'added by our API layer':<28}{row['in_process_api_overhead_p50_ms']:>9.2f}")
    if output_json:
        write_report(output_json, [row], {"goal_ms": GOAL_MS})
    return row

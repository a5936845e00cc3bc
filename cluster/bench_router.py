"""`glmserve bench router`: latency the OpenAI router adds over calling the decode deployment directly.

The same one-token request (a token-id prompt, max_tokens 1) is timed N times each way against one running app:
through HTTP (Serve's proxy -> DecodeServer's OpenAI API: validation, token prompt, JSON response -> its engine) and
through a DeploymentHandle from the driver straight to DecodeServer's engine (`generate`). Both take one Serve
request to the same replica and one engine request; the p50 difference is what the HTTP ingress and API cost.

To tell our API layer from Serve's HTTP path, the same requests are first timed in one process, without Ray: into a
DecodeWorker directly, and through the FastAPI app over httpx's ASGI transport (no network).
"""

import asyncio
import json
import logging
import time

import httpx
import numpy as np
import torch

from glmserve.decode.request import EngineRequest
from glmserve.model.sampling_params import SamplingParams

from .serving_config import ServingConfig

log = logging.getLogger(__name__)
GOAL_MS = 2.0


PROMPT = list(range(100, 132))


async def _time_direct(generate, n: int) -> np.ndarray:
    """Seconds per request through `generate(EngineRequest)` (an async iterator of outputs)."""
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        request = EngineRequest(
            request_id=f"direct-{i}", prompt_token_ids=PROMPT, params=SamplingParams(temperature=0, max_tokens=1)
        )
        async for _ in generate(request):
            pass
        out[i] = time.perf_counter() - t0
    return out


async def _time_http(client: httpx.AsyncClient, n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, "temperature": 0})
        r.raise_for_status()
        out[i] = time.perf_counter() - t0
    return out


async def _time_in_process(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Milliseconds per request through the FastAPI app (ASGI, no network) and straight into the same worker."""
    from glmserve.api.app import create_app
    from glmserve.api.openai_server import OpenAIServer
    from glmserve.decode.engine_args import EngineArgs
    from glmserve.decode.server import DecodeWorker
    from glmserve.model.default_checkpoint import default_checkpoint
    from glmserve.model.tokenizer import Tokenizer

    torch.set_num_threads(1)  # as the decode replica runs on CPU (num_cpus 1, cluster/app.py)
    worker = DecodeWorker(EngineArgs())
    config = worker.engine.config
    server = OpenAIServer(
        worker, Tokenizer.from_pretrained(default_checkpoint()), "glm5-tiny", config.max_position_embeddings,
        config.vocab_size,
    )  # fmt: skip
    transport = httpx.ASGITransport(app=create_app(server))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process", timeout=60) as client:
            await _time_http(client, min(20, n))
            await _time_direct(worker.generate, min(20, n))
            return await _time_http(client, n) * 1e3, await _time_direct(worker.generate, n) * 1e3
    finally:
        worker.shutdown()


async def _time_both(base: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Milliseconds per request each way, after a warm-up. The driver's handle routes on this event loop, as the
    proxy's does (`serve_env`), so that both paths pay the same for routing."""
    from ray.serve.handle import DeploymentHandle

    handle = DeploymentHandle("DecodeServer", "glmserve")  # not serve's cached one: it must shut down in this loop
    handle._init(_run_router_in_separate_loop=False)
    generate = handle.options(stream=True).generate.remote
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            await _time_http(client, min(20, n))
            await _time_direct(generate, min(20, n))
            return await _time_http(client, n) * 1e3, await _time_direct(generate, n) * 1e3
    finally:
        await handle.shutdown_async()


def run_bench_router(num_requests: int = 200, port: int = 8123, output_json: str | None = None) -> dict:
    import ray
    from ray import serve

    from .app import build_app, ray_init_kwargs

    local_http, local_direct = asyncio.run(_time_in_process(num_requests))
    config = ServingConfig(port=port)
    config.prefill.replicas = 0
    ray.init(**ray_init_kwargs())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="glmserve", route_prefix="/")
        via_http, direct = asyncio.run(_time_both(f"http://127.0.0.1:{port}", num_requests))
    finally:
        serve.shutdown()
        ray.shutdown()
    row = {
        "num_requests": num_requests,
        "direct_p50_ms": float(np.median(direct)),
        "http_p50_ms": float(np.median(via_http)),
        "direct_p90_ms": float(np.percentile(direct, 90)),
        "http_p90_ms": float(np.percentile(via_http, 90)),
    }
    row["overhead_p50_ms"] = row["http_p50_ms"] - row["direct_p50_ms"]
    row["overhead_vs_goal"] = row["overhead_p50_ms"] / GOAL_MS
    row["in_process_direct_p50_ms"] = float(np.median(local_direct))
    row["in_process_api_p50_ms"] = float(np.median(local_http))
    row["in_process_api_overhead_p50_ms"] = row["in_process_api_p50_ms"] - row["in_process_direct_p50_ms"]
    print(f"router overhead, {num_requests} one-token requests (goal < {GOAL_MS} ms at p50)")
    print(f"{'path':<28}{'p50 ms':>9}{'p90 ms':>9}")
    print(f"{'DeploymentHandle -> decode':<28}{row['direct_p50_ms']:>9.2f}{row['direct_p90_ms']:>9.2f}")
    print(f"{'HTTP -> proxy -> decode':<28}{row['http_p50_ms']:>9.2f}{row['http_p90_ms']:>9.2f}")
    print(f"{'added by the router':<28}{row['overhead_p50_ms']:>9.2f}   ({row['overhead_vs_goal']:.2f}x the goal)")
    print("in one process, without Ray:")
    print(f"{'DecodeWorker.generate':<28}{row['in_process_direct_p50_ms']:>9.2f}")
    print(f"{'FastAPI app (ASGI) -> worker':<28}{row['in_process_api_p50_ms']:>9.2f}")
    print(f"{'added by our API layer':<28}{row['in_process_api_overhead_p50_ms']:>9.2f}")
    if output_json:
        with open(output_json, "w") as f:
            json.dump({"benchmark": "router", "goal_ms": GOAL_MS, **row}, f, indent=2)
    return row

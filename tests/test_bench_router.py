"""`glmserve bench router`'s timing loop, in one process (the Serve half needs a cluster and is run by hand)."""

import asyncio

import numpy as np

from glmserve.bench import router as bench_router


def test_timing_alternates_one_request_of_each_way():
    calls: list[str] = []

    async def post() -> None:
        calls.append("http")

    async def generate(request):
        calls.append("direct")
        yield request

    times = asyncio.run(bench_router._time_interleaved(
        {"http": lambda: bench_router._http_once(post), "direct": lambda: bench_router._direct_once(generate)}, 5
    ))  # fmt: skip
    http, direct = times["http"], times["direct"]
    assert http.shape == direct.shape == (5,) and np.all(http >= 0) and np.all(direct >= 0)
    assert calls == ["http", "direct"] * 10  # 5 warm-up pairs, then 5 timed pairs, one of each in turn


def test_in_process_api_layer_serves_the_requests():
    via_api, direct = asyncio.run(bench_router._time_in_process(3))
    assert via_api.shape == direct.shape == (3,)
    assert np.all(via_api > 0) and np.all(direct > 0)

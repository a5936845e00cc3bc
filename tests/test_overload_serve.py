"""Overload settings through `glmserve serve --config` (Ray Serve, a real decode replica): the YAML's admission
limits answer 503 with Retry-After, its named API keys authenticate and their quotas answer 429, and /metrics
counts both, through the official `openai` client."""

import asyncio

import httpx
import openai
import pytest
import yaml
from server_process import running_server

pytestmark = pytest.mark.slow

OPS, ALICE = "sk-ops-0123456789", "sk-alice-0123456789"
CONFIG = {
    "decode": {"replicas": 1},
    "prefill": {"replicas": 0},
    "admission": {"max_num_queued_reqs": 2},
    "api_keys": [
        {"name": "ops", "key": OPS},
        {"name": "alice", "key": ALICE, "requests_per_minute": 2},
    ],
}
REQUEST = {"model": "glm5-tiny", "prompt": "def sort(xs):", "temperature": 0, "max_tokens": 48}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "serving.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    with running_server("--config", str(path)) as base:
        yield base


def client(base: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


async def _outcome(api: openai.AsyncOpenAI) -> str | openai.APIStatusError:
    try:
        stream = await api.completions.create(stream=True, extra_body={"ignore_eos": True}, **REQUEST)
        return "".join([c.choices[0].text async for c in stream if c.choices])
    except openai.APIStatusError as e:
        return e


def test_only_configured_keys_get_in(server):
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {OPS}"}).status_code == 200


def test_the_configured_admission_limit_refuses_with_503(server):
    async def flood():
        return await asyncio.gather(*(_outcome(client(server, OPS)) for _ in range(8)))

    outcomes = asyncio.run(flood())
    refused = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
    served = [o for o in outcomes if isinstance(o, str)]
    assert len(served) >= 2 and refused, outcomes
    assert all(o for o in served)
    for e in refused:
        assert e.status_code == 503 and e.body["code"] == "overloaded", e.body
        assert int(e.response.headers["Retry-After"]) >= 1
    assert 'reason="queued_requests"' in httpx.get(f"{server}/metrics").text


def test_a_keys_quota_refuses_with_429_and_metrics_count_it(server):
    async def alice_three_times():
        return [await _outcome(client(server, ALICE)) for _ in range(3)]

    first, second, third = asyncio.run(alice_three_times())
    assert isinstance(first, str) and isinstance(second, str)
    assert isinstance(third, openai.RateLimitError) and third.body["code"] == "requests_per_minute_exceeded"
    assert 'reason="requests_per_minute_exceeded"' in httpx.get(f"{server}/metrics").text

"""Overload, quotas and shutdown through the official `openai` client, against a real decode worker (the embedded
model) behind uvicorn: a replica past its admission limit answers 503 with Retry-After at once while the admitted
requests finish whole; a key past its quota gets 429; a replica shut down mid-stream ends the stream with a
retryable error. Afterwards nothing is held: no admission place, no KV block, and the next request's text is the
text it had before."""

import asyncio
import time

import httpx
import openai
import pytest
from inprocess_server import MODEL_NAME, serving
from prometheus_client.parser import text_string_to_metric_families

from glmserve.api.quota import ApiKey, Quotas
from glmserve.engine.admission import Admission, AdmissionLimits

pytestmark = pytest.mark.timeout(300)

MAX_QUEUED = 4
CLIENTS = 300  # the flood: every one must end with its tokens or a 503, none time out
GREEDY = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 24}
PROMPT = "The capital of France is"


def client(base: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def metric(base: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture(scope="module")
def overloadable():
    admission = Admission(AdmissionLimits(max_num_queued_reqs=MAX_QUEUED))
    with serving(server_options={"admission": admission}) as running:
        yield running


async def _one(api: openai.AsyncOpenAI, i: int) -> tuple[str, float, object]:
    """('ok', seconds, text) or ('refused', seconds to the refusal, the error)."""
    start = time.perf_counter()
    try:
        stream = await api.completions.create(prompt=f"{PROMPT} {i}", stream=True, **GREEDY)
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        return "ok", time.perf_counter() - start, text
    except openai.APIStatusError as e:
        return "refused", time.perf_counter() - start, e


def test_past_its_limit_a_replica_refuses_fast_and_finishes_what_it_admitted(overloadable):
    base, worker, server = overloadable
    api = client(base)

    async def flood():
        baseline = (await api.completions.create(prompt=PROMPT, **GREEDY)).choices[0].text
        results = await asyncio.gather(*(_one(api, i) for i in range(CLIENTS)))
        after = (await api.completions.create(prompt=PROMPT, **GREEDY)).choices[0].text
        return baseline, results, after

    rejected_before = metric(base, "glmserve:request_rejected_total", reason="queued_requests")
    baseline, results, after = asyncio.run(flood())
    served = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] == "refused"]
    assert len(served) >= MAX_QUEUED and refused, [r[0] for r in results]
    for _, _, text in served:
        assert text  # whole streams, not cut short by the flood around them
    for _, _, e in refused:
        assert e.status_code == 503 and e.body["code"] == "overloaded", e.body
        assert f"max_num_queued_reqs={MAX_QUEUED}" in e.body["message"]
        assert int(e.response.headers["Retry-After"]) >= 1
    # 300 connections opened at once by one process on two cores: bounded, not fast (the next test times one)
    assert max(s for _, s, _ in refused) < 30
    assert after == baseline
    assert asyncio.run(worker.wait_idle(30))
    assert server.admission.in_flight == 0 and server.admission.queued_tokens == 0
    rejected = metric(base, "glmserve:request_rejected_total", reason="queued_requests") - rejected_before
    assert rejected == len(refused)


def test_a_full_replica_refuses_in_milliseconds(overloadable):
    base, worker, server = overloadable
    api = client(base)

    async def refuse_while_full() -> list[float]:
        holders = [asyncio.create_task(_one(api, i)) for i in range(MAX_QUEUED)]
        while server.admission.in_flight < MAX_QUEUED:
            await asyncio.sleep(0.01)
        times = []
        for i in range(5):
            status, seconds, _ = await _one(api, 100 + i)
            assert status == "refused"
            times.append(seconds)
        assert all(r[0] == "ok" for r in await asyncio.gather(*holders))
        return times

    times = asyncio.run(refuse_while_full())
    assert sorted(times)[2] < 0.1, times  # before any rendering, tokenizing or engine work


def test_the_ttft_histogram_counts_from_arrival_as_the_client_sees_it(overloadable):
    base, _, _ = overloadable
    name = "glmserve:time_to_first_token_seconds_sum"
    queue, prefill = "glmserve:request_queue_time_seconds_sum", "glmserve:request_prefill_time_seconds_sum"
    before = {m: metric(base, m) for m in (name, queue, prefill)}

    async def first_token_s() -> float:
        start = time.perf_counter()
        stream = await client(base).completions.create(prompt=[7] * 3000, stream=True, **GREEDY)
        seen = None
        async for chunk in stream:
            if seen is None and chunk.choices and chunk.choices[0].text:
                seen = time.perf_counter() - start
        return seen

    client_ttft = asyncio.run(first_token_s())
    ttft, queued, prefilled = (metric(base, m) - before[m] for m in (name, queue, prefill))
    assert 0.7 * client_ttft < ttft <= client_ttft, (ttft, client_ttft)  # queueing and prefill included
    assert queued + prefilled == pytest.approx(ttft, rel=0.1, abs=0.01)


def test_a_request_of_n_choices_needs_n_places(overloadable):
    base, worker, server = overloadable

    async def ask(n: int):
        return await client(base).completions.create(prompt=PROMPT, n=n, **GREEDY)

    assert len(asyncio.run(ask(MAX_QUEUED)).choices) == MAX_QUEUED
    with pytest.raises(openai.APIStatusError) as e:
        asyncio.run(ask(MAX_QUEUED + 1))
    assert e.value.status_code == 503
    assert server.admission.in_flight == 0


ALICE = ApiKey(name="alice", key="sk-alice-0123456789", requests_per_minute=2)
BOB = ApiKey(name="bob", key="sk-bob-0123456789")


def test_a_key_past_its_quota_gets_429_and_other_keys_do_not():
    keys = {k.name: k.key.get_secret_value() for k in (ALICE, BOB)}
    with serving(server_options={"quotas": Quotas([ALICE, BOB])}, api_keys=keys) as (base, worker, server):
        alice, bob = client(base, keys["alice"]), client(base, keys["bob"])

        async def run():
            for _ in range(2):
                await alice.completions.create(prompt=PROMPT, **GREEDY)
            with pytest.raises(openai.RateLimitError) as e:
                await alice.completions.create(prompt=PROMPT, **GREEDY)
            for _ in range(3):
                await bob.completions.create(prompt=PROMPT, **GREEDY)
            return e.value

        e = asyncio.run(run())
        assert e.body["code"] == "requests_per_minute_exceeded" and "alice" in e.body["message"]
        assert 1 <= int(e.response.headers["Retry-After"]) <= 30
        assert metric(base, "glmserve:request_rejected_total", reason="requests_per_minute_exceeded") == 1
        assert server.admission.in_flight == 0  # the refused request gave its place back


def test_a_replica_shut_down_mid_stream_ends_it_with_a_retryable_error():
    with serving() as (base, worker, server):
        api = client(base)

        async def run():
            stream = await api.completions.create(
                prompt=PROMPT, stream=True, **{**GREEDY, "max_tokens": 3000}, extra_body={"ignore_eos": True}
            )
            received = 0
            with pytest.raises(openai.APIError) as e:
                async for _chunk in stream:
                    received += 1
                    if received == 3:
                        worker.shutdown()  # what Serve's graceful shutdown ends in when the drain times out
            return received, e.value

        received, e = asyncio.run(run())
        assert received >= 3
        assert e.body["code"] == "replica_stopping", e.body
        assert worker.engine.idle  # aborted on the engine thread before it stopped: its blocks are free
        assert server.admission.in_flight == 0

"""`glmserve bench serve` and its workloads: timings against a local server with injected delays, metric math
against numpy, goodput counting, never hanging, and trace loading from the packaged trace files."""

import argparse
import asyncio
import csv
import gzip
import hashlib
import itertools
import json
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pytest
from aiohttp import web

from glmserve.bench.serve import add_bench_serve_args, latency_stats, run_bench_serve
from glmserve.bench.traces import (
    NAMED_TRACES,
    PACKAGED_TRACE_DIR,
    PromptBuilder,
    TraceNotFoundError,
    TraceRequest,
    load_trace,
    prefix_block_tokens,
    rescale_to_rate,
    scale_lengths,
    synthetic_requests,
    with_poisson_arrivals,
)
from glmserve.cli import main as cli_main

# The fake server picks its behaviour from max_tokens, the one thing a workload controls per request.
SLOW_FIRST_TOKEN_LEN = 11  # first token after SLOW_TTFT_S
SLOW_DECODE_LEN = 12  # tokens SLOW_ITL_S apart
HTTP_ERROR_LEN = 13  # answered with HTTP 500
STREAM_ERROR_LEN = 17  # one token, then an error event
HANG_LEN = 19  # never answers
SLOW_TTFT_S = 0.3
SLOW_ITL_S = 0.05


@dataclass
class FakeOpenAI:
    """An OpenAI-shaped /v1/completions that streams `max_tokens` tokens with set delays."""

    ttft_s: float = 0.05
    itl_s: float = 0.01
    tokens_per_chunk: int = 1
    send_usage: bool = True
    received: list[dict] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        max_tokens = body["max_tokens"]
        if max_tokens == HTTP_ERROR_LEN:
            return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(payload: dict | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await response.write(f"data: {data}\n\n".encode())

        def chunk(text: str) -> dict:
            return {"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": text}]}

        if max_tokens == HANG_LEN:
            await asyncio.sleep(60)
        await asyncio.sleep(SLOW_TTFT_S if max_tokens == SLOW_FIRST_TOKEN_LEN else self.ttft_s)
        sent = 0
        while sent < max_tokens:
            if sent:
                await asyncio.sleep(SLOW_ITL_S if max_tokens == SLOW_DECODE_LEN else self.itl_s)
            n = min(self.tokens_per_chunk, max_tokens - sent)
            await send(chunk(" tok" * n))
            sent += n
            if max_tokens == STREAM_ERROR_LEN:
                await send({"error": {"message": "worker died", "type": "server_error"}})
                return response
        prompt = body["prompt"]
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        if self.send_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens}
            await send({"id": "c", "object": "text_completion", "choices": [], "usage": usage})
        await send("[DONE]")
        return response


@pytest.fixture(scope="module")
def server():
    fake = FakeOpenAI()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(fake.app(), handler_cancellation=True, shutdown_timeout=1)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


@pytest.fixture
def fake(server):
    fake, _ = server
    fake.ttft_s, fake.itl_s, fake.tokens_per_chunk, fake.send_usage = 0.05, 0.01, 1, True
    fake.received.clear()
    return fake


def bench(server, tmp_path, *flags: str) -> dict:
    parser = argparse.ArgumentParser()
    add_bench_serve_args(parser)
    args = parser.parse_args(
        ["--base-url", server[1] + "/v1", "--output-json", str(tmp_path / "out.json"), "--no-progress", *flags]
    )
    return run_bench_serve(args)


def test_measures_injected_delays(server, fake, tmp_path):
    fake.ttft_s, fake.itl_s = 0.1, 0.03
    out = bench(server, tmp_path, "--num-requests", "6", "--input-len", "20", "--output-len", "5",
                "--max-concurrency", "3", "--token-ids")  # fmt: skip
    assert (out["completed"], out["failed"], out["not_sent"]) == (6, 0, 0)
    assert out["model_id"] == "fake-model"
    (row,) = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert row["p99_ttft_ms"] == pytest.approx(out["p99_ttft_ms"])
    # Chunks cannot come before the server sends them; a busy machine can only make them late (and one gap short).
    for ttft, itls, e2el in zip(out["ttfts"], out["itls"], out["e2els"], strict=True):
        assert 0.1 <= ttft < 0.2
        assert len(itls) == 4 and all(gap < 0.1 for gap in itls)
        assert 0.1 + 4 * 0.03 <= e2el == pytest.approx(ttft + sum(itls))
        assert e2el < 0.4
    assert 27 <= out["median_itl_ms"] < 45
    assert 25 <= out["mean_tpot_ms"] < 45
    assert out["output_lens"] == [5] * 6 and out["input_lens"] == [20] * 6
    assert out["total_output_tokens"] == 30
    assert out["output_throughput"] == pytest.approx(30 / out["duration"])
    # two waves of three under the cap
    assert 0.4 < out["duration"] < 0.8
    for body in fake.received:
        assert body["max_tokens"] == 5 and body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True} and body["model"] == "fake-model"
        assert len(body["prompt"]) == 20 and all(1000 <= t < 8000 for t in body["prompt"])


def test_summary_statistics_match_numpy(server, fake, tmp_path):
    fake.tokens_per_chunk = 2  # usage, not chunks, decides the token count
    out = bench(server, tmp_path, "--num-requests", "8", "--output-len", "6", "--range-ratio", "0.5",
                "--input-len", "30", "--metric-percentiles", "50", "90", "99")  # fmt: skip
    assert out["completed"] == 8
    assert out["output_lens"] == [body["max_tokens"] for body in fake.received]
    tpots = [(e - t) / (n - 1) for e, t, n in zip(out["e2els"], out["ttfts"], out["output_lens"], strict=True) if n > 1]
    gaps = [g for itls in out["itls"] for g in itls]
    assert len(gaps) == sum(math.ceil(n / 2) - 1 for n in out["output_lens"])
    for name, seconds in [("ttft", out["ttfts"]), ("tpot", tpots), ("itl", gaps), ("e2el", out["e2els"])]:
        ms = np.array(seconds) * 1000
        assert out[f"mean_{name}_ms"] == pytest.approx(ms.mean())
        assert out[f"std_{name}_ms"] == pytest.approx(ms.std())
        for p in (50, 90, 99):
            assert out[f"p{p}_{name}_ms"] == pytest.approx(np.percentile(ms, p))


def test_latency_stats_against_numpy():
    values = np.random.default_rng(1).lognormal(size=37)
    stats = latency_stats("x", values.tolist(), [50, 90, 99.9])
    assert stats["median_x_ms"] == pytest.approx(np.median(values) * 1000)
    assert stats["p90_x_ms"] == pytest.approx(np.percentile(values, 90) * 1000)
    assert stats["p99.9_x_ms"] == pytest.approx(np.percentile(values, 99.9) * 1000)
    assert stats["p90_x_ms"] > stats["p50_x_ms"] == stats["median_x_ms"]
    assert latency_stats("x", [], [99]) == dict.fromkeys(["mean_x_ms", "median_x_ms", "std_x_ms", "p99_x_ms"])


def test_goodput_counts_requests_meeting_both_slos(server, fake, tmp_path):
    # 5 fast, 3 with a slow first token, 2 with slow decoding, 2 HTTP errors, 1 error mid-stream; 120 s as recorded
    lens = [4] * 5 + [SLOW_FIRST_TOKEN_LEN] * 3 + [SLOW_DECODE_LEN] * 2 + [HTTP_ERROR_LEN] * 2 + [STREAM_ERROR_LEN]
    trace = tmp_path / "small.jsonl"
    rows = [{"timestamp": i * 10_000, "input_length": 40, "output_length": n, "hash_ids": [i]} for i, n in
            enumerate(lens)]  # fmt: skip
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = bench(server, tmp_path, "--trace", str(trace), "--trace-rate", "50", "--slo-ttft", "150", "--slo-tpot", "30")
    assert (out["completed"], out["failed"]) == (10, 3)
    assert out["duration"] < 1.5  # 12 gaps of 20 ms, then the slow ones' 0.3 or 0.6 s
    assert out["request_goodput"] * out["duration"] == pytest.approx(5)
    assert out["slo_attainment"] == pytest.approx(5 / 13) and out["slo_attainment_met"] is False
    errors = [e for e in out["errors"] if e]
    assert sum("HTTP 500: boom" in e for e in errors) == 2 and sum("worker died" in e for e in errors) == 1
    assert out["total_output_tokens"] == 5 * 4 + 3 * SLOW_FIRST_TOKEN_LEN + 2 * SLOW_DECODE_LEN
    assert out["p99_tpot_ms"] > 45 > 15 > out["median_tpot_ms"]

    out = bench(server, tmp_path, "--trace", str(trace), "--trace-rate", "50", "--slo-ttft", "400", "--num-requests",
                "8", "--slo-attainment-target", "0.95")  # fmt: skip
    assert out["slo_attainment"] == 1.0 and out["slo_attainment_met"] is True


def test_timeouts_and_duration_bound_the_run(server, fake, tmp_path):
    t0 = time.perf_counter()
    out = bench(server, tmp_path, "--num-requests", "2", "--output-len", str(HANG_LEN), "--request-timeout", "0.5")
    assert out["failed"] == 2 and all("timed out" in e for e in out["errors"])
    out = bench(server, tmp_path, "--num-requests", "1000", "--output-len", "2", "--input-len", "4",
                "--request-rate", "20", "--duration", "0.5", "--max-concurrency", "4")  # fmt: skip
    sent = out["completed"] + out["failed"]
    assert 2 <= sent < 40 and out["not_sent"] == 1000 - sent
    assert time.perf_counter() - t0 < 5


def test_text_prompts_and_usage_fallback(server, fake, tmp_path):
    fake.send_usage = False
    out = bench(server, tmp_path, "--num-requests", "3", "--input-len", "50", "--output-len", "4")
    assert out["completed"] == 3
    assert out["output_lens"] == [4, 4, 4]  # counted from chunks
    assert out["input_lens"] == [50, 50, 50]  # the budget, as the server sent no usage
    prompts = [body["prompt"] for body in fake.received]
    assert all(isinstance(p, str) and len(p.split()) == 50 for p in prompts)
    assert len(set(prompts)) == 3


# ---- traces ----


# What the published files load as (measured against the uncompressed originals, the sha256s of bench/data/NOTICE.md):
# count, first and last request, and the sha256 of the repr of the whole list.
PUBLISHED = {
    "azure-code": (8819, TraceRequest(0.0, 4808, 10), TraceRequest(3435.948056, 549, 173),
                   "36d143d4b67e1eec3c2b53d0c3c9937bb497f70427c508b9ec2c59b295f1ffd0"),
    "azure-conv": (19366, TraceRequest(0.0, 374, 44), TraceRequest(3501.721937, 197, 183),
                   "5e7412e01ce00f80c58645b7ccba6b19f064e8b04f2747ab28819db2ab20416f"),
    "mooncake": (12031, TraceRequest(0.0, 6758, 500, tuple(range(14))),
                 TraceRequest(3536.999, 20774, 508, (0, *range(182750, 182790))),
                 "2d76e2105d0bafa50962ea8dce40fc6ee54eece649debc662e39c86401a356ff"),
}  # fmt: skip


def _packaged_lines(name: str, limit: int) -> list[str]:
    with gzip.open(PACKAGED_TRACE_DIR / f"{NAMED_TRACES[name]}.gz", "rt", newline="") as f:
        return [line for _, line in zip(range(limit), f, strict=False)]


@pytest.fixture(autouse=True)
def packaged_traces(monkeypatch):
    """Named traces load from the package, whatever this shell's $GLMSERVE_TRACE_DIR."""
    monkeypatch.delenv("GLMSERVE_TRACE_DIR", raising=False)


def test_packaged_traces_load_as_published():
    for name, (count, first, last, digest) in PUBLISHED.items():
        requests = load_trace(name)
        assert (len(requests), requests[0], requests[-1]) == (count, first, last), name
        assert hashlib.sha256(repr(requests).encode()).hexdigest() == digest, name


def test_trace_dir_overrides_the_packaged_traces(tmp_path, monkeypatch):
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    (plain / NAMED_TRACES["azure-code"]).write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:17:0{i}.0000000,{10 + i},{i + 1}\n" for i in range(3)
    ))  # fmt: skip
    with gzip.open(packed / f"{NAMED_TRACES['mooncake']}.gz", "wt") as f:
        f.write('{"timestamp": 0, "input_length": 600, "output_length": 2, "hash_ids": [7, 8]}\n')
    monkeypatch.setenv("GLMSERVE_TRACE_DIR", str(plain))
    assert load_trace("azure-code") == [TraceRequest(float(i), 10 + i, i + 1) for i in range(3)]
    assert load_trace("mooncake", trace_dir=packed) == [TraceRequest(0.0, 600, 2, (7, 8))]  # the argument wins
    monkeypatch.setenv("GLMSERVE_TRACE_DIR", str(packed))
    assert load_trace("mooncake") == [TraceRequest(0.0, 600, 2, (7, 8))]
    assert load_trace(str(packed / f"{NAMED_TRACES['mooncake']}.gz")) == load_trace("mooncake")


def test_a_missing_trace_is_an_error_naming_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GLMSERVE_TRACE_DIR", str(tmp_path))
    with pytest.raises(TraceNotFoundError, match=f"azure_llm_2023_conv.csv.gz in {tmp_path} .*GLMSERVE_TRACE_DIR"):
        load_trace("azure-conv")
    with pytest.raises(TraceNotFoundError, match="trace file not found: nowhere.csv"):
        load_trace("nowhere.csv")
    assert cli_main(["bench", "serve", "--trace", "azure-code", "--trace-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"looked for azure_llm_2023_code.csv and azure_llm_2023_code.csv.gz in {tmp_path / 'x'}" in err
    assert "Traceback" not in err


def test_azure_traces_load_as_recorded():
    for name in ("azure-code", "azure-conv"):
        rows = list(csv.DictReader(_packaged_lines(name, 101)))
        requests = load_trace(name, limit=100)
        t0 = datetime.fromisoformat(rows[0]["TIMESTAMP"])
        assert len(requests) == 100 and requests[0].arrival_s == 0
        arrivals = [r.arrival_s for r in requests]
        assert arrivals == sorted(arrivals)
        for req, row in zip(requests, rows, strict=True):
            assert req.arrival_s == pytest.approx((datetime.fromisoformat(row["TIMESTAMP"]) - t0).total_seconds())
            assert (req.input_len, req.output_len) == (int(row["ContextTokens"]), int(row["GeneratedTokens"]))
            assert req.prefix_hash_ids is None


def test_mooncake_trace_loads_as_recorded():
    rows = [json.loads(line) for line in _packaged_lines("mooncake", 100)]
    requests = load_trace("mooncake", limit=100)
    assert len(requests) == 100
    assert [r.arrival_s for r in requests] == sorted(r.arrival_s for r in requests)
    for req, row in zip(requests, rows, strict=True):
        assert req.arrival_s == pytest.approx((row["timestamp"] - rows[0]["timestamp"]) / 1000)
        assert (req.input_len, req.output_len, req.prefix_hash_ids) == (
            row["input_length"], row["output_length"], tuple(row["hash_ids"])
        )  # fmt: skip
        assert req.input_len <= 512 * len(req.prefix_hash_ids)


def test_rescale_keeps_the_burst_shape():
    requests = load_trace("azure-conv", limit=100)
    rescaled = rescale_to_rate(requests, 5.0)
    span = rescaled[-1].arrival_s - rescaled[0].arrival_s
    assert 99 / span == pytest.approx(5.0)
    gaps, new_gaps = np.diff([r.arrival_s for r in requests]), np.diff([r.arrival_s for r in rescaled])
    np.testing.assert_allclose(new_gaps, gaps * (new_gaps.sum() / gaps.sum()), rtol=1e-9, atol=1e-12)
    assert [(r.input_len, r.output_len) for r in rescaled] == [(r.input_len, r.output_len) for r in requests]
    with pytest.raises(ValueError):
        rescale_to_rate([TraceRequest(0.0, 1, 1), TraceRequest(0.0, 1, 1)], 1.0)


def test_poisson_arrivals_and_synthetic_lengths():
    requests = synthetic_requests(4000, input_len=100, output_len=20, range_ratio=0.5, seed=3)
    inputs, outputs = np.array([r.input_len for r in requests]), np.array([r.output_len for r in requests])
    assert inputs.min() >= 50 and inputs.max() <= 150 and abs(inputs.mean() - 100) < 3
    assert outputs.min() >= 10 and outputs.max() <= 30
    assert all(r.arrival_s == 0 for r in requests)
    timed = with_poisson_arrivals(requests, rate=8.0, seed=3)
    gaps = np.diff([r.arrival_s for r in timed])
    assert timed[0].arrival_s == 0 and (gaps >= 0).all()
    assert np.mean(gaps) == pytest.approx(1 / 8, rel=0.06)
    assert np.std(gaps) == pytest.approx(1 / 8, rel=0.1)  # exponential: std == mean
    fixed = synthetic_requests(5, input_len=7, output_len=3)
    assert {(r.input_len, r.output_len) for r in fixed} == {(7, 3)}


def test_length_scaling_and_clipping():
    requests = [TraceRequest(0.0, 6758, 500, tuple(range(14))), TraceRequest(1.0, 10, 1)]
    scaled = scale_lengths(requests, length_scale=64, max_output_len=5)
    assert [(r.input_len, r.output_len) for r in scaled] == [(106, 5), (1, 1)]
    assert scaled[0].prefix_hash_ids == tuple(range(14)) and prefix_block_tokens(64) == 8
    assert [r.input_len for r in scale_lengths(requests, max_input_len=100)] == [100, 10]


def _shared_leading(a: tuple, b: tuple) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_mooncake_prompts_share_prefixes():
    requests = scale_lengths(load_trace("mooncake", limit=100), length_scale=64)
    builder = PromptBuilder(block_tokens=prefix_block_tokens(64), token_id_range=(1000, 8000), seed=0)
    tokens = [np.array(builder.token_ids(i, r)) for i, r in enumerate(requests)]
    words = [builder.text(i, r).split() for i, r in enumerate(requests)]
    assert [len(t) for t in tokens] == [len(w) for w in words] == [r.input_len for r in requests]
    pairs = 0
    for i, j in itertools.combinations(range(len(requests)), 2):
        a, b = requests[i], requests[j]
        shared = _shared_leading(a.prefix_hash_ids, b.prefix_hash_ids)
        if shared == 0 or shared * 8 >= min(a.input_len, b.input_len):
            continue
        pairs += 1
        n = min(a.input_len, b.input_len)
        common = int(np.argmax(tokens[i][:n] != tokens[j][:n]))
        assert shared * 8 <= common < shared * 8 + 3  # the next block differs (3 equal draws: ~1e-11)
        assert words[i][: shared * 8] == words[j][: shared * 8] and words[i][:n] != words[j][:n]
    assert pairs > 100  # this trace's conversations share a first block (hash id 0) and more
    # requests without hash ids, or under another seed, share nothing
    plain = TraceRequest(0.0, 64, 1)
    assert builder.token_ids(0, plain) != builder.token_ids(1, plain)
    assert builder.token_ids(0, requests[0]) != PromptBuilder(8, seed=1).token_ids(0, requests[0])

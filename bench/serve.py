"""`glmserve bench serve`: load any OpenAI-compatible server (ours, vLLM, SGLang) and measure what users feel.

Each request streams `/v1/completions` (`max_tokens` from the workload, `ignore_eos` so that many tokens come,
`stream_options.include_usage` for exact counts). Measured on the client, per request:
- TTFT: sending -> the first chunk that carries text;
- ITL: each gap between text chunks (one chunk may carry several tokens, e.g. with speculative decoding);
- E2EL: sending -> the last text chunk;
- TPOT: (E2EL - TTFT) / (output tokens - 1), output tokens from `usage` (else the number of text chunks).
Goodput (DistServe, Zhong et al., OSDI 2024): completed requests per second that meet both the TTFT and the TPOT
SLO; attainment is their share of the requests sent (failures count against it). The JSON (bench/report.py) has one
row, the run's summary under the keys of `vllm bench serve` (`request_throughput`, `request_goodput`,
`mean_ttft_ms`, `p99_itl_ms`, ...); its `extra` holds the config and the per-request lists (`ttfts`, `itls`,
`e2els` in seconds, as vLLM's).

Prompts are text of about `input_len` tokens by default (any tokenizer), or exact token ids with `--token-ids`
(servers that accept token-id prompts: vLLM and ours). Prompts repeat across runs with the same `--seed`, so a
server's prefix cache remembers them: change the seed to measure a cold cache.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from .report import write_report
from .traces import (
    NAMED_TRACES,
    PromptBuilder,
    TraceRequest,
    load_trace,
    prefix_block_tokens,
    rescale_to_rate,
    scale_lengths,
    synthetic_requests,
    with_poisson_arrivals,
)

log = logging.getLogger(__name__)

LATENCY_METRICS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}
# the summary's keys that are not figures of the run (its config, per-request lists): the JSON's `extra`
_DETAIL_KEYS = (
    "config", "input_lens", "output_lens", "ttfts", "itls", "e2els", "errors", "statuses", "refused_after"
)  # fmt: skip


class BenchServeConfig(BaseModel):
    """Everything one benchmark run needs; built from the command line, recorded in the JSON."""

    model_config = ConfigDict(extra="ignore")

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None
    # workload: a trace, else synthetic lengths
    trace: str | None = None
    trace_dir: str | None = None
    trace_rate: float | None = Field(None, gt=0)
    num_requests: int = Field(100, ge=1)
    input_len: int = Field(1024, ge=1)
    output_len: int = Field(128, ge=1)
    range_ratio: float = Field(0.0, ge=0, lt=1)
    length_scale: float = Field(1.0, gt=0)
    max_input_len: int | None = Field(None, ge=1)
    max_output_len: int | None = Field(None, ge=1)
    token_ids: bool = False
    token_id_range: tuple[int, int] = (1000, 8000)
    ignore_eos: bool = True
    seed: int = 0
    # load
    request_rate: float | None = Field(None, gt=0)
    max_concurrency: int | None = Field(None, ge=1)
    duration: float | None = Field(None, gt=0)
    request_timeout: float = Field(600.0, gt=0)
    # report
    slo_ttft_ms: float | None = Field(None, gt=0)
    slo_tpot_ms: float | None = Field(None, gt=0)
    slo_attainment_target: float = Field(0.9, gt=0, le=1)
    metric_percentiles: list[float] = Field(default_factory=lambda: [50.0, 90.0, 99.0])
    output_json: str | None = "bench_serve.json"
    progress: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "BenchServeConfig":
        if self.trace_rate is not None and (self.trace is None or self.request_rate is not None):
            raise ValueError("--trace-rate rescales a --trace's arrivals; it goes with --trace and not --request-rate")
        low, high = self.token_id_range
        if not 0 <= low < high:
            raise ValueError(f"--token-id-range must be 0 <= LOW < HIGH, got {low} {high}")
        if not all(0 <= p <= 100 for p in self.metric_percentiles):
            raise ValueError("--metric-percentiles must lie in [0, 100]")
        return self

    @property
    def api_root(self) -> str:
        """The server root, accepting `http://host:port` and `http://host:port/v1` alike."""
        root = self.base_url.rstrip("/")
        return root.removesuffix("/v1")


@dataclass
class RequestResult:
    input_len: int
    output_len: int = 0
    ttft_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    e2el_s: float | None = None
    error: str | None = None
    status: int | None = None  # the HTTP status, once the server answered
    refused_after_s: float | None = None  # sending -> an error status (a refusal's latency)

    @property
    def tpot_s(self) -> float:
        """Zero with one output token (no decode step), as vLLM counts it for goodput."""
        if self.output_len <= 1 or self.ttft_s is None or self.e2el_s is None:
            return 0.0
        return (self.e2el_s - self.ttft_s) / (self.output_len - 1)


def build_workload(config: BenchServeConfig) -> list[TraceRequest]:
    if config.trace:
        requests = load_trace(config.trace, config.num_requests, config.trace_dir)
        if config.trace_rate:
            requests = rescale_to_rate(requests, config.trace_rate)
        elif config.request_rate:
            requests = with_poisson_arrivals(requests, config.request_rate, config.seed)
    else:
        requests = synthetic_requests(
            config.num_requests, config.input_len, config.output_len, config.range_ratio, config.seed
        )
        requests = with_poisson_arrivals(requests, config.request_rate or math.inf, config.seed)
    return scale_lengths(requests, config.length_scale, config.max_input_len, config.max_output_len)


def build_prompts(config: BenchServeConfig, requests: list[TraceRequest]) -> list[str | list[int]]:
    """All prompts before the clock starts, so building them does not delay sending."""
    builder = PromptBuilder(prefix_block_tokens(config.length_scale), config.token_id_range, config.seed)
    if config.token_ids:
        return [builder.token_ids(i, r) for i, r in enumerate(requests)]
    return [builder.text(i, r) for i, r in enumerate(requests)]


def _error_message(body: Any) -> str:
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


async def stream_completion(
    session: aiohttp.ClientSession, url: str, payload: dict, headers: dict, timeout_s: float, input_len: int
) -> RequestResult:
    """Send one streaming request and time its chunks; every failure (HTTP, stream error, timeout) is recorded."""
    result = RequestResult(input_len=input_len)
    start = last = time.perf_counter()
    text_chunks, finished = 0, False
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, json=payload, headers=headers) as response:
                result.status = response.status
                if response.status != 200:
                    result.refused_after_s = time.perf_counter() - start
                    body = await response.text()
                    with contextlib.suppress(ValueError):
                        body = _error_message(json.loads(body))
                    result.error = f"HTTP {response.status}: {body[:300]}"
                    return result
                async for raw_line in response.content:
                    line = raw_line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[len(b"data:") :].strip()
                    if data == b"[DONE]":
                        finished = True
                        break
                    chunk = json.loads(data)
                    now = time.perf_counter()
                    if "error" in chunk:
                        result.error = f"stream error: {_error_message(chunk)}"
                        return result
                    if any(choice.get("text") for choice in chunk.get("choices") or ()):
                        if text_chunks == 0:
                            result.ttft_s = now - start
                        else:
                            result.itls_s.append(now - last)
                        last = now
                        text_chunks += 1
                    if usage := chunk.get("usage"):
                        result.output_len = usage.get("completion_tokens") or 0
                        result.input_len = usage.get("prompt_tokens") or input_len
    except TimeoutError:
        result.error = f"timed out after {timeout_s:g} s"
        return result
    except (aiohttp.ClientError, OSError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    if not finished:
        result.error = "the stream ended without [DONE]"
    elif text_chunks == 0:
        result.error = "no tokens received"
    else:
        result.output_len = result.output_len or text_chunks
        result.e2el_s = last - start
    return result


async def _first_model(session: aiohttp.ClientSession, root: str, headers: dict) -> str:
    async with session.get(f"{root}/v1/models", headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as response:
        response.raise_for_status()
        return (await response.json())["data"][0]["id"]


async def run_requests(
    config: BenchServeConfig, requests: list[TraceRequest], prompts: list[str | list[int]]
) -> tuple[str, list[RequestResult], int, float]:
    """Send each request at its arrival time (under the concurrency cap); return model, results, unsent, seconds."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    url = config.api_root + config.endpoint
    cap = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else contextlib.nullcontext()
    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0)
    async with aiohttp.ClientSession(connector=connector, read_bufsize=1 << 20) as session:
        model = config.model or await _first_model(session, config.api_root, headers)
        progress = tqdm(total=len(requests), desc="requests", unit="req", disable=not config.progress)
        start = time.perf_counter()
        deadline = start + config.duration if config.duration else math.inf

        async def send(request: TraceRequest, prompt: str | list[int]) -> RequestResult | None:
            payload: dict[str, Any] = {
                "model": model,
                "prompt": prompt,
                "max_tokens": request.output_len,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if config.ignore_eos:
                payload["ignore_eos"] = True
            async with cap:
                if time.perf_counter() > deadline:  # queued behind the cap past --duration: never sent
                    return None
                result = await stream_completion(
                    session, url, payload, headers, config.request_timeout, request.input_len
                )
            progress.update()
            return result

        tasks = []
        for request, prompt in zip(requests, prompts, strict=True):
            send_at = start + request.arrival_s
            if send_at > deadline:
                break
            await asyncio.sleep(max(0.0, send_at - time.perf_counter()))
            tasks.append(asyncio.create_task(send(request, prompt)))
        progress.total = len(tasks)  # fewer than planned when --duration stopped the sending
        progress.refresh()
        outcomes = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        progress.close()
    results = [r for r in outcomes if r is not None]
    return model, results, len(requests) - len(results), elapsed


def latency_stats(name: str, seconds: list[float], percentiles: list[float]) -> dict[str, float | None]:
    """`mean_/median_/std_/pNN_{name}_ms`, numpy's (linear) percentiles; None when nothing was measured."""
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"] + [f"p{p:g}_{name}_ms" for p in percentiles]
    if not seconds:
        return dict.fromkeys(keys)
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    values = [ms.mean(), np.median(ms), ms.std()] + [np.percentile(ms, p) for p in percentiles]
    return {k: float(v) for k, v in zip(keys, values, strict=True)}


def meets_slo(result: RequestResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if result.error is not None:
        return False
    ttft_ok = slo_ttft_ms is None or result.ttft_s * 1000.0 <= slo_ttft_ms
    tpot_ok = slo_tpot_ms is None or result.tpot_s * 1000.0 <= slo_tpot_ms
    return ttft_ok and tpot_ok


def summarize(config: BenchServeConfig, results: list[RequestResult], not_sent: int, duration_s: float) -> dict:
    done = [r for r in results if r.error is None]
    total_input = sum(r.input_len for r in done)
    total_output = sum(r.output_len for r in done)
    has_slo = config.slo_ttft_ms is not None or config.slo_tpot_ms is not None
    good = sum(meets_slo(r, config.slo_ttft_ms, config.slo_tpot_ms) for r in results)
    attainment = good / len(results) if has_slo and results else None
    summary: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(results) - len(done),
        "not_sent": not_sent,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration_s,
        "request_goodput": good / duration_s if has_slo else None,
        "input_throughput": total_input / duration_s,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "slo_attainment": attainment,
        "slo_attainment_met": attainment >= config.slo_attainment_target if attainment is not None else None,
    }
    per_metric = {
        "ttft": [r.ttft_s for r in done],
        "tpot": [r.tpot_s for r in done if r.output_len > 1],
        "itl": [gap for r in done for gap in r.itls_s],
        "e2el": [r.e2el_s for r in done],
    }
    for name, seconds in per_metric.items():
        summary.update(latency_stats(name, seconds, config.metric_percentiles))
    summary.update(
        input_lens=[r.input_len for r in results],
        output_lens=[r.output_len for r in results],
        ttfts=[r.ttft_s for r in results],
        itls=[r.itls_s for r in results],
        e2els=[r.e2el_s for r in results],
        errors=[r.error for r in results],
        statuses=[r.status for r in results],
        refused_after=[r.refused_after_s for r in results],
    )
    return summary


def print_report(summary: dict, config: BenchServeConfig, console: Console | None = None) -> None:
    console = console or Console()

    def fmt(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    overview = Table(title="Serving benchmark", show_header=False)
    overview.add_column(justify="left")
    overview.add_column(justify="right")
    overview.add_row("Server / model", f"{config.api_root} / {summary['model_id']}")
    sent = summary["completed"] + summary["failed"]
    overview.add_row(
        "Completed / failed / not sent", f"{summary['completed']} / {summary['failed']} / {summary['not_sent']}"
    )
    overview.add_row("Benchmark duration (s)", fmt(summary["duration"]))
    overview.add_row("Request throughput (req/s)", fmt(summary["request_throughput"]))
    overview.add_row("Input token throughput (tok/s)", fmt(summary["input_throughput"]))
    overview.add_row("Output token throughput (tok/s)", fmt(summary["output_throughput"]))
    if summary["request_goodput"] is not None:
        slo = f"TTFT <= {fmt(config.slo_ttft_ms, 0)} ms, TPOT <= {fmt(config.slo_tpot_ms, 0)} ms"
        overview.add_row(f"Request goodput (req/s), {slo}", fmt(summary["request_goodput"]))
        verdict = "met" if summary["slo_attainment_met"] else "NOT met"
        overview.add_row(
            f"SLO attainment ({sent} sent), target {config.slo_attainment_target:.0%}",
            f"{summary['slo_attainment']:.1%} ({verdict})",
        )
    console.print(overview)

    latency = Table(title="Latency (ms)")
    latency.add_column("metric")
    statistics = ["mean"] + [f"p{p:g}" for p in config.metric_percentiles]
    for statistic in statistics:
        latency.add_column(statistic, justify="right")
    for name, label in LATENCY_METRICS.items():
        latency.add_row(label, *(fmt(summary[f"{statistic}_{name}_ms"]) for statistic in statistics))
    console.print(latency)


async def benchmark(config: BenchServeConfig) -> dict:
    requests = build_workload(config)
    if not requests:
        raise ValueError("the workload is empty")
    prompts = build_prompts(config, requests)
    span = requests[-1].arrival_s
    log.info(
        "%d requests over %.1f s, mean input %.0f / output %.0f tokens, %s prompts",
        len(requests),
        span,
        np.mean([r.input_len for r in requests]),
        np.mean([r.output_len for r in requests]),
        "token-id" if config.token_ids else "text",
    )
    model, results, not_sent, elapsed = await run_requests(config, requests, prompts)
    summary = {
        "model_id": model,
        "base_url": config.api_root,
        "config": config.model_dump(mode="json", exclude={"api_key"}),
    }
    summary.update(summarize(config, results, not_sent, elapsed))
    first_error = next((e for e in summary["errors"] if e), None)
    if first_error:
        log.warning("%d request(s) failed; the first: %s", summary["failed"], first_error)
    return summary


def add_bench_serve_args(parser: argparse.ArgumentParser) -> None:
    d = BenchServeConfig()
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default=d.base_url, help="server root (with or without /v1)")
    server.add_argument("--endpoint", default=d.endpoint)
    server.add_argument("--model", help="model name to request (default: the first in /v1/models)")
    server.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")

    work = parser.add_argument_group("workload")
    work.add_argument(
        "--trace",
        help=f"replay a trace: {', '.join(NAMED_TRACES)}, or a .csv (Azure) / .jsonl "
        "(Mooncake) path; without it, synthetic lengths",
    )
    work.add_argument(
        "--trace-dir", help="folder of the named traces, plain or .gz (default: $GLMSERVE_TRACE_DIR, else packaged)"
    )
    work.add_argument(
        "--trace-rate",
        type=float,
        help="rescale the trace's arrivals to this mean rate (req/s), "
        "keeping their burstiness; default: replay as recorded",
    )
    work.add_argument("--num-requests", type=int, default=d.num_requests, help="synthetic count, or a trace's first N")
    work.add_argument("--input-len", type=int, default=d.input_len, help="synthetic prompt tokens")
    work.add_argument("--output-len", type=int, default=d.output_len, help="synthetic output tokens")
    work.add_argument(
        "--range-ratio",
        type=float,
        default=d.range_ratio,
        help="synthetic lengths uniform in len * [1 - r, 1 + r]; 0: fixed",
    )
    work.add_argument(
        "--length-scale",
        type=float,
        default=d.length_scale,
        help="divide all lengths (and Mooncake's 512-token blocks) by this, e.g. 64 for a tiny model",
    )
    work.add_argument("--max-input-len", type=int, help="clip prompt lengths")
    work.add_argument("--max-output-len", type=int, help="clip output lengths")
    work.add_argument(
        "--token-ids",
        action="store_true",
        help="send prompts as token ids (exact lengths; the server must accept them: vLLM, glmserve)",
    )
    work.add_argument(
        "--token-id-range",
        type=int,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=d.token_id_range,
        help="token ids are drawn from [LOW, HIGH): ordinary tokens of the served vocabulary",
    )
    work.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=d.ignore_eos,
        help="ask for exactly max_tokens (vLLM's extension, also glmserve's)",
    )
    work.add_argument("--seed", type=int, default=d.seed)

    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        type=float,
        help="Poisson arrivals at this rate (req/s); default: all at once, or the trace's arrivals",
    )
    load.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    load.add_argument("--duration", type=float, help="stop sending new requests after this many seconds")
    load.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds per request")

    report = parser.add_argument_group("report")
    report.add_argument("--slo-ttft", dest="slo_ttft_ms", type=float, help="TTFT SLO (ms) for goodput")
    report.add_argument("--slo-tpot", dest="slo_tpot_ms", type=float, help="TPOT SLO (ms) for goodput")
    report.add_argument("--slo-attainment-target", type=float, default=d.slo_attainment_target)
    report.add_argument("--metric-percentiles", type=float, nargs="+", default=d.metric_percentiles)
    report.add_argument("--output-json", default=d.output_json, help="'' writes none")
    report.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def run_bench_serve(args: argparse.Namespace) -> dict:
    """Run the benchmark the arguments describe; print the tables, write the JSON, return the summary."""
    config = BenchServeConfig.model_validate({k: v for k, v in vars(args).items() if v is not None})
    summary = asyncio.run(benchmark(config))
    print_report(summary, config)
    if config.output_json:
        row = {k: v for k, v in summary.items() if k not in _DETAIL_KEYS}
        write_report(config.output_json, [row], {k: summary[k] for k in _DETAIL_KEYS})
        log.info("wrote %s", config.output_json)
    return summary

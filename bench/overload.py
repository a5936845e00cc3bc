"""`glmserve bench overload`: what admission control buys when more requests arrive than a replica can serve.

One decode replica (prefilling its own prompts) is started twice on the real app: `unbounded` admits everything, so
past its capacity requests queue in the engine and every one of them gets slower; `admission` refuses with 503 and
Retry-After, before any work, a request the replica could not start within the TTFT SLO (`ServingConfig.admission`:
`max_predicted_ttft_s` = the SLO, and `max_num_queued_reqs` when given). The ceiling is measured first, in the
same run: the unbounded replica's throughput with `--capacity-concurrency` clients back to back. The same Poisson
workload is then sent to each arrangement at every `--load-factors` x that capacity (each load factor its own
prompts, the same in both, so no run finds another's prompts in the prefix cache).

Per row: goodput (requests/s that met both SLOs; DistServe's measure), its share of the capacity and its ratio to
the unbounded arrangement's at the same load; p50/p99 TTFT of the requests served; how many were refused, and the
p99 time to the refusal.
"""

import argparse
import asyncio
import logging

import numpy as np
from rich.console import Console
from rich.table import Table

from glmserve.cluster.serving_config import ServingConfig

from .report import write_report
from .serve import BenchServeConfig, benchmark

log = logging.getLogger(__name__)


def one_replica(base: ServingConfig, admission: dict) -> ServingConfig:
    """`base` as one colocated decode replica of one CPU (or GPU) with the given admission limits."""
    data = base.model_dump()
    gpus = 1 if data["engine"]["device"] == "cuda" else 0
    data["prefill"].update(replicas=0, num_gpus=gpus, autoscaling=None)
    data["decode"].update(replicas=1, num_gpus=gpus, num_cpus=1, autoscaling=None)
    data["admission"] = admission
    return ServingConfig.model_validate(data)


def _row(summary: dict, arrangement: str, factor: float, rate: float, capacity: float) -> dict:
    refused = [
        after
        for after, status in zip(summary["refused_after"], summary["statuses"], strict=True)
        if status in (429, 503)
    ]
    return {
        "arrangement": arrangement,
        "load_factor": factor,
        "offered_rate": rate,
        "served_rate": summary["request_throughput"],
        "goodput": summary["request_goodput"],
        "goodput_over_capacity": summary["request_goodput"] / capacity,
        "p50_ttft_ms": summary["p50_ttft_ms"],
        "p99_ttft_ms": summary["p99_ttft_ms"],
        "p99_tpot_ms": summary["p99_tpot_ms"],
        "refused": len(refused),
        "other_failures": summary["failed"] - len(refused),
        "p99_refusal_ms": float(np.percentile(refused, 99) * 1e3) if refused else None,
    }


def _measure(config: ServingConfig, runs: dict[str, BenchServeConfig]) -> dict[str, dict]:
    """Start the app with `config`, run each workload in turn; their summaries by name."""
    from ray import serve

    from glmserve.cluster.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": config.port})
    try:
        serve.run(build_app(config), name="glmserve", route_prefix="/")
        summaries = {}
        for name, run in runs.items():
            summaries[name] = summary = asyncio.run(benchmark(run))
            log.info("%s: %.2f req/s served, %d failed", name, summary["request_throughput"], summary["failed"])
        return summaries
    finally:
        serve.shutdown()


def run_bench_overload(
    base: ServingConfig,
    workload: BenchServeConfig,
    load_factors: list[float],
    capacity_concurrency: int,
    max_num_queued_reqs: int | None,
    output_json: str | None,
) -> list[dict]:
    import ray

    from glmserve.cluster.app import ray_init_kwargs

    workload = workload.model_copy(
        update={"base_url": f"http://127.0.0.1:{base.port}", "output_json": None, "progress": False}
    )
    slo_s = workload.slo_ttft_ms / 1e3
    arrangements = {
        "unbounded": one_replica(base, {}),
        "admission": one_replica(base, {"max_predicted_ttft_s": slo_s, "max_num_queued_reqs": max_num_queued_reqs}),
    }
    closed_loop = workload.model_copy(update={"max_concurrency": capacity_concurrency, "seed": 1000})
    ray.init(**ray_init_kwargs())
    try:
        (capacity_run,) = _measure(arrangements["unbounded"], {"capacity": closed_loop}).values()
        capacity = capacity_run["request_throughput"]
        log.info("capacity: %.2f requests/s at %d concurrent clients", capacity, capacity_concurrency)
        loads = {
            f"x{factor:g}": workload.model_copy(update={"request_rate": factor * capacity, "seed": i})
            for i, factor in enumerate(load_factors)
        }
        results = {name: _measure(config, loads) for name, config in arrangements.items()}
    finally:
        ray.shutdown()
    rows = [
        _row(results[name][f"x{factor:g}"], name, factor, factor * capacity, capacity)
        for factor in load_factors
        for name in arrangements
    ]
    for factor in load_factors:
        unbounded, admitted = (r for r in rows if r["load_factor"] == factor)
        peer = unbounded["goodput"]
        admitted["goodput_over_unbounded"] = admitted["goodput"] / peer if peer else None
    _print(rows, capacity, workload)
    if output_json:
        extra = {
            "capacity_requests_per_s": capacity,
            "capacity_concurrency": capacity_concurrency,
            "admission": arrangements["admission"].admission.model_dump(),
            "workload": workload.model_dump(mode="json", exclude={"api_key", "base_url", "output_json", "progress"}),
        }
        write_report(output_json, rows, extra)
    return rows


def _print(rows: list[dict], capacity: float, workload: BenchServeConfig) -> None:
    table = Table(
        title=f"overload: one replica, capacity {capacity:.2f} req/s; SLOs TTFT {workload.slo_ttft_ms:g} ms, "
        f"TPOT {workload.slo_tpot_ms:g} ms"
    )
    columns = [
        ("load", "load_factor", "x{:g}"),
        ("arrangement", "arrangement", "{}"),
        ("served req/s", "served_rate", "{:.2f}"),
        ("goodput req/s", "goodput", "{:.2f}"),
        ("/ capacity", "goodput_over_capacity", "{:.0%}"),
        ("/ unbounded", "goodput_over_unbounded", "{:.2f}x"),
        ("TTFT p50 ms", "p50_ttft_ms", "{:.0f}"),
        ("TTFT p99 ms", "p99_ttft_ms", "{:.0f}"),
        ("refused", "refused", "{}"),
        ("refusal p99 ms", "p99_refusal_ms", "{:.1f}"),
    ]
    for header, *_ in columns:
        table.add_column(header, justify="left" if header == "arrangement" else "right")
    for row in rows:
        table.add_row(*("-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in columns))
    Console(width=150).print(table)  # the whole table, also when written to a file


def add_bench_overload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="ServingConfig YAML (engine, SLOs); replicas and admission are set here")
    parser.add_argument("--model", help="checkpoint directory (default: the embedded glm5-tiny)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--port", type=int, default=8125)
    parser.add_argument("--load-factors", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--num-requests", type=int, default=80, help="per load factor")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--capacity-concurrency", type=int, default=16, help="clients of the capacity measurement")
    parser.add_argument("--max-num-queued-reqs", type=int, default=None, help="also bound the requests in flight")
    parser.add_argument("--slo-ttft", dest="slo_ttft_ms", type=float, help="default: the config's slo_ttft_ms")
    parser.add_argument("--slo-tpot", dest="slo_tpot_ms", type=float, help="default: the config's slo_tpot_ms")
    parser.add_argument("--output-json", default="bench_overload.json")


def run_from_args(args: argparse.Namespace) -> list[dict]:
    base = ServingConfig.from_yaml(args.config) if args.config else ServingConfig()
    engine = base.engine.model_copy(update={"device": args.device, **({"model": args.model} if args.model else {})})
    base = base.model_copy(update={"port": args.port, "engine": engine})
    workload = BenchServeConfig(
        num_requests=args.num_requests,
        input_len=args.input_len,
        output_len=args.output_len,
        token_ids=True,
        slo_ttft_ms=args.slo_ttft_ms or base.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms or base.slo_tpot_ms,
    )
    return run_bench_overload(
        base, workload, args.load_factors, args.capacity_concurrency, args.max_num_queued_reqs, args.output_json
    )

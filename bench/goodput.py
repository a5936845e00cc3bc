"""`glmserve bench goodput`: disaggregated against colocated serving on the same devices, the DistServe comparison.

Each arrangement gets two replicas of one device each (a GPU with `--device cuda`, else a CPU process): 1 prefill +
1 decode replica (`disaggregated`), or 2 decode replicas that prefill their own prompts (`colocated`). The app is
started in one arrangement, then the other, and in each the same trace is replayed at every `--rates` request rate
by `glmserve bench serve`. A rate is sustained when at least the target share of its requests (90% by default)
met both SLOs; an arrangement's goodput is the highest sustained rate (Zhong et al., DistServe, OSDI 2024), and the
figure of merit is the ratio of the two goodputs. Each rate uses its own prompts (seed = the rate's index), the same
in both arrangements, so no run finds another's prompts in the prefix cache.
"""

import argparse
import asyncio
import logging

from rich.console import Console
from rich.table import Table

from glmserve.cluster.serving_config import ServingConfig

from .report import write_report
from .serve import BenchServeConfig, benchmark
from .traces import resolve_trace

log = logging.getLogger(__name__)

ARRANGEMENTS = {"disaggregated": (1, 1), "colocated": (0, 2)}  # name -> (prefill replicas, decode replicas)


def arrangement_config(base: ServingConfig, name: str, device: str) -> ServingConfig:
    """`base` with the arrangement's replicas, each holding one device."""
    prefill, decode = ARRANGEMENTS[name]
    gpus = 1 if device == "cuda" else 0
    data = base.model_dump()
    data["engine"]["device"] = device
    data["prefill"].update(replicas=prefill, num_gpus=gpus, num_cpus=1, autoscaling=None)
    data["decode"].update(replicas=decode, num_gpus=gpus, num_cpus=1, autoscaling=None)
    return ServingConfig.model_validate(data)


def goodput(rows: list[dict], target: float) -> float:
    """The highest rate whose SLO attainment reached `target` (0 when none did)."""
    return max((r["rate"] for r in rows if (r["slo_attainment"] or 0.0) >= target), default=0.0)


def _measure(config: ServingConfig, workload: BenchServeConfig, rates: list[float]) -> list[dict]:
    from ray import serve

    from glmserve.cluster.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": config.port})
    try:
        serve.run(build_app(config), name="glmserve", route_prefix="/")
        rows = []
        for i, rate in enumerate(rates):
            run = workload.model_copy(update={"trace_rate": rate, "seed": i})
            summary = asyncio.run(benchmark(run))
            rows.append(
                {
                    "rate": rate,
                    "slo_attainment": summary["slo_attainment"],
                    "request_goodput": summary["request_goodput"],
                    "request_throughput": summary["request_throughput"],
                    "p90_ttft_ms": summary["p90_ttft_ms"],
                    "p90_tpot_ms": summary["p90_tpot_ms"],
                    "failed": summary["failed"],
                }
            )
            log.info("%s", rows[-1])
        return rows
    finally:
        serve.shutdown()


def run_bench_goodput(
    base: ServingConfig,
    workload: BenchServeConfig,
    rates: list[float],
    device: str = "cpu",
    output_json: str | None = None,
) -> dict:
    """Both arrangements at every rate; prints the table, writes JSON (a row per arrangement and rate), returns the
    report."""
    import ray

    from glmserve.cluster.app import ray_init_kwargs

    base_url = f"http://127.0.0.1:{base.port}"
    workload = workload.model_copy(update={"base_url": base_url, "output_json": None, "progress": False})
    ray.init(**ray_init_kwargs())
    try:
        results = {name: _measure(arrangement_config(base, name, device), workload, rates) for name in ARRANGEMENTS}
    finally:
        ray.shutdown()
    target = workload.slo_attainment_target
    goodputs = {name: goodput(rows, target) for name, rows in results.items()}
    ratio = goodputs["disaggregated"] / goodputs["colocated"] if goodputs["colocated"] else None
    report = {
        "benchmark": "goodput",
        "device": device,
        "workload": workload.model_dump(mode="json", exclude={"api_key", "base_url", "output_json", "progress"}),
        "rates": rates,
        "results": results,
        "goodput": goodputs,
        "disaggregated_over_colocated": ratio,
    }
    _print(report, target)
    if output_json:
        table = [{"arrangement": name} | row for name, measured in results.items() for row in measured]
        write_report(output_json, table, {k: v for k, v in report.items() if k not in ("benchmark", "results")})
    return report


def _print(report: dict, target: float) -> None:
    table = Table(title=f"goodput: highest rate with >= {target:.0%} of requests within both SLOs")
    for column in ("arrangement", "rate req/s", "attainment", "goodput req/s", "p90 TTFT ms", "p90 TPOT ms"):
        table.add_column(column, justify="left" if column == "arrangement" else "right")
    for name, rows in report["results"].items():
        for r in rows:
            table.add_row(
                name, f"{r['rate']:g}", f"{r['slo_attainment'] or 0:.2f}", f"{r['request_goodput'] or 0:.2f}",
                f"{r['p90_ttft_ms'] or 0:,.0f}", f"{r['p90_tpot_ms'] or 0:,.1f}",
            )  # fmt: skip
    console = Console()
    console.print(table)
    ratio = report["disaggregated_over_colocated"]
    summary = ", ".join(f"{name} {value:g} req/s" for name, value in report["goodput"].items())
    console.print(f"goodput: {summary}; disaggregated / colocated: {'-' if ratio is None else f'{ratio:.2f}x'}")


def add_bench_goodput_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="ServingConfig YAML (engine, SLOs); replicas are set per arrangement")
    parser.add_argument("--model", help="checkpoint directory (default: the embedded glm5-tiny)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="one per replica")
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--trace", default="azure-code", help="a trace of `glmserve bench serve --trace`")
    parser.add_argument("--rates", type=float, nargs="+", required=True, help="request rates to replay it at")
    parser.add_argument("--num-requests", type=int, default=100, help="the trace's first N requests per rate")
    parser.add_argument("--length-scale", type=float, default=1.0, help="divide the trace's lengths by this")
    parser.add_argument("--max-output-len", type=int, help="clip output lengths")
    parser.add_argument("--slo-ttft", dest="slo_ttft_ms", type=float, help="default: the config's slo_ttft_ms")
    parser.add_argument("--slo-tpot", dest="slo_tpot_ms", type=float, help="default: the config's slo_tpot_ms")
    parser.add_argument("--output-json", default="bench_goodput.json")


def run_from_args(args: argparse.Namespace) -> dict:
    resolve_trace(args.trace)  # a missing trace fails here, before Ray and two apps have started
    base = ServingConfig.from_yaml(args.config) if args.config else ServingConfig()
    base = base.model_copy(update={"port": args.port})
    if args.model:
        base = base.model_copy(update={"engine": base.engine.model_copy(update={"model": args.model})})
    workload = BenchServeConfig(
        trace=args.trace,
        num_requests=args.num_requests,
        length_scale=args.length_scale,
        max_output_len=args.max_output_len,
        token_ids=True,
        slo_ttft_ms=args.slo_ttft_ms or base.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms or base.slo_tpot_ms,
        trace_rate=args.rates[0],
    )
    return run_bench_goodput(base, workload, args.rates, args.device, args.output_json or None)

"""`glmserve plan predict`: simulate a deployment on a workload and report what `glmserve bench serve` would have
measured, under the same JSON keys (`bench.serve.summarize` computes them from per-request results), and compare
a prediction with a measured run (`--compare BENCH.json`)."""

import logging
import math
import time
from datetime import datetime
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from glmserve.bench.serve import BenchServeConfig, RequestResult, summarize
from glmserve.cluster.serving_config import ServingConfig

from .cluster import Deployment, PlannerSettings, build_deployment
from .simulator import ClusterSimulator, RequestState
from .workload import SimRequest, load_workload

log = logging.getLogger(__name__)

# figures compared by --compare: (key, label, goal) with goal the tolerance on the relative error
COMPARED = [
    ("mean_ttft_ms", "TTFT mean", 0.10),
    ("median_ttft_ms", "TTFT p50", 0.10),
    ("p90_ttft_ms", "TTFT p90", 0.15),
    ("p99_ttft_ms", "TTFT p99", None),
    ("mean_tpot_ms", "TPOT mean", 0.10),
    ("median_tpot_ms", "TPOT p50", 0.10),
    ("p90_tpot_ms", "TPOT p90", 0.15),
    ("p99_tpot_ms", "TPOT p99", None),
    ("mean_itl_ms", "ITL mean", 0.10),
    ("p90_itl_ms", "ITL p90", 0.15),
    ("mean_e2el_ms", "E2E mean", 0.10),
    ("p90_e2el_ms", "E2E p90", 0.15),
    ("request_throughput", "throughput (req/s)", 0.05),
    ("output_throughput", "output tok/s", 0.05),
    ("request_goodput", "goodput (req/s)", None),
    ("slo_attainment", "SLO attainment", None),
]


def simulate(
    deployment: Deployment,
    requests: list[SimRequest],
    bench: BenchServeConfig,
    collect: bool = True,
    stop_after_misses: int | None = None,
    seed: int = 0,
) -> ClusterSimulator:
    sim = ClusterSimulator(
        deployment.spec,
        requests,
        request_timeout_s=bench.request_timeout,
        collect_chunks=collect,
        stop_after_misses=stop_after_misses,
        slo_ttft_s=bench.slo_ttft_ms / 1e3 if bench.slo_ttft_ms else None,
        slo_tpot_s=bench.slo_tpot_ms / 1e3 if bench.slo_tpot_ms else None,
        seed=seed,
    )
    sim.run()
    return sim


def request_results(states: list[RequestState]) -> tuple[list[RequestResult], float]:
    """Per-request results as `bench serve` records them, and the run's duration (first send to last answer)."""
    results, end = [], 0.0
    for s in states:
        arrival = s.req.arrival_s
        if s.error is not None or s.finish_s is None:
            results.append(RequestResult(input_len=s.req.input_len, error=s.error or "not finished"))
            end = max(end, arrival)
            continue
        chunks = s.chunk_times or [s.first_token_s, s.finish_s]
        itls = np.diff(chunks).tolist() if len(chunks) > 1 else []
        results.append(
            RequestResult(
                input_len=s.req.input_len,
                output_len=s.output_tokens,
                ttft_s=s.first_token_s - arrival,
                itls_s=itls,
                e2el_s=s.finish_s - arrival,
            )
        )
        end = max(end, s.finish_s)
    return results, end


def predict(config: ServingConfig, settings: PlannerSettings, bench: BenchServeConfig, seed: int = 0) -> dict[str, Any]:
    """The `bench serve` summary this deployment would produce on this workload, plus a `planner` section."""
    deployment = build_deployment(config, settings)
    requests = load_workload(bench)
    t0 = time.perf_counter()
    sim = simulate(deployment, requests, bench, seed=seed)
    wall = time.perf_counter() - t0
    results, duration = request_results(sim.states)
    summary: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "model_id": deployment.model,
        "base_url": "simulated",
        "config": bench.model_dump(mode="json", exclude={"api_key"}),
    }
    summary.update(summarize(bench, results, 0, max(duration, 1e-9)))
    summary["planner"] = {
        "deployment": deployment.model_dump(mode="json"),
        "simulated_requests": len(requests),
        "remote_prefills": sim.remote_prefills,
        "local_prefills": sim.local_prefills,
        "remote_fallbacks": sim.fallbacks,
        "preemptions": sum(s.preemptions for s in sim.states),
        "kv_transfer_bytes": sim.transfer_bytes,
        "replica_busy_fraction": {r.name: r.busy_s / max(duration, 1e-9) for r in sim.decode + sim.prefill},
        "engine_steps": sum(r.steps for r in sim.decode + sim.prefill),
        "simulation_wall_s": wall,
    }
    return summary


CALIBRATED = ("mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "median_tpot_ms")


def calibrate_step_time_scale(
    config: ServingConfig, settings: PlannerSettings, bench: BenchServeConfig, measured: dict, seed: int = 0
) -> tuple[float, float]:
    """The `step_time_scale` that best reproduces a measured run's mean and median TTFT and TPOT (least squares of
    log errors, golden-section search over [0.2, 5]); returns it and the remaining rms log error."""
    requests = load_workload(bench)
    targets = {k: measured[k] for k in CALIBRATED if measured.get(k)}
    if not targets:
        raise ValueError("the measured run has no TTFT/TPOT figures to calibrate on")

    def loss(log_scale: float) -> float:
        trial = settings.model_copy(update={"step_time_scale": math.exp(log_scale)})
        sim = simulate(build_deployment(config, trial), requests, bench, seed=seed)
        results, duration = request_results(sim.states)
        s = summarize(bench, results, 0, max(duration, 1e-9))
        return sum(math.log(max(s[k] or 1e-9, 1e-9) / v) ** 2 for k, v in targets.items())

    lo, hi = math.log(0.2), math.log(5.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(24):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    best = (lo + hi) / 2
    return math.exp(best), math.sqrt(loss(best) / len(targets))


def load_measured(path: str) -> dict[str, Any]:
    """A `glmserve bench serve` JSON: the result format (`rows[0]` and `extra`) or the older flat summary."""
    import json
    from pathlib import Path

    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and isinstance(data.get("rows"), list) and data["rows"]:
        return {**data.get("extra", {}), **data["rows"][0]}
    if isinstance(data, dict) and "mean_ttft_ms" in data:
        return data
    raise ValueError(f"{path} is not a `glmserve bench serve` result (no rows, no mean_ttft_ms)")


def write_prediction(path: str, summary: dict[str, Any]) -> None:
    """In `bench serve`'s result format: the summary as the one row, the per-request lists in `extra`."""
    from glmserve.bench.report import write_report
    from glmserve.bench.serve import _DETAIL_KEYS

    detail = (*_DETAIL_KEYS, "planner")
    row = {k: v for k, v in summary.items() if k not in detail}
    write_report(path, [row], {k: summary[k] for k in detail if k in summary})


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or measured is None or not math.isfinite(predicted) or not math.isfinite(measured):
        return None
    if measured == 0:
        return 0.0 if predicted == 0 else None
    return (predicted - measured) / abs(measured)


def compare(predicted: dict, measured: dict) -> list[dict[str, Any]]:
    rows = []
    for key, label, goal in COMPARED:
        p, m = predicted.get(key), measured.get(key)
        err = relative_error(p, m)
        rows.append(
            {
                "key": key,
                "label": label,
                "predicted": p,
                "measured": m,
                "relative_error": err,
                "goal": goal,
                "within_goal": None if goal is None or err is None else abs(err) <= goal,
            }
        )
    return rows


def print_prediction(summary: dict, console: Console | None = None) -> None:
    console = console or Console()
    dep = summary["planner"]["deployment"]
    roles = []
    for name in ("prefill", "decode"):
        r = dep.get(name)
        if r:
            roles.append(
                f"{r['replicas']} {name} x {r['gpus_per_replica']} GPU (tp {r['tensor_parallel_size']}, "
                f"ep {r['expert_parallel_size']}, {r['kv_tokens']:,} KV tokens)"
            )
    console.print(f"[bold]{dep['model']}[/] on {dep['hardware']}: {' + '.join(roles)}; {dep['gpus']} GPUs")
    for name in ("prefill", "decode"):
        if dep.get(name):
            console.print(f"  {name} cost model: {dep[name]['cost_model']}")
    table = Table(title="Predicted (bench serve keys)")
    table.add_column("metric")
    for stat in ("mean", "p50", "p90", "p99"):
        table.add_column(stat, justify="right")
    for name, label in (("ttft", "TTFT ms"), ("tpot", "TPOT ms"), ("itl", "ITL ms"), ("e2el", "E2E ms")):
        keys = [f"mean_{name}_ms", f"median_{name}_ms", f"p90_{name}_ms", f"p99_{name}_ms"]
        table.add_row(label, *(_fmt(summary.get(k)) for k in keys))
    console.print(table)
    p = summary["planner"]
    console.print(
        f"throughput {summary['request_throughput']:.3f} req/s, {summary['output_throughput']:.1f} output tok/s; "
        f"goodput {_fmt(summary.get('request_goodput'), 3)} req/s, "
        f"SLO attainment {_fmt(summary.get('slo_attainment'), 3)}; "
        f"{summary['completed']} completed, {summary['failed']} failed; remote prefills {p['remote_prefills']}, "
        f"preemptions {p['preemptions']}; simulated in {p['simulation_wall_s']:.2f} s"
    )


def print_comparison(rows: list[dict], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="Predicted vs measured")
    for col in ("figure", "predicted", "measured", "error", "goal"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for r in rows:
        err = r["relative_error"]
        mark = "" if r["within_goal"] is None else (" ok" if r["within_goal"] else " MISS")
        table.add_row(
            r["label"],
            _fmt(r["predicted"], 3),
            _fmt(r["measured"], 3),
            "-" if err is None else f"{100 * err:+.1f}%{mark}",
            "-" if r["goal"] is None else f"±{100 * r['goal']:.0f}%",
        )
    console.print(table)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"

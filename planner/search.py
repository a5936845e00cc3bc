"""`glmserve plan search`: simulate many deployments of one model on one workload and rank them.

Candidates are the product of the search space (P:D replica counts, TP/EP per role, `max_num_seqs`, chunk size =
`max_num_batched_tokens`, local-prefill threshold) over a base `ServingConfig`, under a GPU budget. Each one's
goodput is DistServe's: the highest request rate at which at least the target share (90%) of requests meet both
SLOs. Rates are tried from a grid in increasing order (the trace rescaled to each, as `--trace-rate` does) until
one fails, then the gap is bisected `refine` times. Objectives: goodput per GPU, or cost per million output tokens
at the goodput rate. Runs in parallel over processes, with a progress bar; a simulation that has already missed
too many requests stops early.
"""

import itertools
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm

from glmserve.bench.serve import BenchServeConfig, summarize
from glmserve.bench.traces import TraceRequest, rescale_to_rate
from glmserve.cluster.serving_config import ServingConfig

from .cluster import InfeasibleConfig, PlannerSettings, build_deployment
from .predict import request_results, simulate
from .workload import SimRequest

log = logging.getLogger(__name__)

Objective = Literal["goodput_per_gpu", "cost_per_mtok"]


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefill_replicas: list[int] = Field(default_factory=lambda: [0, 1, 2])
    decode_replicas: list[int] = Field(default_factory=lambda: [1, 2])
    prefill_parallel: list[tuple[int, int]] = Field(default_factory=lambda: [(1, 1)])  # (tp, ep) per replica
    decode_parallel: list[tuple[int, int]] = Field(default_factory=lambda: [(1, 1)])
    max_num_seqs: list[int] = Field(default_factory=lambda: [256])
    max_num_batched_tokens: list[int] = Field(default_factory=lambda: [2048])
    local_prefill_threshold: list[int] = Field(default_factory=lambda: [256])
    max_gpus: int | None = Field(None, ge=1)
    min_gpus: int = Field(1, ge=1)

    @field_validator("prefill_parallel", "decode_parallel", mode="before")
    @classmethod
    def _pairs(cls, v: Any) -> Any:
        """Accept "8x8" or "8,8" or [8, 8] for (tp, ep)."""
        out = []
        for item in v:
            if isinstance(item, str):
                tp, ep = item.replace(",", "x").split("x")
                item = (int(tp), int(ep))
            out.append(tuple(item))
        return out

    def candidates(self, base: ServingConfig) -> list[ServingConfig]:
        out, seen = [], set()
        for p, d, ppar, dpar, seqs, chunk, thr in itertools.product(
            self.prefill_replicas, self.decode_replicas, self.prefill_parallel, self.decode_parallel,
            self.max_num_seqs, self.max_num_batched_tokens, self.local_prefill_threshold,
        ):  # fmt: skip
            if p == 0:
                ppar, thr = (1, 1), 0  # colocated: no prefill split, no threshold
            gpus = p * max(ppar) + d * max(dpar)
            if gpus < self.min_gpus or (self.max_gpus is not None and gpus > self.max_gpus):
                continue
            key = (p, d, ppar, dpar, seqs, chunk, thr)
            if key in seen:
                continue
            seen.add(key)
            data = base.model_dump()
            data["prefill"].update(replicas=p, autoscaling=None)
            data["decode"].update(replicas=d, autoscaling=None)
            data["engine"].update(
                tensor_parallel_size=dpar[0], expert_parallel_size=dpar[1], max_num_seqs=seqs,
                max_num_batched_tokens=chunk,
            )  # fmt: skip
            data["prefill_engine"] = {"tensor_parallel_size": ppar[0], "expert_parallel_size": ppar[1]}
            data["local_prefill_threshold"] = thr
            out.append(ServingConfig.model_validate(data))
        return out


def describe(config: ServingConfig) -> str:
    e, pe = config.engine, config.prefill_engine
    d = f"{config.decode.replicas}D(tp{e.tensor_parallel_size},ep{e.expert_parallel_size})"
    if config.prefill.replicas:
        p = f"{config.prefill.replicas}P(tp{pe.tensor_parallel_size},ep{pe.expert_parallel_size})"
        return f"{p}+{d} seqs {e.max_num_seqs} chunk {e.max_num_batched_tokens} thr {config.local_prefill_threshold}"
    return f"{d} colocated seqs {e.max_num_seqs} chunk {e.max_num_batched_tokens}"


_AT_RATE: dict[tuple[int, float], tuple[list[SimRequest], list[SimRequest]]] = {}


def at_rate(requests: list[SimRequest], rate: float) -> list[SimRequest]:
    """The workload with its arrivals rescaled to a mean rate (bursts keep their shape), as --trace-rate does;
    the requests' block keys are shared with the originals."""
    key = (id(requests), rate)
    cached = _AT_RATE.get(key)
    if cached is None or cached[0] is not requests:  # the originals are kept, so their id is not reused
        if len(_AT_RATE) > 64:
            _AT_RATE.clear()
        scaled = rescale_to_rate([TraceRequest(r.arrival_s, r.input_len, r.output_len) for r in requests], rate)
        cached = _AT_RATE[key] = requests, [
            SimRequest(r.index, t.arrival_s, r.input_len, r.output_len, r.hash_ids, r.trace_block_tokens, r._keys,
                       r._all)
            for r, t in zip(requests, scaled, strict=True)
        ]  # fmt: skip
    return cached[1]


def evaluate_rate(
    deployment, requests: list[SimRequest], bench: BenchServeConfig, rate: float, early_stop: bool, seed: int = 0
) -> dict[str, Any]:
    """Attainment and throughput at one rate."""
    bench_at = bench.model_copy(update={"trace_rate": rate})
    reqs = at_rate(requests, rate)
    allowed = math.floor((1 - bench.slo_attainment_target) * len(reqs)) + 1 if early_stop else None
    sim = simulate(deployment, reqs, bench_at, collect=False, stop_after_misses=allowed, seed=seed)
    results, duration = request_results(sim.states)
    s = summarize(bench_at, results, 0, max(duration, 1e-9))
    gpus = deployment.gpus
    return {
        "rate": rate,
        "attainment": s["slo_attainment"],
        "met": bool(s["slo_attainment_met"]),
        "stopped_early": sim.stopped,
        "request_throughput": s["request_throughput"],
        "output_throughput": s["output_throughput"],
        "output_throughput_per_gpu": s["output_throughput"] / gpus,
        "mean_ttft_ms": s["mean_ttft_ms"],
        "p90_ttft_ms": s["p90_ttft_ms"],
        "mean_tpot_ms": s["mean_tpot_ms"],
        "p90_tpot_ms": s["p90_tpot_ms"],
    }


def goodput_search(
    deployment, requests: list[SimRequest], bench: BenchServeConfig, rates: list[float], refine: int
) -> tuple[float, list[dict[str, Any]]]:
    """DistServe goodput: the highest rate meeting the attainment target (0 if none of `rates` does)."""
    points, best, fail = [], None, None
    for rate in sorted(rates):
        point = evaluate_rate(deployment, requests, bench, rate, early_stop=True)
        points.append(point)
        if point["met"]:
            best = point
        else:
            fail = rate
            break
    if best is not None and fail is not None:
        lo, hi = best["rate"], fail
        for _ in range(refine):
            mid = math.sqrt(lo * hi)
            point = evaluate_rate(deployment, requests, bench, mid, early_stop=True)
            points.append(point)
            if point["met"]:
                lo, best = mid, point
            else:
                hi = mid
    return (best["rate"] if best else 0.0), sorted(points, key=lambda p: p["rate"])


# ---- worker processes: the workload and settings once per process ----
_WORK: dict[str, Any] = {}


def _init(requests, bench, settings, rates, refine, price) -> None:
    _WORK.update(requests=requests, bench=bench, settings=settings, rates=rates, refine=refine, price=price)


def _evaluate(config: ServingConfig) -> dict[str, Any]:
    w = _WORK
    t0 = time.perf_counter()
    row: dict[str, Any] = {"name": describe(config), "config": _config_summary(config)}
    try:
        deployment = build_deployment(config, w["settings"])
    except (InfeasibleConfig, ValueError) as e:
        row.update(feasible=False, reason=str(e).splitlines()[0], gpus=None)
        return row
    goodput, points = goodput_search(deployment, w["requests"], w["bench"], w["rates"], w["refine"])
    at_best = next((p for p in points if p["rate"] == goodput), None)
    out_tps = at_best["output_throughput"] if at_best else 0.0
    gpu_hours_per_s = deployment.gpus / 3600.0
    cost = (gpu_hours_per_s * (w["price"] or 1.0)) / out_tps * 1e6 if out_tps > 0 else math.inf
    row.update(
        feasible=True,
        gpus=deployment.gpus,
        goodput=goodput,
        goodput_at_grid_top=goodput >= max(w["rates"]),  # a lower bound: try higher --rates
        goodput_per_gpu=goodput / deployment.gpus,
        output_throughput_per_gpu=out_tps / deployment.gpus,
        tokens_per_s_per_user=(1000.0 / at_best["mean_tpot_ms"]) if at_best and at_best["mean_tpot_ms"] else None,
        cost_per_mtok=cost,
        cost_unit="USD" if w["price"] else "GPU-hours",
        mean_ttft_ms=at_best["mean_ttft_ms"] if at_best else None,
        p90_ttft_ms=at_best["p90_ttft_ms"] if at_best else None,
        mean_tpot_ms=at_best["mean_tpot_ms"] if at_best else None,
        p90_tpot_ms=at_best["p90_tpot_ms"] if at_best else None,
        decode_kv_tokens=deployment.decode.kv_tokens,
        weights_gb_per_gpu=deployment.decode.weights_gb_per_gpu,
        points=points,
        seconds=time.perf_counter() - t0,
    )
    return row


def _config_summary(config: ServingConfig) -> dict[str, Any]:
    e = config.engine
    return {
        "prefill_replicas": config.prefill.replicas,
        "decode_replicas": config.decode.replicas,
        "prefill_tp": config.prefill_engine.tensor_parallel_size,
        "prefill_ep": config.prefill_engine.expert_parallel_size,
        "decode_tp": e.tensor_parallel_size,
        "decode_ep": e.expert_parallel_size,
        "max_num_seqs": e.max_num_seqs,
        "max_num_batched_tokens": e.max_num_batched_tokens,
        "local_prefill_threshold": config.local_prefill_threshold,
    }


def run_search(
    base: ServingConfig,
    space: SearchSpace,
    settings: PlannerSettings,
    requests: list[SimRequest],
    bench: BenchServeConfig,
    rates: list[float],
    refine: int = 3,
    objective: Objective = "goodput_per_gpu",
    workers: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every candidate's row, best first by the objective (infeasible ones last, with their reason)."""
    if bench.slo_ttft_ms is None and bench.slo_tpot_ms is None:
        raise ValueError("a search needs SLOs (--slo-ttft and/or --slo-tpot)")
    candidates = space.candidates(base)
    if not candidates:
        raise ValueError("the search space is empty under the GPU budget")
    workers = workers or os.cpu_count() or 1
    args = (requests, bench, settings, sorted(rates), refine, settings.gpu_hour_usd)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(candidates), desc="search", unit="config", disable=not progress)
    if workers == 1:
        _init(*args)
        for c in candidates:
            rows.append(_evaluate(c))
            bar.update()
    else:
        with ProcessPoolExecutor(workers, initializer=_init, initargs=args) as pool:
            for row in pool.map(_evaluate, candidates, chunksize=max(1, len(candidates) // (workers * 8))):
                rows.append(row)
                bar.update()
    bar.close()
    return rank(rows, objective)


def rank(rows: list[dict[str, Any]], objective: Objective) -> list[dict[str, Any]]:
    feasible = [r for r in rows if r["feasible"]]
    if objective == "cost_per_mtok":
        feasible.sort(key=lambda r: (r["cost_per_mtok"], -r["goodput_per_gpu"]))
    else:
        feasible.sort(key=lambda r: (-r["goodput_per_gpu"], r["cost_per_mtok"]))
    return feasible + [r for r in rows if not r["feasible"]]


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Feasible rows not beaten on both output tokens/s per GPU and tokens/s per user (at their goodput rate)."""
    pts = [r for r in rows if r["feasible"] and r.get("tokens_per_s_per_user") and r["goodput"] > 0]
    front = []
    for r in pts:
        x, y = r["tokens_per_s_per_user"], r["output_throughput_per_gpu"]
        if not any(
            (o["tokens_per_s_per_user"] >= x and o["output_throughput_per_gpu"] >= y)
            and (o["tokens_per_s_per_user"] > x or o["output_throughput_per_gpu"] > y)
            for o in pts
        ):
            front.append(r)
    return sorted(front, key=lambda r: r["tokens_per_s_per_user"])

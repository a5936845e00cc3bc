"""`glmserve plan predict` and `glmserve plan search`."""

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from glmserve.bench.serve import BenchServeConfig
from glmserve.cluster.serve_command import config_from_args
from glmserve.cluster.serving_config import ServingConfig

from .cluster import PlannerSettings
from .predict import (
    calibrate_step_time_scale,
    compare,
    load_measured,
    predict,
    print_comparison,
    print_prediction,
    write_prediction,
)
from .search import SearchSpace, pareto_front, run_search
from .workload import load_workload

log = logging.getLogger(__name__)

_ENGINE_FLAGS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "gpu_memory_utilization")


def serving_config(args: argparse.Namespace) -> ServingConfig:
    """The YAML with `glmserve serve`'s overrides (its own function), then the engine flags the planner adds."""
    config = config_from_args(args)
    data = config.model_dump()
    for name in _ENGINE_FLAGS:
        if getattr(args, name, None) is not None:
            data["engine"][name] = getattr(args, name)
    if args.local_prefill_threshold is not None:
        data["local_prefill_threshold"] = args.local_prefill_threshold
    return ServingConfig.model_validate(data)


def planner_settings(args: argparse.Namespace) -> PlannerSettings:
    base = PlannerSettings.from_yaml(args.planner_config) if args.planner_config else PlannerSettings()
    flags = {
        "hardware": args.hardware,
        "hardware_file": args.hardware_file,
        "model_config_file": args.model_config,
        "weights": args.weights,
        "kv_cache": args.kv_cache,
        "profile": args.profile,
        "fit_profile": args.fit_profile,
        "analytic": args.analytic,
        "mtp_acceptance": args.mtp_acceptance,
        "gpu_hour_usd": args.gpu_hour_usd,
        "step_time_scale": args.step_time_scale,
    }
    return base.model_copy(update={k: v for k, v in flags.items() if v is not None})


def bench_config(args: argparse.Namespace, measured: dict | None = None, force: bool = False) -> BenchServeConfig:
    """The workload as `bench serve` builds it from the same flags; with a measured run and no --trace (or
    `force`), the measured run's own."""
    values = {k: v for k, v in vars(args).items() if v is not None}
    if measured is not None and (force or not args.trace) and isinstance(measured.get("config"), dict):
        log.info("replaying the workload of the measured run (its recorded bench serve configuration)")
        values = {**measured["config"], **{k: values[k] for k in ("output_json", "trace_dir") if k in values}}
    values["progress"] = False
    return BenchServeConfig.model_validate(values)


def calibrated(args: argparse.Namespace, config: ServingConfig, settings: PlannerSettings) -> PlannerSettings:
    """With --calibrate: the settings with the step-time scale that reproduces that run."""
    if not args.calibrate:
        return settings
    run = load_measured(args.calibrate)
    scale, rms = calibrate_step_time_scale(config, settings, bench_config(args, run, force=True), run, args.sim_seed)
    print(f"calibrated on {args.calibrate}: --step-time-scale {scale:.3f} (rms log error {rms:.3f})")
    return settings.model_copy(update={"step_time_scale": scale})


def clear_errors(run):
    """A bad input (unknown hardware, an infeasible config, a broken trace or profile) ends the command with its
    message and exit status 2, not a traceback."""
    import functools

    from glmserve.model.config import ConfigError

    from .cluster import InfeasibleConfig
    from .hardware import UnknownHardware
    from .profile import ProfileError
    from .workload import TraceError

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (InfeasibleConfig, UnknownHardware, TraceError, ProfileError, ConfigError) as e:
            log.error("%s: %s", type(e).__name__, e)
            return 2

    return wrapped


@clear_errors
def run_plan_predict(args: argparse.Namespace) -> int:
    measured = load_measured(args.compare) if args.compare else None
    config = serving_config(args)
    settings = calibrated(args, config, planner_settings(args))
    bench = bench_config(args, measured)
    summary = predict(config, settings, bench, seed=args.sim_seed)
    console = wide_console()
    print_prediction(summary, console)
    if measured is not None:
        rows = compare(summary, measured)
        print_comparison(rows, console)
        summary["planner"]["compare"] = {"measured": args.compare, "rows": rows}
    if args.output_json:
        write_prediction(args.output_json, summary)
        log.info("wrote %s", args.output_json)
    return 0


def search_space(args: argparse.Namespace) -> SearchSpace:
    data: dict[str, Any] = yaml.safe_load(Path(args.space).read_text()) if args.space else {}
    flags = {
        "prefill_replicas": args.p_replicas,
        "decode_replicas": args.d_replicas,
        "prefill_parallel": args.p_parallel,
        "decode_parallel": args.d_parallel,
        "max_num_seqs": args.seqs,
        "max_num_batched_tokens": args.chunks,
        "local_prefill_threshold": args.thresholds,
        "max_gpus": args.max_gpus,
        "min_gpus": args.min_gpus,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    return SearchSpace.model_validate(data)


@clear_errors
def run_plan_search(args: argparse.Namespace) -> int:
    from .cluster import build_deployment
    from .plots import plot_cdfs, plot_goodput_vs_rate, plot_pareto
    from .predict import request_results, simulate
    from .search import at_rate

    base = serving_config(args)
    settings = calibrated(args, base, planner_settings(args))
    bench = bench_config(args)
    if bench.slo_ttft_ms is None and bench.slo_tpot_ms is None:
        bench = bench.model_copy(update={"slo_ttft_ms": base.slo_ttft_ms, "slo_tpot_ms": base.slo_tpot_ms})
    space = search_space(args)
    requests = load_workload(bench)
    rows = run_search(
        base, space, settings, requests, bench, args.rates, args.refine, args.objective, args.workers, args.progress
    )
    front = pareto_front(rows)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print_search(rows, args.top, args.objective)
    # CDFs of the best configurations at their goodput rate (a full simulation each, per-request figures kept)
    curves = {}
    by_name = {c.model_dump_json(): c for c in space.candidates(base)}
    for r in [r for r in rows if r["feasible"] and r["goodput"] > 0][: min(args.top, 6)]:
        config = next(c for c in by_name.values() if _matches(c, r["config"]))
        deployment = build_deployment(config, settings)
        sim = simulate(
            deployment, at_rate(requests, r["goodput"]), bench.model_copy(update={"trace_rate": r["goodput"]})
        )
        results, _ = request_results(sim.states)
        ok = [x for x in results if x.error is None]
        curves[r["name"]] = {
            "ttft_ms": [x.ttft_s * 1e3 for x in ok],
            "tpot_ms": [x.tpot_s * 1e3 for x in ok if x.output_len > 1],
        }
    plots = {
        "goodput_vs_rate": str(
            plot_goodput_vs_rate(rows, out / "goodput_vs_rate.png", bench.slo_attainment_target, args.top)
        ),
        "cdfs": str(plot_cdfs(curves, out / "ttft_tpot_cdf.png", bench.slo_ttft_ms, bench.slo_tpot_ms)),
        "pareto": str(plot_pareto(rows, front, out / "pareto.png")),
    }
    result = {
        "workload": bench.model_dump(mode="json", exclude={"api_key"}),
        "settings": settings.model_dump(mode="json"),
        "space": space.model_dump(mode="json"),
        "rates": args.rates,
        "objective": args.objective,
        "configurations": len(rows),
        "feasible": sum(r["feasible"] for r in rows),
        "best": rows[0] if rows and rows[0]["feasible"] else None,
        "pareto_front": [r["name"] for r in front],
        "plots": plots,
        "rows": rows,
    }
    (out / "search.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out / 'search.json'} and {', '.join(plots.values())}")
    return 0


def _matches(config: ServingConfig, summary: dict) -> bool:
    from .search import _config_summary

    return _config_summary(config) == summary


def wide_console() -> Console:
    """A console that does not squeeze tables to 80 columns when writing to a file or pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=180)


def print_search(rows: list[dict], top: int, objective: str, console: Console | None = None) -> None:
    console = console or wide_console()
    feasible = [r for r in rows if r["feasible"]]
    table = Table(title=f"Best {min(top, len(feasible))} of {len(rows)} configurations by {objective}")
    for col in (
        "configuration",
        "GPUs",
        "goodput req/s",
        "per GPU",
        "tok/s/GPU",
        "tok/s/user",
        "TTFT p90",
        "TPOT p90",
        "cost/Mtok",
    ):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for r in feasible[:top]:
        cost = "-" if r["cost_per_mtok"] == float("inf") else f"{r['cost_per_mtok']:.3g} {r['cost_unit']}"
        table.add_row(
            r["name"], str(r["gpus"]), (">=" if r["goodput_at_grid_top"] else "") + f"{r['goodput']:.3g}",
            f"{r['goodput_per_gpu']:.3g}",
            f"{r['output_throughput_per_gpu']:.3g}", _f(r["tokens_per_s_per_user"]), _f(r["p90_ttft_ms"]),
            _f(r["p90_tpot_ms"]), cost,
        )  # fmt: skip
    console.print(table)
    if any(r["goodput_at_grid_top"] for r in feasible[:top]):
        console.print(">= : met the SLOs at the highest rate tried; goodput is at least that (give higher --rates)")
    if feasible and all(r["goodput"] == 0 for r in feasible):
        console.print("no configuration met the SLOs at the lowest rate tried (looser SLOs, lower --rates?)")
    infeasible = [r for r in rows if not r["feasible"]]
    if infeasible:
        console.print(f"{len(infeasible)} infeasible, e.g. {infeasible[0]['name']}: {infeasible[0]['reason']}")


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:,.3g}" if v < 1000 else f"{v:,.0f}"

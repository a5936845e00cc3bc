"""The `glmserve` command line."""

import argparse
import logging
import sys
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    from glmserve.model.config import GlmConfig
    from glmserve.model.default_checkpoint import PACKAGED
    from glmserve.model.footprint import NODES, fit_report
    from glmserve.model.kv_cache import kv_bytes_report
    from glmserve.model.size import model_size

    source = Path(args.config or args.model or PACKAGED)
    config = GlmConfig.from_pretrained(source)
    print(f"model: {source}")
    print(
        f"layers {config.num_hidden_layers} (+{config.num_nextn_predict_layers} MTP), "
        f"indexer full/shared {config.indexer_types.count('full')}/{config.indexer_types.count('shared')}, "
        f"experts {config.n_routed_experts} top-{config.num_experts_per_tok}, "
        f"context {config.max_position_embeddings}"
    )
    print(model_size(config).table())
    print(kv_bytes_report(config))
    print(fit_report(config, NODES[args.node]))
    return 0


def _train_tiny(args: argparse.Namespace) -> int:
    from glmserve.train.train_tiny import main as train_main

    train_main(args.rest)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from glmserve.cluster.serve_command import run_serve

    return run_serve(args)


def _trace_error(error: FileNotFoundError) -> int:
    """A trace that is not there is a mistake in the command line, not a crash: say where it was looked for."""
    print(f"glmserve: error: {error}", file=sys.stderr)
    return 2


def _bench_serve(args: argparse.Namespace) -> int:
    from glmserve.bench.serve import run_bench_serve
    from glmserve.bench.traces import TraceNotFoundError

    try:
        run_bench_serve(args)
    except TraceNotFoundError as e:
        return _trace_error(e)
    return 0


def _bench_kvtransfer(args: argparse.Namespace) -> int:
    from glmserve.bench.kvtransfer import run_bench

    run_bench(args)
    return 0


def _run_quiet(module: str, function: str, *args) -> int:
    """Import a benchmark only when chosen: the GPU ones pull in Triton."""
    import importlib

    getattr(importlib.import_module(module), function)(*args)
    return 0


def _bench_mtp(args: argparse.Namespace) -> int:
    from glmserve.bench.mtp import run_bench_mtp

    run_bench_mtp(
        args.model,
        args.device,
        args.num_prompts,
        args.max_tokens,
        tuple(args.batch_sizes),
        tuple(args.ks),
        output_json=args.output_json,
    )
    return 0


def _bench_router(args: argparse.Namespace) -> int:
    from glmserve.bench.router import run_bench_router

    run_bench_router(args.num_requests, args.port, args.output_json)
    return 0


def _bench_goodput(args: argparse.Namespace) -> int:
    from glmserve.bench.goodput import run_from_args
    from glmserve.bench.traces import TraceNotFoundError

    try:
        run_from_args(args)
    except TraceNotFoundError as e:
        return _trace_error(e)
    return 0


def _bench_overload(args: argparse.Namespace) -> int:
    from glmserve.bench.overload import run_from_args

    run_from_args(args)
    return 0


def _bench_autoscale(args: argparse.Namespace) -> int:
    from glmserve.bench.autoscale import run_bench_autoscale

    run_bench_autoscale(args)
    return 0


def _bench_scheduler(args: argparse.Namespace) -> int:
    from glmserve.bench.scheduler import run_bench_scheduler

    run_bench_scheduler(args.num_seqs, tuple(args.contexts), args.steps, args.output_json)
    return 0


def _batch(args: argparse.Namespace) -> int:
    from glmserve.batch.job import main as batch_main

    return batch_main(args)


def _profile(args: argparse.Namespace) -> int:
    from glmserve.planner.profiler import profile_from_args

    return profile_from_args(args)


def _plan_predict(args: argparse.Namespace) -> int:
    from glmserve.planner.commands import run_plan_predict

    return run_plan_predict(args)


def _plan_search(args: argparse.Namespace) -> int:
    from glmserve.planner.commands import run_plan_search

    return run_plan_search(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmserve", description="Serve GLM-5.x models: disaggregated, on Ray Serve.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print a model's shape and size (parameters, activated per token)")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory (default: the embedded glm5-tiny)")
    src.add_argument("--config", help="a config.json file")
    info.add_argument("--node", default="8x H200", choices=["8x H200", "8x H100", "8x B200"], help="node to fit on")
    info.set_defaults(func=_info)

    train = sub.add_parser(
        "train-tiny", help="train the embedded glm5-tiny (see train/train_tiny.py --help)", add_help=False
    )
    train.set_defaults(func=_train_tiny)

    from glmserve.cluster.serve_command import add_serve_args

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API on Ray Serve (default: glm5-tiny on CPU)")
    add_serve_args(serve)
    serve.set_defaults(func=_serve)

    bench = sub.add_parser("bench", help="benchmarks: each prints a table and writes JSON").add_subparsers(
        dest="bench", required=True
    )
    from glmserve.bench.serve import add_bench_serve_args

    bench_serve = bench.add_parser("serve", help="load an OpenAI-compatible server: TTFT/TPOT/ITL/E2E, goodput")
    add_bench_serve_args(bench_serve)
    bench_serve.set_defaults(func=_bench_serve)
    from glmserve.bench.kvtransfer import add_bench_args as add_kvtransfer_args

    kvt = bench.add_parser("kvtransfer", help="KV transfer throughput (tcp loopback; cuda_ipc vs the copy ceiling)")
    add_kvtransfer_args(kvt)
    kvt.set_defaults(func=_bench_kvtransfer)
    kernels = bench.add_parser("kernels", help="Triton kernels vs their peers and the GPU's ceilings (CUDA)")
    kernels.add_argument("--output-json", default="bench_kernels.json")
    kernels.add_argument(
        "--sections", nargs="+", default=None,
        help="indexer, topk, topk_decode, mla_prefill, mla_decode, moe (default: all)",
    )  # fmt: skip
    kernels.set_defaults(
        func=lambda a: _run_quiet("glmserve.bench.kernels", "run_kernel_bench", a.output_json, None, a.sections)
    )
    fp8 = bench.add_parser("fp8", help="FP8 GEMMs on GLM-5.2's shapes vs bf16 and the GPU's ceilings (CUDA)")
    fp8.add_argument("--shapes", nargs="+", default=None, help="weight shapes by name (default: all; see bench/fp8.py)")
    fp8.add_argument("--rows", nargs="+", type=int, default=None, help="row counts M (default: 1 to 16384)")
    fp8.add_argument("--output-json", default="bench_fp8.json")
    fp8.add_argument("--slice", type=int, default=None, help="also run GLM-5.2's first N layers in FP8 (~12 fit)")
    fp8.add_argument("--compare-bf16", action="store_true", help="with --slice: a 6-layer twin in FP8 and in bf16")
    fp8.set_defaults(
        func=lambda a: _run_quiet(
            "glmserve.bench.fp8", "run_bench_fp8", a.shapes, a.rows, a.output_json, a.slice, a.compare_bf16
        )
    )
    model = bench.add_parser("model", help="engine prefill/decode vs transformers and the HBM roofline; 1M prefill")
    model.add_argument("--output-json", default="bench_model.json")
    model.add_argument("--sections", nargs="+", default=None, help="small, large, attention (default: all)")
    model.add_argument("--quick", action="store_true")
    model.add_argument("--long-context", type=int, default=1 << 20)
    model.set_defaults(
        func=lambda a: _run_quiet(
            "glmserve.bench.model", "run_model_bench", a.output_json, a.sections, a.quick, a.long_context
        )
    )
    mtp = bench.add_parser("mtp", help="MTP acceptance and speedup on held-out code vs no speculation")
    mtp.add_argument("--model", default=None)
    mtp.add_argument("--device", default="auto")
    mtp.add_argument("--num-prompts", type=int, default=16)
    mtp.add_argument("--max-tokens", type=int, default=64)
    mtp.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    mtp.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4], help="draft lengths K to compare")
    mtp.add_argument("--output-json", default="bench_mtp.json")
    mtp.set_defaults(func=_bench_mtp)
    router = bench.add_parser("router", help="latency the OpenAI router adds over calling decode directly")
    router.add_argument("--num-requests", type=int, default=200)
    router.add_argument("--port", type=int, default=8123)
    router.add_argument("--output-json", default="bench_router.json")
    router.set_defaults(func=_bench_router)
    from glmserve.bench.goodput import add_bench_goodput_args

    goodput = bench.add_parser("goodput", help="disaggregated vs colocated goodput on the same devices (DistServe)")
    add_bench_goodput_args(goodput)
    goodput.set_defaults(func=_bench_goodput)
    from glmserve.bench.overload import add_bench_overload_args

    overload = bench.add_parser("overload", help="one replica past its capacity, with and without admission control")
    add_bench_overload_args(overload)
    overload.set_defaults(func=_bench_overload)
    from glmserve.bench.autoscale import add_bench_autoscale_args

    autoscale = bench.add_parser("autoscale", help="the SLO autoscaling policy on a real app: a timeline and a plot")
    add_bench_autoscale_args(autoscale)
    autoscale.set_defaults(func=_bench_autoscale)
    sched = bench.add_parser("scheduler", help="CPU cost of one scheduling step vs context length")
    sched.add_argument("--num-seqs", type=int, default=256)
    sched.add_argument("--contexts", type=int, nargs="+", default=[1024, 32768])
    sched.add_argument("--steps", type=int, default=200)
    sched.add_argument("--output-json", default="bench_scheduler.json")
    sched.set_defaults(func=_bench_scheduler)

    from glmserve.batch.job_args import add_batch_args

    batch = sub.add_parser("batch", help="an offline batch job on Ray Data: OpenAI batch lines or documents in")
    add_batch_args(batch)
    batch.set_defaults(func=_batch)

    from glmserve.planner.args import add_plan_predict_args, add_plan_search_args, add_profile_args

    profile = sub.add_parser("profile", help="time engine steps on this device over a grid: a profile for the planner")
    add_profile_args(profile)
    profile.set_defaults(func=_profile)
    plan = sub.add_parser("plan", help="capacity planning: simulate deployments on a trace").add_subparsers(
        dest="plan", required=True
    )
    predict = plan.add_parser(
        "predict", help="predict bench serve's figures for a config and a trace", conflict_handler="resolve"
    )
    add_plan_predict_args(predict)
    predict.set_defaults(func=_plan_predict)
    search = plan.add_parser(
        "search",
        help="search P:D, TP/EP, batch and chunk sizes for goodput per GPU or cost",
        conflict_handler="resolve",
    )
    add_plan_search_args(search)
    search.set_defaults(func=_plan_search)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.command != "train-tiny" and rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

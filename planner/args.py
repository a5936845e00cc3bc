"""Command-line arguments of `glmserve profile` and `glmserve plan predict|search` (light to import: the CLI
builds its parser from these before it knows which command runs)."""

import argparse

from glmserve.bench.serve import add_bench_serve_args
from glmserve.cluster.serve_command import add_serve_args


def add_profile_args(parser: argparse.ArgumentParser) -> None:
    # the grid defaults live with the profiler; repeated here so that building the parser imports no engine
    parser.add_argument("--model", help="checkpoint directory (default: the embedded glm5-tiny)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--threads", type=int, help="torch CPU threads (a CPU replica runs num_cpus of them)")
    parser.add_argument("--hardware", help="catalogue key the profile calibrates (default: from the device)")
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[16, 64, 256, 1024, 2048])
    parser.add_argument("--prefill-contexts", type=int, nargs="+", default=[0, 1024])
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 3], help="MTP draft lengths (0: no MTP)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each point")
    parser.add_argument("--repeats", type=int, default=5, help="timed decode steps per point (the median is kept)")
    parser.add_argument("--prefill-warmup", type=int, default=1, help="untimed prefills before each point")
    parser.add_argument("--prefill-repeats", type=int, default=3, help="timed prefills per point")
    parser.add_argument("--transport", choices=["tcp", "cuda_ipc"], help="also time KV transfers over it")
    parser.add_argument("--transfer-sizes", type=int, nargs="+", default=[1 << 20, 1 << 24, 1 << 27])
    parser.add_argument("--output", "-o", default="profile.json")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def _planner_args(parser: argparse.ArgumentParser) -> None:
    """The deployment (ServingConfig YAML and `glmserve serve`'s flags), the workload (`glmserve bench serve`'s
    flags), and what the planner needs besides."""
    add_bench_serve_args(parser)
    add_serve_args(parser)  # after bench's: its --model (a checkpoint) and --api-key win
    engine = parser.add_argument_group("engine (overrides the YAML)")
    engine.add_argument("--max-num-seqs", type=int)
    engine.add_argument("--max-num-batched-tokens", type=int, help="per-step token budget (prefill chunk size)")
    engine.add_argument("--local-prefill-threshold", type=int)
    engine.add_argument("--max-model-len", type=int)
    engine.add_argument("--gpu-memory-utilization", type=float)
    plan = parser.add_argument_group("planner")
    plan.add_argument("--planner-config", help="YAML of planner settings (the flags below override it)")
    plan.add_argument("--hardware", help="h100-sxm, h200-sxm, b200, cpu (default: cpu)")
    plan.add_argument("--hardware-file", help="YAML of more hardware entries")
    plan.add_argument("--model-config", help="config.json to plan for (default: the checkpoint's)")
    plan.add_argument("--weights", choices=["auto", "fp32", "bf16", "fp16", "fp8"])
    plan.add_argument("--kv-cache", choices=["auto", "fp32", "bf16", "fp16", "fp8"])
    plan.add_argument("--profile", help="a profile JSON (default: a shipped one of this model and hardware)")
    plan.add_argument("--fit-profile", help="fit the analytic model's efficiencies to this profile")
    plan.add_argument("--analytic", action="store_true", default=None, help="the roofline even where a profile exists")
    plan.add_argument("--mtp-acceptance", type=float, nargs="+", help="per draft position (the last repeats)")
    plan.add_argument("--gpu-hour-usd", type=float, help="price of one GPU-hour, for cost per million tokens")
    plan.add_argument(
        "--step-time-scale", type=float, help="multiply every step time (the serving stack's slowdown over a profile)"
    )
    plan.add_argument(
        "--calibrate", help="a `bench serve` JSON of this deployment: fit --step-time-scale to it first (then reused)"
    )
    plan.add_argument("--sim-seed", type=int, default=0, help="tie-breaks in routing")


def add_plan_predict_args(parser: argparse.ArgumentParser) -> None:
    _planner_args(parser)
    parser.add_argument(
        "--compare",
        help="a `glmserve bench serve` JSON: print predicted vs measured; without --trace, its workload is replayed",
    )
    parser.set_defaults(output_json="plan_predict.json")


def add_plan_search_args(parser: argparse.ArgumentParser) -> None:
    _planner_args(parser)
    space = parser.add_argument_group("search space")
    space.add_argument("--space", help="YAML of the search space (the flags below override it)")
    space.add_argument("--p-replicas", type=int, nargs="+", help="prefill replica counts (0: colocated)")
    space.add_argument("--d-replicas", type=int, nargs="+", help="decode replica counts")
    space.add_argument("--p-parallel", nargs="+", help="prefill TPxEP shapes, e.g. 8x8 4x8")
    space.add_argument("--d-parallel", nargs="+", help="decode TPxEP shapes")
    space.add_argument("--seqs", type=int, nargs="+", help="max_num_seqs values")
    space.add_argument("--chunks", type=int, nargs="+", help="max_num_batched_tokens values")
    space.add_argument("--thresholds", type=int, nargs="+", help="local_prefill_threshold values")
    space.add_argument("--max-gpus", type=int)
    space.add_argument("--min-gpus", type=int)
    space.add_argument("--rates", type=float, nargs="+", required=True, help="offered rates (req/s) to try")
    space.add_argument("--refine", type=int, default=3, help="bisections between the last met and first missed rate")
    space.add_argument("--objective", choices=["goodput_per_gpu", "cost_per_mtok"], default="goodput_per_gpu")
    space.add_argument("--workers", type=int, help="processes (default: all cores)")
    space.add_argument("--top", type=int, default=10, help="rows in the table, curves in the plots")
    space.add_argument("--output-dir", default="plan_search", help="JSON and PNG plots go here")
    parser.set_defaults(output_json=None)

"""`glmserve bench autoscale`: the SLO autoscaling policy on a real Ray Serve app, as a timeline.

The app runs prefill and decode replicas, each role autoscaled apart between 1 and `--max-replicas` by
`cluster/autoscaling.py`. The load comes in steps, each followed by a pause:
- decode: `--decode-clients` clients back to back, short prompts (prefilled on the decode replica) and long
  outputs, so running sequences outgrow one replica's `max_num_seqs`: decode should scale out, prefill not;
- prefill: `--prefill-rate` requests/s of `--prefill-prompt-len`-token prompts (sent to prefill replicas) and one
  output token (the prefill replica's), so the prompt backlog outgrows the TTFT SLO: prefill should scale out,
  decode not. Decode reserves a prompt's KV blocks before its remote prefill, so a backlog of remote prefills fills
  decode's KV too: the decode KV budget (`--kv-cache-memory-bytes`) is sized to hold them, as a real deployment's
  would be.
After each step both roles should scale back in. Once a second the run records every deployment's running replicas
(`serve.status()`) and the policy's wish (`glmserve:autoscaling_desired_replicas` on /metrics).

Per step: the peak replicas of each role; the seconds from the step's start to the scale-out and from its end to
the scale-in, each against the configured `upscale_delay_s` / `downscale_delay_s` (the earliest Serve may act).
The timeline goes to the JSON's `extra` and to a PNG.
"""

import argparse
import asyncio
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.table import Table

from glmserve.cluster.serving_config import Autoscaling, ServingConfig

from .report import write_report
from .serve import stream_completion

log = logging.getLogger(__name__)

APP = "glmserve"
ROLES = {"PrefillServer": "prefill", "DecodeServer": "decode"}
_DESIRED = re.compile(r'^glmserve:autoscaling_desired_replicas\{[^}]*replica="autoscaler:(\w+)"[^}]*\} (\S+)$')


@dataclass(frozen=True)
class Step:
    name: str  # decode | prefill
    start_s: float
    end_s: float


def autoscaled(base: ServingConfig, max_replicas: int, upscale_s: float, downscale_s: float) -> ServingConfig:
    """`base` with both roles on the SLO policy between 1 and `max_replicas`, reporting each second."""
    auto = Autoscaling(
        policy="slo",
        min_replicas=1,
        max_replicas=max_replicas,
        upscale_delay_s=upscale_s,
        downscale_delay_s=downscale_s,
        metrics_interval_s=1,
        look_back_period_s=5,
    )
    data = base.model_dump()
    for role in ("prefill", "decode"):
        data[role].update(replicas=1, num_gpus=0, num_cpus=1, autoscaling=auto.model_dump())
    return ServingConfig.model_validate(data)


class Timeline:
    """Samples replicas and the policy's wishes once a second, in a thread, until stopped."""

    def __init__(self, base_url: str, t0: float):
        self.base_url, self.t0 = base_url, t0
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Timeline":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import httpx
        from ray import serve

        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per sample would bury the run's log
        while not self._stop.wait(1.0):
            sample: dict = {"t": time.monotonic() - self.t0}
            try:
                deployments = serve.status().applications[APP].deployments
                for name, role in ROLES.items():
                    sample[f"{role}_replicas"] = deployments[name].replica_states.get("RUNNING", 0)
                for line in httpx.get(f"{self.base_url}/metrics", timeout=5).text.splitlines():
                    if m := _DESIRED.match(line):
                        sample[f"{ROLES.get(m[1], m[1])}_desired"] = float(m[2])
            except Exception:  # a sample lost to a busy controller or replica is a gap in the plot, not a failure
                log.debug("timeline sample failed", exc_info=True)
            self.samples.append(sample)


async def _load(url: str, steps: list[Step], args: argparse.Namespace, t0: float) -> dict[str, int]:
    """Send each step's load at its time; the number of requests that failed, per step."""
    failures = {s.name: 0 for s in steps}

    async def one(session: aiohttp.ClientSession, step: Step, prompt: list[int], max_tokens: int) -> None:
        payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        result = await stream_completion(session, url, payload, {}, 600, len(prompt))
        if result.error is not None:
            failures[step.name] += 1
            log.info("%s step: a request failed: %s", step.name, result.error)

    async def client(session: aiohttp.ClientSession, step: Step, end: float, i: int) -> None:
        while time.monotonic() < end:  # back to back: a new request as soon as the last one ends
            await one(session, step, [1000 + i] * 32, args.decode_output_len)

    async def until(t: float) -> None:
        await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for step in steps:
            await until(step.start_s)
            end = t0 + step.end_s
            if step.name == "decode":
                await asyncio.gather(*(client(session, step, end, i) for i in range(args.decode_clients)))
            else:
                sent = []
                while time.monotonic() < end:
                    prompt = [2000 + len(sent)] + [7] * (args.prefill_prompt_len - 1)  # no shared prefix block
                    sent.append(asyncio.create_task(one(session, step, prompt, 1)))
                    await asyncio.sleep(1.0 / args.prefill_rate)
                await asyncio.gather(*sent)
    return failures


def _step_row(step: Step, samples: list[dict], role: str, upscale_s: float, downscale_s: float) -> dict:
    other = "prefill" if role == "decode" else "decode"
    during = [s for s in samples if step.start_s <= s["t"] <= step.end_s + downscale_s]
    peak = max((s.get(f"{role}_replicas", 0) for s in during), default=0)
    out_at = next((s["t"] for s in during if s.get(f"{role}_replicas", 0) > 1), None)
    after_out = [s for s in samples if out_at is not None and s["t"] > max(out_at, step.end_s)]
    in_at = next((s["t"] for s in after_out if s.get(f"{role}_replicas", 99) <= 1), None)
    scale_out = out_at - step.start_s if out_at is not None else None
    scale_in = in_at - step.end_s if in_at is not None else None
    return {
        "step": step.name,
        f"peak_{role}_replicas": peak,
        f"peak_{other}_replicas": max((s.get(f"{other}_replicas", 0) for s in during), default=0),
        "scale_out_s": scale_out,
        "scale_out_over_upscale_delay": scale_out / upscale_s if scale_out is not None and upscale_s else None,
        "scale_in_s": scale_in,
        "scale_in_over_downscale_delay": scale_in / downscale_s if scale_in is not None and downscale_s else None,
    }


def plot_timeline(samples: list[dict], steps: list[Step], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, wish) = plt.subplots(2, 1, figsize=(11, 6), sharex=True, height_ratios=[2, 1])
    for i, step in enumerate(steps):
        for a in (ax, wish):
            a.axvspan(step.start_s, step.end_s, color=f"C{i + 2}", alpha=0.12, label=f"{step.name}-heavy load")
    for j, role in enumerate(("decode", "prefill")):
        have = [s for s in samples if f"{role}_replicas" in s]
        ax.step([s["t"] for s in have], [s[f"{role}_replicas"] for s in have], where="post", color=f"C{j}",
                linewidth=2, label=f"{role} replicas (running)")  # fmt: skip
        wished = [s for s in samples if f"{role}_desired" in s]
        wish.step([s["t"] for s in wished], [max(s[f"{role}_desired"], 0.5) for s in wished], where="post",
                  color=f"C{j}", linewidth=1, label=role)  # fmt: skip
    ax.set_ylabel("replicas running")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("glmserve SLO autoscaling: decode and prefill scale apart")
    wish.set_yscale("log")
    wish.set_ylabel("policy's wish\n(before min/max)")
    wish.set_xlabel("seconds")
    wish.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_bench_autoscale(args: argparse.Namespace) -> list[dict]:
    import ray
    from ray import serve

    from glmserve.cluster.app import build_app, ray_init_kwargs

    base = ServingConfig.from_yaml(args.config) if args.config else ServingConfig()
    engine = base.engine.model_copy(
        update={"max_num_seqs": args.max_num_seqs, "kv_cache_memory_bytes": args.kv_cache_memory_bytes}
    )
    base = base.model_copy(update={"port": args.port, "engine": engine, "slo_ttft_ms": args.slo_ttft_ms})
    config = autoscaled(base, args.max_replicas, args.upscale_delay_s, args.downscale_delay_s)
    pause = args.downscale_delay_s + args.pause_s
    steps = [Step("decode", 5, 5 + args.step_s)]
    steps.append(Step("prefill", steps[0].end_s + pause, steps[0].end_s + pause + args.step_s))
    base_url = f"http://127.0.0.1:{args.port}"
    init = ray_init_kwargs()
    if "address" not in init:  # logical CPUs for every replica the policy may ask for (they share the real cores)
        init["num_cpus"] = max(os.cpu_count() or 1, 2 * args.max_replicas)
    ray.init(**init)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app(config), name=APP, route_prefix="/")
        t0 = time.monotonic()
        with Timeline(base_url, t0) as timeline:
            failures = asyncio.run(_load(f"{base_url}/v1/completions", steps, args, t0))
            time.sleep(max(0.0, t0 + steps[-1].end_s + pause - time.monotonic()))
        samples = timeline.samples
    finally:
        serve.shutdown()
        ray.shutdown()
    rows = [
        _step_row(step, samples, step.name, args.upscale_delay_s, args.downscale_delay_s) | {
            "failed_requests": failures[step.name]
        }
        for step in steps
    ]  # fmt: skip
    _print(rows)
    png = plot_timeline(samples, steps, Path(args.plot))
    log.info("timeline plot: %s", png)
    if args.output_json:
        extra = {
            "config": {k: getattr(args, k) for k in vars(args) if k != "func"},
            "steps": [vars(s) for s in steps],
            "timeline": samples,
            "plot": str(png),
        }
        write_report(args.output_json, rows, extra)
    return rows


def _print(rows: list[dict]) -> None:
    table = Table(title="autoscaling: each role apart (scale-out / scale-in times against Serve's delays)")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    for key in keys:
        table.add_column(key.replace("_", " "), justify="right")
    for row in rows:
        cells = [row.get(k) for k in keys]
        table.add_row(*("-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in cells))
    Console(width=180).print(table)


def add_bench_autoscale_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="ServingConfig YAML (engine, SLOs); autoscaling is set here")
    parser.add_argument("--port", type=int, default=8126)
    parser.add_argument("--max-replicas", type=int, default=2, help="per role")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="per decode replica: what the decode step fills")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30, help="per replica")
    parser.add_argument("--upscale-delay-s", type=float, default=5)
    parser.add_argument("--downscale-delay-s", type=float, default=20)
    parser.add_argument("--step-s", type=float, default=60, help="length of each load step")
    parser.add_argument("--pause-s", type=float, default=20, help="idle after each step, beyond the downscale delay")
    parser.add_argument("--decode-clients", type=int, default=24)
    parser.add_argument("--decode-output-len", type=int, default=256)
    parser.add_argument("--prefill-rate", type=float, default=1.5, help="requests/s of the prefill step")
    parser.add_argument("--prefill-prompt-len", type=int, default=2000)
    parser.add_argument("--slo-ttft", dest="slo_ttft_ms", type=float, default=500)
    parser.add_argument("--plot", default="bench_autoscale.png")
    parser.add_argument("--output-json", default="bench_autoscale.json")

"""`glmserve bench scheduler`: the CPU cost of one scheduling step, by context length.

Decoding sequences are stepped through `Scheduler.schedule()` plus the per-step bookkeeping the engine does
(append a token, publish full blocks); no model runs. The cost must not grow with context: the same batch at 1K and
at 32K tokens of context should cost the same.
"""

import gc
import logging
import time

import numpy as np

from glmserve.bench.report import write_report
from glmserve.engine.block_manager import BlockManager
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.scheduler import Scheduler
from glmserve.engine.sequence import Sequence

log = logging.getLogger(__name__)
BUDGET_MS = 2.0


def time_steps(num_seqs: int, context: int, steps: int, block_size: int = 64) -> np.ndarray:
    """Seconds per step for `num_seqs` sequences decoding at `context` tokens each (all blocks resident)."""
    blocks_per_seq = -(-(context + steps + 1) // block_size)
    manager = BlockManager(num_seqs * blocks_per_seq, block_size, enable_prefix_caching=True)
    scheduler = Scheduler(manager, max_num_seqs=num_seqs, max_num_batched_tokens=max(num_seqs, 2048))
    params = SamplingParams(max_tokens=steps + 1)
    rng = np.random.default_rng(0)
    for i in range(num_seqs):
        prompt = rng.integers(0, 8000, context).tolist()
        scheduler.add(Sequence(str(i), prompt, params, arrival=i))
    # Admit everyone and pretend the prefill ran: afterwards every step is one decode token per sequence.
    while scheduler.waiting or any(s.num_computed_tokens < s.num_tokens for s in scheduler.running):
        for seq, _ in scheduler.schedule().scheduled:
            scheduler.publish_full_blocks(seq)
    gc.collect()  # setup garbage would otherwise land a one-off collection pause in the first timed step
    times = np.empty(steps)
    for step in range(steps):
        t0 = time.perf_counter()
        for seq in scheduler.running:
            seq.token_ids.append(step)  # the token sampled last step
        plan = scheduler.schedule()
        for seq, _ in plan.scheduled:
            scheduler.publish_full_blocks(seq)
        times[step] = time.perf_counter() - t0
        assert len(plan.scheduled) == num_seqs and not plan.preempted
    return times


def run_bench_scheduler(
    num_seqs: int = 256, contexts: tuple[int, ...] = (1024, 32768), steps: int = 200, output_json: str | None = None
) -> dict:
    rows = []
    for ctx in contexts:
        t = time_steps(num_seqs, ctx, steps) * 1e3
        rows.append(
            {
                "context": ctx,
                "num_seqs": num_seqs,
                "mean_ms": float(t.mean()),
                "p50_ms": float(np.percentile(t, 50)),
                "p99_ms": float(np.percentile(t, 99)),
            }
        )
    base = rows[0]["p50_ms"]
    for r in rows:
        r["vs_budget"] = r["p50_ms"] / BUDGET_MS
        r["vs_shortest_context"] = r["p50_ms"] / base
    result = {"benchmark": "scheduler", "budget_ms": BUDGET_MS, "steps": steps, "rows": rows}
    print(f"scheduler step cost, {num_seqs} decoding sequences ({steps} steps; budget {BUDGET_MS} ms)")
    print(f"{'context':>8} {'mean ms':>9} {'p50 ms':>8} {'p99 ms':>8} {'p50/budget':>11} {'p50/1st ctx':>12}")
    for r in rows:
        print(
            f"{r['context']:>8} {r['mean_ms']:>9.3f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
            f"{r['vs_budget']:>11.2f} {r['vs_shortest_context']:>12.2f}"
        )
    if output_json:
        write_report(output_json, rows, {"budget_ms": BUDGET_MS, "steps": steps})
    return result

"""`glmserve bench mtp`: MTP speculative decoding on held-out code — acceptance and speed, each against the same
engine without speculation in the same run.

Prompts are held-out standard-library function headers with their docstrings (the files the embedded model never
trained on); completions are greedy, so every variant emits the same tokens and only the time differs.
"""

import logging
import time

from glmserve.bench.report import write_report
from glmserve.engine.llm import LLM
from glmserve.engine.sampling_params import SamplingParams
from glmserve.train.eval_tiny import function_prompts
from glmserve.train.train_tokenizer import corpus_files, stdlib_root

log = logging.getLogger(__name__)
KV_BUDGET = 1 << 30
# Adaptive K meets the graphs of its small batch sizes over several passes (the tail of a pass, where requests
# finish, differs from pass to pass); four passes were not enough on the H200 (docs/bench/notes.md).
_MAX_WARMUPS = 12


def _num_graphs(llm: LLM) -> int:
    engine = llm.engine
    spec_graphs = engine.spec.graphs if engine.spec is not None else None
    return sum(len(g.graphs) for g in (engine.runner.graphs, spec_graphs) if g is not None)


def _run(llm: LLM, prompts: list[str], max_tokens: int) -> tuple[float, float, list]:
    """Returns (seconds, mean time per output token after each request's first, finished outputs in order)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    first: dict[str, float] = {}
    tpots, finished = [], {}
    t0 = time.perf_counter()
    for out in llm.generate_stream(prompts, params):
        now = time.perf_counter()
        first.setdefault(out.request_id, now)
        if out.finished:
            finished[out.request_id] = out
            tpots.append((now - first[out.request_id]) / max(1, len(out.outputs[0].token_ids) - 1))
    seconds = time.perf_counter() - t0
    outs = sorted(finished.values(), key=lambda o: int(o.request_id))
    return seconds, sum(tpots) / len(tpots), outs


def run_bench_mtp(
    model: str | None = None,
    device: str = "auto",
    num_prompts: int = 16,
    max_tokens: int = 64,
    batch_sizes: tuple[int, ...] = (1, 16),
    ks: tuple[int, ...] = (1, 2, 3, 4),
    output_json: str | None = None,
) -> dict:
    root = stdlib_root()
    prompts = [p.prompt for p in function_prompts(root, corpus_files(root, heldout=True), num_prompts)]
    rows = []
    # Several engines live in this process: each gets a fixed KV budget instead of a share of the GPU. No prefix
    # cache, so the timed run schedules exactly as its warm-up did (and replays only graphs captured there).
    common = {"device": device, "kv_cache_memory_bytes": KV_BUDGET, "enable_prefix_caching": False}
    for batch in batch_sizes:
        engines = {"off": LLM(model, max_num_seqs=batch, **common)}
        for k in ks:
            engines[f"K={k}"] = LLM(
                model, max_num_seqs=batch, num_speculative_tokens=k, adaptive_speculation=False, **common
            )
        engines[f"K={max(ks)} adaptive"] = LLM(model, max_num_seqs=batch, num_speculative_tokens=max(ks), **common)
        engines[f"K={max(ks)} no index share"] = _without_index_share(model, batch, max(ks), common)
        baseline_tokens = None
        for name, llm in engines.items():
            # Warm-up on the same workload until a pass captures no new CUDA graph: with adaptive K the step shapes
            # (drafts verified, drafts made) vary from run to run, so one pass may not meet them all.
            for _ in range(_MAX_WARMUPS):
                captured = _num_graphs(llm)
                _run(llm, prompts, max_tokens)
                if _num_graphs(llm) == captured:
                    break
            seconds, tpot, outs = _run(llm, prompts, max_tokens)
            token_ids = [o.outputs[0].token_ids for o in outs]
            tokens = sum(len(t) for t in token_ids)
            if baseline_tokens is None:
                baseline_tokens, base_rate, base_tpot = token_ids, tokens / seconds, tpot
            spec = [o.outputs[0].spec for o in outs if o.outputs[0].spec is not None]
            steps = sum(s.num_steps for s in spec)
            accepted = sum(s.num_accepted_tokens for s in spec)
            drafted = sum(s.num_draft_tokens for s in spec)
            policy = llm.engine.spec.policy
            rows.append(
                {
                    "batch": batch,
                    "variant": name,
                    "tokens_per_s": tokens / seconds,
                    "speedup_vs_off": tokens / seconds / base_rate,
                    "tpot_ms": tpot * 1e3,
                    "decode_speedup_vs_off": base_tpot / tpot,
                    "mean_acceptance_length": (accepted + steps) / steps if steps else 1.0,
                    "acceptance_rate": accepted / drafted if drafted else None,
                    "acceptance_rate_per_position": [
                        a / d if d else None for a, d in zip(policy.accepted, policy.drafted, strict=True)
                    ],
                    "same_tokens_as_off": token_ids == baseline_tokens,
                    # what the speculation policy measured: step time per (batch bucket, K), acceptance per position
                    "policy_step_ms": {f"b{b} K={k}": t * 1e3 for (b, k), t in sorted(policy.step_time.items())},
                    "policy_acceptance": policy.accept,
                }
            )
    print(f"MTP speculative decoding on {num_prompts} held-out function headers, {max_tokens} greedy tokens each")
    print("tok/s: output tokens over the whole run (prefill included); TPOT: time per output token after the first")
    print(
        f"{'batch':>5} {'variant':<22} {'tok/s':>8} {'vs off':>7} {'TPOT ms':>8} {'vs off':>7} {'accept len':>10} "
        f"{'same out':>9}"
    )
    for r in rows:
        print(
            f"{r['batch']:>5} {r['variant']:<22} {r['tokens_per_s']:>8.1f} {r['speedup_vs_off']:>6.2f}x "
            f"{r['tpot_ms']:>8.3f} {r['decode_speedup_vs_off']:>6.2f}x {r['mean_acceptance_length']:>10.2f} "
            f"{r['same_tokens_as_off']!s:>9}"
        )
    result = {"benchmark": "mtp", "num_prompts": num_prompts, "max_tokens": max_tokens, "rows": rows}
    if output_json:
        write_report(output_json, rows, {"num_prompts": num_prompts, "max_tokens": max_tokens})
    return result


def _without_index_share(model: str | None, batch: int, k: int, common: dict) -> LLM:
    """The same engine with index_share_for_mtp_iteration off: every draft step runs the MTP indexer."""
    llm = LLM(model, max_num_seqs=batch, num_speculative_tokens=k, adaptive_speculation=False, **common)
    llm.engine.spec.drafter.share_topk = False
    return llm

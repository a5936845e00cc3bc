"""Kernel benchmark on one CUDA GPU: every figure next to its peer or the ceiling measured in the same run.

    python -m glmserve.bench.kernels --out bench_kernels.json

Ceilings: bf16 GEMM 8192^3 and a device copy. Cases: the DSA indexer at 128K keys against the transformers
formula in torch; top-k of 128K and 1M against torch.topk; sparse MLA prefill (GLM-5.2: 64 heads, 576/512, top-2048)
against dense causal attention (torch SDPA flash and cuDNN, 64 heads, qk 256, v 256) at 8K..512K; the decode kernel at
batch 1 and 64; MoE grouped GEMM against `torch._grouped_mm` and a per-expert loop. Estimates scaled from a measured
chunk say so in their note. Times are medians of CUDA-event timings with the L2 cache flushed before each run.
"""

import argparse
import gc
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from glmserve.bench.report import write_report
from glmserve.model.kernels import indexer, moe, paged_mla, topk, topk_split

log = logging.getLogger(__name__)

KV_BLOCK = 64
L2_FLUSH_BYTES = 256 << 20


@dataclass
class Row:
    """One line of the table: our time and rate, and the peer or ceiling it is measured against."""

    section: str
    case: str
    ms: float | None
    rate: float | None = None
    unit: str = ""
    peer: str = ""
    peer_ms: float | None = None
    peer_rate: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return self.peer_ms / self.ms if self.ms and self.peer_ms else None


class Timer:
    """Median CUDA-event time of `fn`, L2 flushed before each run, repeated within a time budget."""

    def __init__(self) -> None:
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def ms(self, fn: Callable[[], object], budget_ms: float = 200.0, max_iters: int = 30, graph: bool = False) -> float:
        run = fn
        fn()  # compile and warm up
        if graph:
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                fn()
            run = cuda_graph.replay
        first = self._timed(run, 1)[0]
        iters = int(min(max_iters, max(1, budget_ms / max(first, 1e-3))))
        return statistics.median(self._timed(run, iters))

    def _timed(self, run: Callable[[], object], iters: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends, strict=True):
            self.flush.zero_()
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]


def paged_pool(num_tokens_per_seq: list[int], width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A random pool [blocks, 64, width] and shuffled block tables [B, max_blocks] int32 covering the contexts."""
    needed = [triton.cdiv(n, KV_BLOCK) for n in num_tokens_per_seq]
    num_blocks = sum(needed)
    pool = torch.randn(num_blocks, KV_BLOCK, width, device="cuda", dtype=dtype)
    perm = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)
    tables = torch.zeros(len(needed), max(needed), dtype=torch.int32, device="cuda")
    used = 0
    for b, n in enumerate(needed):
        tables[b, :n] = perm[used : used + n]
        used += n
    return pool, tables


def _sorted_random_topk(num_queries: int, k: int, limit: int) -> torch.Tensor:
    """k random positions below `limit` per query, in position order (as the radix top-k writes them)."""
    return torch.randint(0, limit, (num_queries, k), device="cuda", dtype=torch.int32).sort(dim=-1).values


def _name(launch: paged_mla.MlaLaunch) -> str:
    return f"h{launch.block_h} n{launch.block_n} w{launch.num_warps} s{launch.num_stages}"


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _gemm_ms(timer: Timer, n: int) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return timer.ms(lambda: a @ b)


def _copy_ms(timer: Timer, num_bytes: int) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return timer.ms(lambda: dst.copy_(src))


def bench_ceilings(timer: Timer, rows: list[Row]) -> dict:
    n, num_bytes = 8192, 1 << 31
    gemm_ms = _gemm_ms(timer, n)
    gemm_tflops = 2 * n**3 / gemm_ms / 1e9
    rows.append(Row("ceiling", "bf16 GEMM 8192^3", gemm_ms, gemm_tflops, "TFLOP/s", note="torch.matmul"))
    copy_ms = _copy_ms(timer, num_bytes)
    copy_gbs = 2 * num_bytes / copy_ms / 1e6
    rows.append(Row("ceiling", "device copy 2 GiB", copy_ms, copy_gbs, "GB/s", note="read + write bytes"))
    return {"gemm_tflops": gemm_tflops, "copy_gbs": copy_gbs}


def _indexer_naive_fp32(q, weights, keys, query_pos):
    """The transformers formula: fp32 matmul, relu, head-weighted matmul, causal mask ([S, H, T] in memory)."""
    scores = F.relu(torch.matmul(q.float(), keys.float().T))  # [S, H, T]
    logits = torch.matmul(weights.unsqueeze(1), scores).squeeze(1)
    causal = torch.arange(keys.shape[0], device="cuda")[None, :] <= query_pos[:, None]
    return logits.masked_fill(~causal, float("-inf"))


def _indexer_torch_bf16(q, weights, keys, query_pos):
    """The same in bf16 tensor-core matmuls, relu in place: the best plain torch does without a fused kernel."""
    scores = torch.matmul(q, keys.T).relu_()  # [S, H, T] bf16
    logits = torch.matmul(weights.to(q.dtype).unsqueeze(1), scores).squeeze(1).float()
    causal = torch.arange(keys.shape[0], device="cuda")[None, :] <= query_pos[:, None]
    return logits.masked_fill(~causal, float("-inf"))


INDEXER_CONFIGS = [(128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 8, 3), (64, 64, 4, 3)]


def bench_indexer(timer: Timer, rows: list[Row], ceilings: dict, context: int = 131072, num_queries: int = 1024):
    heads, dim, k = 32, 128, 2048
    keys, tables = paged_pool([context], dim, torch.bfloat16)
    q = torch.randn(num_queries, heads, dim, device="cuda", dtype=torch.bfloat16)
    weights = torch.randn(num_queries, heads, device="cuda") * (heads * dim) ** -0.5
    query_seq = torch.zeros(num_queries, dtype=torch.int32, device="cuda")
    query_pos = torch.arange(context - num_queries, context, dtype=torch.int32, device="cuda")
    pairs = num_queries * context - num_queries * (num_queries - 1) // 2
    flops = 2 * heads * dim * pairs
    args = (q, weights, keys, tables, query_seq, query_pos, context)
    contiguous_keys = keys[tables[0].long()].reshape(-1, dim)  # the peer gets its keys contiguous, for free

    naive_ms = timer.ms(lambda: _indexer_naive_fp32(q, weights, contiguous_keys, query_pos), budget_ms=400)
    bf16_ms = timer.ms(lambda: _indexer_torch_bf16(q, weights, contiguous_keys, query_pos), budget_ms=400)
    reference = _indexer_naive_fp32(q, weights, contiguous_keys, query_pos)
    finite = torch.isfinite(reference)
    best = None
    for block_s, block_t, warps, stages in INDEXER_CONFIGS:
        launch = dict(block_s=block_s, block_t=block_t, num_warps=warps, num_stages=stages)
        case = f"bf16 S={num_queries} T=128K H=32 D=128 tile {block_s}x{block_t} w{warps} s{stages}"
        try:
            ms = timer.ms(lambda launch=launch: indexer.indexer_logits_triton(*args, **launch))
        except Exception as exc:  # a tile that does not fit shared memory is a result, not a crash
            rows.append(Row("indexer", case, None, note=f"failed: {str(exc)[:120]}"))
            continue
        out = indexer.indexer_logits_triton(*args, **launch)
        err = _rel_err(out[finite], reference[finite])
        tflops = flops / ms / 1e9
        rows.append(Row(
            "indexer", case, ms, tflops, "TFLOP/s", "torch fp32 (transformers formula)", naive_ms,
            flops / naive_ms / 1e9, note=f"{100 * tflops / ceilings['gemm_tflops']:.1f}% of GEMM; rel err {err:.1e}",
        ))  # fmt: skip
        if best is None or ms < best[0]:
            best = (ms, launch)
    rows.append(Row("indexer", "torch bf16 matmuls (peer)", bf16_ms, flops / bf16_ms / 1e9, "TFLOP/s",
                    note=f"{100 * flops / bf16_ms / 1e9 / ceilings['gemm_tflops']:.1f}% of GEMM"))  # fmt: skip

    q8, q_scale = indexer.quantize_fp8_rows(q)
    k8, k_scale = indexer.quantize_fp8_rows(keys)
    fp8_args = (q8, q_scale, weights, k8, k_scale, tables, query_seq, query_pos, context)
    launch = best[1] if best else {}
    fp8_ms = timer.ms(lambda: indexer.indexer_logits_fp8_triton(*fp8_args, **launch))
    fp8_out = indexer.indexer_logits_fp8_triton(*fp8_args, **launch)
    fp8_err = _rel_err(fp8_out[finite], reference[finite])
    rows.append(Row(
        "indexer", "fp8 e4m3 (per-token k scale, per-(s,h) q scale)", fp8_ms, flops / fp8_ms / 1e9, "TFLOP/s",
        "our bf16 best", best[0] if best else None, note=f"rel err vs fp32 ref (incl. quantization) {fp8_err:.1e}",
    ))  # fmt: skip

    # Whole selection: logits + top-k, against the transformers formula + torch.topk.
    def ours():
        return topk.topk_causal_logits(indexer.indexer_logits_triton(*args, **launch), k)

    def naive():
        return _indexer_naive_fp32(q, weights, contiguous_keys, query_pos).topk(k, dim=-1).indices

    ours_ms = timer.ms(ours, budget_ms=400)
    naive_sel_ms = timer.ms(naive, budget_ms=400)
    rows.append(Row(
        "indexer", "select: logits + top-2048 (the prefill path's kernels)", ours_ms, flops / ours_ms / 1e9, "TFLOP/s",
        "fp32 formula + torch.topk", naive_sel_ms, flops / naive_sel_ms / 1e9,
    ))  # fmt: skip
    logits = indexer.indexer_logits_triton(*args, **launch)
    return {"logits": logits, "query_pos": query_pos}


TOPK_CONFIGS = [(4096, 8), (2048, 8), (1024, 4)]


def bench_topk(timer: Timer, rows: list[Row], indexer_out: dict | None, ceilings: dict) -> None:
    k = 2048
    cases = []
    if indexer_out is not None:
        cases.append(("2048 of 128K, 1024 indexer rows", indexer_out["logits"], indexer_out["query_pos"]))
    else:
        cases.append(("2048 of 128K, 1024 random rows", torch.randn(1024, 131072, device="cuda"), None))
    cases.append(("2048 of 1M, 128 random rows", torch.randn(128, 1 << 20, device="cuda"), None))
    for name, scores, query_pos in cases:
        if query_pos is None:
            query_pos = torch.full((scores.shape[0],), scores.shape[1] - 1, dtype=torch.int32, device="cuda")
        torch_ms = timer.ms(lambda scores=scores: scores.topk(k, dim=-1))
        expected = topk.topk_positions_reference(scores, query_pos, k)
        expected_values = scores.gather(1, expected.clamp_min(0).long()).sort(dim=-1).values
        for block, warps in TOPK_CONFIGS:
            launch = dict(block=block, num_warps=warps)
            ours_ms = timer.ms(
                lambda s=scores, p=query_pos, launch=launch: topk.topk_positions_triton(s, p, k, **launch)
            )
            got = topk.topk_positions_triton(scores, query_pos, k, **launch)
            same = torch.equal(scores.gather(1, got.clamp_min(0).long()).sort(dim=-1).values, expected_values)
            gbs = scores.numel() * 4 / ours_ms / 1e6
            rows.append(Row(
                "topk", f"{name} (block {block}, {warps} warps)", ours_ms, gbs, "GB/s (one read)", "torch.topk",
                torch_ms, scores.numel() * 4 / torch_ms / 1e6,
                note=f"same set as torch: {same}; copy ceiling {ceilings['copy_gbs']:.0f} GB/s",
            ))  # fmt: skip


def bench_topk_decode(timer: Timer, rows: list[Row]) -> None:
    """Decode rows (one query, 2048 of its causal keys; ReLU-weighted random scores, -inf past the query, as the
    per-query indexer kernel writes them): both radix layouts against the torch.topk path, graphed as decode runs."""
    k = 2048
    for width in (8192, 32768, 131072, 1 << 20):
        query_pos = torch.tensor([width - width // 8], dtype=torch.int32, device="cuda")  # inside its bucket
        scores = torch.randn(1, width, device="cuda").relu() * torch.randn(1, width, device="cuda")
        scores = scores.masked_fill(torch.arange(width, device="cuda")[None, :] > query_pos[:, None], float("-inf"))
        torch_ms = timer.ms(lambda s=scores: topk.topk_causal_logits(s, k), graph=True)
        expected = topk.topk_causal_logits(scores, k)
        expected_values = scores.gather(1, expected.long()).sort(dim=-1).values
        chosen = "torch.topk"  # what topk_causal_logits_few_rows runs on this row
        if width <= topk.SPLIT_MAX_WIDTH:
            chosen = "one program" if width <= topk.ONE_PROGRAM_MAX_WIDTH else "split"
        for name, fn in (("one program", topk.topk_positions_triton), ("split", topk_split.topk_positions_split)):
            ours_ms = timer.ms(lambda s=scores, p=query_pos, fn=fn: fn(s, p, k), graph=True)
            got = fn(scores, query_pos, k)
            same = torch.equal(scores.gather(1, got.long()).sort(dim=-1).values, expected_values)
            rows.append(Row(
                "topk decode", f"2048 of {width // 1024}K keys, 1 row: radix, {name}", ours_ms,
                peer="torch.topk path", peer_ms=torch_ms,
                note=f"same values as torch: {same}; the decode path takes " + ("this" if name == chosen else chosen),
            ))  # fmt: skip


MLA_PREFILL_CONFIGS = [
    paged_mla.MlaLaunch(64, 64, 8, 2),
    paged_mla.MlaLaunch(64, 32, 8, 2),
    paged_mla.MlaLaunch(64, 32, 8, 3),
    paged_mla.MlaLaunch(64, 64, 16, 2),
    paged_mla.MlaLaunch(32, 64, 4, 2),
]


# torch's flash backend is FlashAttention-2 (no Hopper wgmma); cuDNN's has Hopper kernels: the peer is the faster.
DENSE_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def dense_sdpa_ms(timer: Timer, context: int, query_chunk: int | None) -> dict[str, float]:
    """Dense attention with MLA's head shapes (64 heads, qk 256, v 256) per SDPA backend: the whole causal prompt,
    or the last `query_chunk` queries against every key."""
    heads, dim = 64, 256
    q_len = query_chunk or context
    q = torch.randn(1, heads, q_len, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, heads, context, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, heads, context, dim, device="cuda", dtype=torch.bfloat16)
    times = {}
    for name, backend in DENSE_BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                times[name] = timer.ms(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=query_chunk is None), budget_ms=500
                )
        except RuntimeError as exc:
            log.warning("SDPA backend %s unavailable here: %s", name, exc)
    return times


def bench_mla_prefill(timer: Timer, rows: list[Row], contexts: list[int], num_queries: int = 2048) -> None:
    heads, value_dim, rope_dim, k = 64, 512, 64, 2048
    width = value_dim + rope_dim
    flops_per_query = k * heads * (width + value_dim) * 2
    best_launch = None
    for context in contexts:
        latent, tables = paged_pool([context], width, torch.bfloat16)
        q = torch.randn(num_queries, heads, width, device="cuda", dtype=torch.bfloat16)
        query_seq = torch.zeros(num_queries, dtype=torch.int32, device="cuda")
        query_pos = torch.arange(context - num_queries, context, dtype=torch.int32, device="cuda")
        topk_idx = _sorted_random_topk(num_queries, k, context - num_queries)
        args = (q, latent, tables, query_seq, query_pos, width**-0.5, value_dim, topk_idx)
        results = []
        for launch in MLA_PREFILL_CONFIGS if best_launch is None else [best_launch]:
            try:
                ms = timer.ms(lambda args=args, launch=launch: paged_mla.mla_prefill_triton(*args, launch=launch))
                results.append((ms, launch))
            except Exception as exc:
                failed = f"failed: {exc!s:.120}"
                rows.append(Row("mla_prefill", f"{context // 1024}K {_name(launch)}", None, note=failed))
        if not results:
            continue
        if best_launch is None:
            for ms, launch in results:
                rows.append(Row("mla_prefill", f"tune at {context // 1024}K: {_name(launch)}", ms,
                                flops_per_query * num_queries / ms / 1e9, "TFLOP/s"))  # fmt: skip
        ms, best_launch = min(results, key=lambda r: r[0])
        o, _ = paged_mla.mla_prefill_triton(*args, launch=best_launch)
        check = slice(0, 8)
        o_ref, _ = paged_mla.mla_attention_reference(
            q[check], latent, tables, query_seq[check], query_pos[check], width**-0.5, value_dim, topk_idx[check]
        )
        err = _rel_err(o[check], o_ref)
        sparse_full_ms = ms * context / num_queries
        del latent, q, topk_idx
        torch.cuda.empty_cache()

        if context <= 131072:
            dense = dense_sdpa_ms(timer, context, None)
            dense_note = "measured"
        else:
            chunk = 1024
            chunk_times = dense_sdpa_ms(timer, context, chunk)
            n_chunks = context // chunk
            dense = {name: t * (n_chunks + 1) / 2 for name, t in chunk_times.items()}  # chunk i of n sees i/n keys
            dense_note = f"scaled from the last {chunk}-query chunk x (n+1)/2"
        torch.cuda.empty_cache()
        backend, dense_ms = min(dense.items(), key=lambda item: item[1])
        dense_note += ", " + ", ".join(f"{name} {t:.1f} ms" for name, t in dense.items())
        dense_flops = 64 * (context * (context + 1) / 2) * (256 + 256) * 2
        rows.append(Row(
            "mla_prefill", f"{context // 1024}K prompt, sparse top-2048 vs dense causal", sparse_full_ms,
            flops_per_query * context / sparse_full_ms / 1e9, "TFLOP/s", f"SDPA {backend} dense (64h, 256/256)",
            dense_ms, dense_flops / dense_ms / 1e9,
            note=f"sparse: {num_queries} queries measured ({ms:.2f} ms) x T/{num_queries}, an upper bound; "
            f"dense {dense_note}; rel err {err:.1e}",
            extra={"chunk_ms": ms, "launch": asdict(best_launch), "dense_ms": dense},
        ))  # fmt: skip


def bench_mla_decode(timer: Timer, rows: list[Row], ceilings: dict, context: int = 131072) -> None:
    heads, value_dim, rope_dim, k = 64, 512, 64, 2048
    width = value_dim + rope_dim
    cases = [("batch 1", 1, 1, k), ("batch 64", 64, 1, k), ("batch 64 x 4 MTP queries", 64, 4, k),
             ("dense, batch 64 at 2K", 64, 1, None)]  # fmt: skip
    for name, batch, per_seq, width_k in cases:
        ctx = context if width_k else 2048
        latent, tables = paged_pool([ctx] * batch, width, torch.bfloat16)
        num_queries = batch * per_seq
        q = torch.randn(num_queries, heads, width, device="cuda", dtype=torch.bfloat16)
        query_seq = torch.arange(batch, dtype=torch.int32, device="cuda").repeat_interleave(per_seq)
        query_pos = (ctx - per_seq + torch.arange(per_seq, dtype=torch.int32, device="cuda")).repeat(batch)
        topk_idx = _sorted_random_topk(num_queries, k, ctx - per_seq) if width_k else None
        args = (q, latent, tables, query_seq, query_pos, width**-0.5, value_dim, topk_idx)
        decode_ms = timer.ms(lambda args=args: paged_mla.mla_decode_triton(*args), graph=True)
        wide = paged_mla.MlaLaunch(64, 64, 8, 2)
        wide_ms = timer.ms(lambda args=args, wide=wide: paged_mla.mla_decode_triton(*args, launch=wide), graph=True)
        prefill_ms = timer.ms(lambda args=args: paged_mla.mla_prefill_triton(*args), graph=True)
        o, _ = paged_mla.mla_decode_triton(*args)
        o_ref, _ = paged_mla.mla_attention_reference(*args)
        keys_read = num_queries * (width_k or ctx)
        gbs = keys_read * width * 2 / decode_ms / 1e6
        ceiling_pct = 100 * gbs / ceilings["copy_gbs"]
        rows.append(Row(
            "mla_decode", f"{name} (ctx {ctx // 1024}K)", decode_ms, gbs, "GB/s gathered", "our prefill kernel",
            prefill_ms, keys_read * width * 2 / prefill_ms / 1e6,
            note=f"{ceiling_pct:.0f}% of copy ceiling; CUDA graph; rel err {_rel_err(o, o_ref):.1e}",
            extra={"decode_launch": asdict(paged_mla.DECODE_LAUNCH), f"ms_{_name(wide)}": wide_ms},
        ))  # fmt: skip
        del latent
        torch.cuda.empty_cache()


def bench_moe(timer: Timer, rows: list[Row], ceilings: dict) -> None:
    hidden, inter, experts, k = 6144, 2048, 256, 8
    w_gate_up = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * hidden**-0.5
    w_down = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) * inter**-0.5
    for tokens in (64, 4096):
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        topk_ids = torch.rand(tokens, experts, device="cuda").topk(k, dim=-1).indices
        topk_weights = torch.rand(tokens, k, device="cuda")
        args = (x, topk_ids, topk_weights, w_gate_up, w_down)
        flops = tokens * k * 6 * hidden * inter
        touched = int(torch.unique(topk_ids).numel())
        weight_bytes = touched * 3 * hidden * inter * 2
        loop_ms = timer.ms(lambda args=args: moe.moe_experts_reference(*args), budget_ms=300, max_iters=10)
        reference = moe.moe_experts_reference(*args)
        paths = [("triton grouped GEMM", moe.moe_experts_triton)]
        if moe.has_grouped_mm():
            paths.append(("torch._grouped_mm", moe.moe_experts_grouped_mm))
        for name, fn in paths:
            try:
                ms = timer.ms(lambda fn=fn, args=args: fn(*args))
                err = _rel_err(fn(*args), reference)
            except Exception as exc:
                rows.append(Row("moe", f"{name}, {tokens} tokens", None, note=f"failed: {str(exc)[:120]}"))
                continue
            weight_gbs = weight_bytes / ms / 1e6
            rows.append(Row(
                "moe", f"{name}, {tokens} tokens (E256 top8, 6144/2048)", ms, flops / ms / 1e9, "TFLOP/s",
                "per-expert loop", loop_ms, flops / loop_ms / 1e9,
                note=f"weights {weight_gbs:.0f} GB/s ({100 * weight_gbs / ceilings['copy_gbs']:.0f}% of copy); "
                f"{100 * flops / ms / 1e9 / ceilings['gemm_tflops']:.0f}% of GEMM; rel err {err:.1e}",
            ))  # fmt: skip


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


def render_table(rows: list[Row]) -> str:
    """A plain-text table (rich draws it when present)."""
    header = ["section", "case", "ms", "rate", "peer", "peer ms", "peer rate", "speedup", "note"]
    lines = [
        [r.section, r.case, _fmt(r.ms), f"{_fmt(r.rate)} {r.unit}".strip(), r.peer, _fmt(r.peer_ms),
         _fmt(r.peer_rate), f"{r.speedup:.2f}x" if r.speedup else "-", r.note]
        for r in rows
    ]  # fmt: skip
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(*header, title="glmserve kernels", show_lines=False)
        for line in lines:
            table.add_row(*line)
        console = Console(width=250, record=True)
        console.print(table)
        return console.export_text()
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
        text = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) for line in [header, *lines]]
        print("\n".join(text))  # the table is the command's output
        return "\n".join(text)


class BenchReport:
    """A benchmark's JSON report (bench/report.py: the rows, and as its `extra` the section results, errors, section
    times), rewritten after each section so that a crash keeps what was measured before it."""

    def __init__(self, out_json: str | Path):
        self.path = Path(out_json)
        self.rows: list[Row] = []
        self.data: dict = {"errors": {}}

    def write(self) -> None:
        write_report(self.path, [asdict(r) | {"speedup": r.speedup} for r in self.rows], self.data)

    def run_sections(self, sections: list[tuple[str, Callable[[], object]]]) -> None:
        """Run each section; what one returns (if not None) is kept under its name, and one that fails is recorded
        and skipped."""
        for name, section in sections:
            started = time.perf_counter()
            log.info("bench %s ...", name)
            try:
                result = section()
                if result is not None:
                    self.data[name] = result
            except Exception as exc:  # keep the other sections' numbers
                log.exception("section %s failed", name)
                self.data["errors"][name] = repr(exc)[:1000]
            gc.collect()
            torch.cuda.empty_cache()
            self.data.setdefault("section_seconds", {})[name] = round(time.perf_counter() - started, 1)
            self.write()

    def finish(self) -> dict:
        """Print the table and write the final report."""
        self.data["table"] = render_table(self.rows)
        self.write()
        return self.data


SECTIONS = ("indexer", "topk", "topk_decode", "mla_prefill", "mla_decode", "moe")


def run_kernel_bench(
    out_json: str | Path, mla_contexts: list[int] | None = None, sections: list[str] | None = None
) -> dict:
    """Run the sections (all by default; a failing one is recorded and skipped), print the table, write JSON to
    `out_json`. The top-k section selects from the indexer section's logits where that ran."""
    assert torch.cuda.is_available(), "the kernel benchmark needs a CUDA device"
    mla_contexts = mla_contexts or [8192, 32768, 131072, 524288]
    torch.manual_seed(0)
    timer = Timer()
    report = BenchReport(out_json)
    rows = report.rows
    ceilings = report.data["ceilings"] = bench_ceilings(timer, rows)
    indexer_out: dict = {}  # the indexer section's logits (512 MiB): the top-k section selects from them, then drops
    chosen = set(sections or SECTIONS)
    if chosen - set(SECTIONS):
        raise ValueError(f"unknown sections {sorted(chosen - set(SECTIONS))}; choose from {SECTIONS}")
    report.run_sections([(name, section) for name, section in [
        ("indexer", lambda: indexer_out.update(result=bench_indexer(timer, rows, ceilings))),
        ("topk", lambda: bench_topk(timer, rows, indexer_out.pop("result", None), ceilings)),
        ("topk_decode", lambda: bench_topk_decode(timer, rows)),
        ("mla_prefill", lambda: bench_mla_prefill(timer, rows, mla_contexts)),
        ("mla_decode", lambda: bench_mla_decode(timer, rows, ceilings)),
        ("moe", lambda: bench_moe(timer, rows, ceilings)),
    ] if name in chosen])  # fmt: skip
    return report.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_kernels.json", help="where to write the JSON report")
    parser.add_argument("--mla-contexts", type=int, nargs="*", help="prompt lengths for the MLA prefill section")
    parser.add_argument("--sections", nargs="*", choices=SECTIONS, help="run only these sections (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run_kernel_bench(args.out, args.mla_contexts, args.sections)


if __name__ == "__main__":
    main()

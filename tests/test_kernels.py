"""DSA / MLA / MoE kernels against their plain-torch references.

Without CUDA the Triton kernels run in the interpreter (fp32 / fp16 only: it computes bf16 dots wrongly); the
bf16 and fp8 checks run on the GPU (`-m gpu`). Every check draws fresh random inputs: paged caches with shuffled
block tables, several sequences of different lengths, positions on block boundaries, -1 padded top-k rows.
"""

import pytest
import torch

from glmserve.model.fp8 import quantize_fp8_blockwise
from glmserve.model.kernels import (
    activation,
    indexer,
    kv_write,
    moe,
    paged_mla,
    rms_norm,
    rope,
    router,
    topk,
    topk_split,
)
from glmserve.model.kernels.paged import gather_rows, query_tiles

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
BLOCK = 64
BOUNDARY_POSITIONS = [0, 1, 63, 64, 65, 127, 128, 129]
SMALL_MLA = paged_mla.MlaLaunch(block_h=16, block_n=16, num_warps=4, num_stages=1)


def make_block_tables(context_lens: list[int], spare_blocks: int = 3) -> tuple[torch.Tensor, int]:
    """Block tables [B, max_blocks] int32 over a shuffled pool (-1 padded); returns them and the pool size."""
    needed = [(n + BLOCK - 1) // BLOCK for n in context_lens]
    num_blocks = sum(needed) + spare_blocks
    perm = torch.randperm(num_blocks)
    tables = torch.full((len(context_lens), max(needed)), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(needed):
        tables[b, :n] = perm[used : used + n].to(torch.int32)
        used += n
    return tables.to(DEVICE), num_blocks


def make_queries(positions_per_seq: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (query_seq, query_pos) int32, queries of one sequence contiguous."""
    seq = [b for b, positions in enumerate(positions_per_seq) for _ in positions]
    pos = [p for positions in positions_per_seq for p in positions]
    return torch.tensor(seq, dtype=torch.int32, device=DEVICE), torch.tensor(pos, dtype=torch.int32, device=DEVICE)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def assert_logits_close(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    assert out.shape == ref.shape
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), "the causal -inf pattern differs"
    finite = torch.isfinite(ref)
    assert relative_error(out[finite], ref[finite]) < rtol


# ----------------------------------------------------------------------------------------------- helpers


def test_query_tiles_split_sequences_and_long_runs():
    query_seq = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2, 2], dtype=torch.int32)
    start, end = query_tiles(query_seq, 2)
    assert start.tolist() == [0, 2, 4, 5, 6, 8]
    assert end.tolist() == [2, 4, 5, 6, 8, 9]


def test_gather_rows_follows_block_table():
    pool = torch.randn(5, BLOCK, 3)
    table = torch.tensor([3, 0, 4], dtype=torch.int32)
    positions = torch.tensor([0, 63, 64, 130])
    rows = gather_rows(pool, table, positions)
    expected = torch.stack([pool[3, 0], pool[3, 63], pool[0, 0], pool[4, 2]])
    assert torch.equal(rows, expected)


# ----------------------------------------------------------------------------------------------- indexer


def indexer_case(dtype: torch.dtype, heads: int, dim: int, context_lens: list[int], positions: list[list[int]]):
    tables, num_blocks = make_block_tables(context_lens)
    query_seq, query_pos = make_queries(positions)
    q = torch.randn(query_seq.numel(), heads, dim, device=DEVICE).to(dtype)
    weights = torch.randn(query_seq.numel(), heads, device=DEVICE) * (heads * dim) ** -0.5
    keys = torch.randn(num_blocks, BLOCK, dim, device=DEVICE).to(dtype)
    return q, weights, keys, tables, query_seq, query_pos


def test_indexer_reference_matches_formula():
    q, weights, keys, tables, query_seq, query_pos = indexer_case(torch.float32, 3, 8, [70, 5], [[69, 2], [4]])
    out = indexer.indexer_logits_reference(q, weights, keys, tables, query_seq, query_pos)
    for s in range(q.shape[0]):
        b, pos = int(query_seq[s]), int(query_pos[s])
        for t in range(out.shape[1]):
            if t > pos:
                assert out[s, t] == float("-inf")
                continue
            k = keys[tables[b, t // BLOCK], t % BLOCK]
            expected = sum(float(weights[s, h]) * max(float(q[s, h] @ k), 0.0) for h in range(3))
            assert out[s, t].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_indexer_triton_interpreter(dtype):
    positions = [BOUNDARY_POSITIONS, [5, 6], [150 + i for i in range(20)]]
    case = indexer_case(dtype, 4, 32, [130, 7, 170], positions)
    out = indexer.indexer_logits_triton(*case, block_s=16, block_t=32, num_warps=4, num_stages=1)
    ref = indexer.indexer_logits_reference(*case)
    assert_logits_close(out, ref, rtol=1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_indexer_per_query_interpreter(dtype):
    """Decode-shaped steps: one or a few queries per sequence, any order, heads fewer than a tile."""
    positions = [[129], [5, 6], [0], [150, 63, 64]]
    case = indexer_case(dtype, 5, 32, [130, 7, 1, 170], positions)
    out = indexer.indexer_logits_per_query_triton(*case, max_context=200, block_t=32)
    ref = indexer.indexer_logits_reference(*case, max_context=200)
    assert_logits_close(out, ref, rtol=1e-5 if dtype == torch.float32 else 2e-3)


def test_indexer_explicit_tiles_match_computed_ones():
    positions = [list(range(40, 75)), [3]]
    case = indexer_case(torch.float32, 2, 16, [75, 4], positions)
    tiles = query_tiles(case[4], 16)
    out = indexer.indexer_logits_triton(*case, block_s=16, block_t=32, num_warps=4, num_stages=1, tiles=tiles)
    assert_logits_close(out, indexer.indexer_logits_reference(*case), rtol=1e-5)


def fp8_indexer_check(heads: int, dim: int, context_lens: list[int], positions: list[list[int]], **launch) -> None:
    """The fp8 kernel against the reference on the dequantized inputs (so only the kernel's error is measured)."""
    q, weights, keys, tables, query_seq, query_pos = indexer_case(torch.float32, heads, dim, context_lens, positions)
    q8, q_scale = indexer.quantize_fp8_rows(q)
    k8, k_scale = indexer.quantize_fp8_rows(keys)
    out = indexer.indexer_logits_fp8_triton(q8, q_scale, weights, k8, k_scale, tables, query_seq, query_pos, **launch)
    q_deq = q8.float() * q_scale[..., None]
    k_deq = k8.float() * k_scale[..., None]
    ref = indexer.indexer_logits_reference(q_deq, weights, k_deq, tables, query_seq, query_pos)
    # Hopper's fp8 tensor cores accumulate with fewer mantissa bits than fp32.
    assert_logits_close(out, ref, rtol=2e-3)


def test_indexer_fp8_interpreter():
    fp8_indexer_check(4, 32, [130, 7], [BOUNDARY_POSITIONS, [5]], block_s=16, block_t=32, num_warps=4, num_stages=1)


# ----------------------------------------------------------------------------------------------- top-k


def assert_same_selection(got: torch.Tensor, scores: torch.Tensor, query_pos: torch.Tensor, k: int) -> None:
    """Same count of valid picks and the same multiset of picked values as torch.topk (ties may differ)."""
    ref = topk.topk_positions_reference(scores, query_pos, k)
    assert got.shape == ref.shape and got.dtype == torch.int32
    for s in range(scores.shape[0]):
        picked, expected = got[s][got[s] >= 0].long(), ref[s][ref[s] >= 0].long()
        assert picked.numel() == expected.numel() == min(k, int(query_pos[s]) + 1)
        assert (got[s][picked.numel() :] == -1).all(), "padding must follow the picks"
        assert picked.unique().numel() == picked.numel() and int(picked.max()) <= int(query_pos[s])
        assert torch.equal(scores[s, picked].sort().values, scores[s, expected].sort().values)


def test_topk_interpreter_distinct_scores():
    k, cols = 64, 700
    query_pos = torch.tensor([0, 10, 63, 64, 65, 300, 699, 699], dtype=torch.int32, device=DEVICE)
    scores = torch.randn(query_pos.numel(), cols, device=DEVICE)
    scores[-1] = -scores[-1].abs() - 1.0  # all negative: exercises the sign byte
    got = topk.topk_positions_triton(scores, query_pos, k, block=128, num_warps=4)
    assert_same_selection(got, scores, query_pos, k)
    # Distinct scores: the positions themselves must match torch.topk.
    ref = topk.topk_positions_reference(scores, query_pos, k)
    assert torch.equal(got.sort(dim=-1).values, ref.sort(dim=-1).values)


def test_topk_interpreter_ties():
    k, cols = 32, 400
    query_pos = torch.tensor([399, 250, 40], dtype=torch.int32, device=DEVICE)
    scores = torch.randint(-4, 5, (3, cols), device=DEVICE).float() * 0.5  # many equal values
    got = topk.topk_positions_triton(scores, query_pos, k, block=64, num_warps=4)
    assert_same_selection(got, scores, query_pos, k)


@pytest.mark.parametrize("ties", [False, True])
def test_topk_split_matches_one_program_radix_interpreter(ties):
    """Rows cut into chunks select exactly what one program per row selects, in the same slots: short rows (all
    keys, -1 padding), a threshold inside a chunk and across chunk boundaries, negative rows, many equal keys."""
    k, cols = 64, 3000
    query_pos = torch.tensor([0, 63, 64, 65, 511, 512, 1800, 2999, 2999], dtype=torch.int32, device=DEVICE)
    if ties:
        scores = torch.randint(-4, 5, (query_pos.numel(), cols), device=DEVICE).float() * 0.5
        scores[0, :3] = -0.0
    else:
        scores = torch.randn(query_pos.numel(), cols, device=DEVICE)
        scores[-1] = -scores[-1].abs() - 1.0
    got = topk_split.topk_positions_split(scores, query_pos, k, chunk=512)
    assert torch.equal(got, topk.topk_positions_triton(scores, query_pos, k, block=512, num_warps=4))
    assert_same_selection(got, scores, query_pos, k)


def test_topk_causal_logits_ties_go_to_lower_positions():
    k = 6
    scores = torch.tensor([
        [0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 3.0, float("-inf")],
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        [5.0, 4.0, float("-inf"), float("-inf"), float("-inf"), float("-inf"), float("-inf"), float("-inf"),
         float("-inf"), float("-inf")],
    ], device=DEVICE)  # fmt: skip
    got = topk.topk_causal_logits(scores, k)
    assert got.dtype == torch.int32
    assert got.tolist() == [[8, 1, 4, 0, 2, 3], [0, 1, 2, 3, 4, 5], [0, 1, -1, -1, -1, -1]]
    # Same rule as the CPU path on random rows with many exact zeros.
    scores = torch.randn(5, 300, device=DEVICE).relu() * torch.randint(0, 2, (5, 300), device=DEVICE)
    query_pos = torch.tensor([299, 250, 40, 10, 299], device=DEVICE)
    scores = scores.masked_fill(torch.arange(300, device=DEVICE)[None, :] > query_pos[:, None], float("-inf"))
    from glmserve.model.indexer import topk_positions as cpu_rule

    expected = cpu_rule(scores, 32)
    expected = torch.where(scores.gather(1, expected) > float("-inf"), expected, -1)
    assert torch.equal(topk.topk_causal_logits(scores, 32), expected.to(torch.int32))
    assert topk.topk_causal_logits(scores[:, :20], 32)[:, 20:].eq(-1).all()
    # The decode path's radix select: the same positions (in position order), -0.0 equal to 0.0.
    scores[0, :5] = -0.0
    expected = torch.where(scores.gather(1, cpu_rule(scores, 32)) > float("-inf"), cpu_rule(scores, 32), -1)
    few = topk.topk_causal_logits_few_rows(scores, query_pos.int(), 32)
    assert torch.equal(few.sort(dim=-1).values, expected.int().sort(dim=-1).values)
    # Rows wider than one program takes: split across programs, same rule.
    width = topk.ONE_PROGRAM_MAX_WIDTH + 2000
    wide = torch.randn(2, width, device=DEVICE).relu() * torch.randint(0, 2, (2, width), device=DEVICE)
    wide_pos = torch.tensor([width - 1, 20000], device=DEVICE)
    wide = wide.masked_fill(torch.arange(width, device=DEVICE)[None, :] > wide_pos[:, None], float("-inf"))
    expected = cpu_rule(wide, 256)
    few = topk.topk_causal_logits_few_rows(wide, wide_pos.int(), 256)
    assert torch.equal(few.sort(dim=-1).values, expected.int().sort(dim=-1).values)


# ----------------------------------------------------------------------------------------------- MLA


def mla_case(dtype, heads, value_dim, rope_dim, context_lens, positions, topk_width=None):
    tables, num_blocks = make_block_tables(context_lens)
    query_seq, query_pos = make_queries(positions)
    width = value_dim + rope_dim
    q = torch.randn(query_seq.numel(), heads, width, device=DEVICE).to(dtype)
    latent = torch.randn(num_blocks, BLOCK, width, device=DEVICE).to(dtype)
    topk_idx = None
    if topk_width is not None:
        # Random distinct causal positions per query, -1 where the context is short, shuffled so padding and
        # picks interleave.
        rows = []
        for pos in query_pos.tolist():
            picks = torch.randperm(pos + 1)[:topk_width]
            row = torch.cat([picks, torch.full((topk_width - picks.numel(),), -1)])
            rows.append(row[torch.randperm(topk_width)])
        topk_idx = torch.stack(rows).to(torch.int32).to(DEVICE)
    return q, latent, tables, query_seq, query_pos, width**-0.5, value_dim, topk_idx


def mla_naive(q, latent, tables, query_seq, query_pos, scale, value_dim, topk_idx):
    """One query and head at a time, straight from the definition."""
    o = torch.zeros(q.shape[0], q.shape[1], value_dim, dtype=torch.float64)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float64)
    for s in range(q.shape[0]):
        pos = int(query_pos[s])
        keys = list(range(pos + 1)) if topk_idx is None else [int(t) for t in topk_idx[s] if t >= 0]
        if not keys:
            continue
        rows = gather_rows(latent, tables[int(query_seq[s])], torch.tensor(keys, device=latent.device))
        rows = rows.double().cpu()
        scores = q[s].double().cpu() @ rows.T * scale
        lse[s] = torch.logsumexp(scores, dim=-1)
        o[s] = torch.softmax(scores, dim=-1) @ rows[:, :value_dim]
    return o, lse


@pytest.mark.parametrize("sparse", [True, False])
def test_mla_reference_matches_naive(sparse):
    case = mla_case(torch.float32, 3, 16, 8, [140, 20], [[63, 64, 139], [0, 19]], topk_width=24 if sparse else None)
    o, lse = paged_mla.mla_attention_reference(*case, query_chunk=2)
    o_naive, lse_naive = mla_naive(*case)
    assert torch.allclose(o.double().cpu(), o_naive, atol=1e-5)
    assert torch.allclose(lse.double().cpu(), lse_naive, atol=1e-5)


def assert_mla_close(got, ref, rtol):
    (o, lse), (o_ref, lse_ref) = got, ref
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
    assert torch.isfinite(o).all()
    assert relative_error(o, o_ref) < rtol
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    assert torch.allclose(lse[finite], lse_ref[finite], atol=rtol, rtol=rtol)


MLA_POSITIONS = [BOUNDARY_POSITIONS, [30], [190, 191]]
MLA_LENS = [130, 31, 192]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sparse", [True, False])
def test_mla_prefill_interpreter(dtype, sparse):
    case = mla_case(dtype, 4, 64, 16, MLA_LENS, MLA_POSITIONS, topk_width=40 if sparse else None)
    got = paged_mla.mla_prefill_triton(*case, launch=SMALL_MLA)
    assert_mla_close(got, paged_mla.mla_attention_reference(*case), 1e-4 if dtype == torch.float32 else 3e-3)


@pytest.mark.parametrize("sparse", [True, False])
def test_mla_decode_interpreter(sparse):
    case = mla_case(torch.float32, 4, 64, 16, MLA_LENS, MLA_POSITIONS, topk_width=40 if sparse else None)
    got = paged_mla.mla_decode_triton(*case, num_splits=3, launch=SMALL_MLA)
    assert_mla_close(got, paged_mla.mla_attention_reference(*case), 1e-4)


def test_mla_query_without_keys_gives_zero():
    case = list(mla_case(torch.float32, 2, 16, 16, [10], [[5, 9]], topk_width=8))
    case[-1][0] = -1  # the first query selected nothing
    for fn in (paged_mla.mla_prefill_triton, paged_mla.mla_decode_triton):
        o, lse = fn(*case, launch=SMALL_MLA)
        assert (o[0] == 0).all() and torch.isinf(lse[0]).all() and torch.isfinite(lse[1]).all()


# ----------------------------------------------------------------------------------------------- MoE


def moe_case(dtype, tokens, hidden, inter, experts, k):
    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    topk_ids = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)]).to(DEVICE)
    topk_weights = torch.rand(tokens, k, device=DEVICE)
    w_gate_up = (torch.randn(experts, 2 * inter, hidden, device=DEVICE) * hidden**-0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, inter, device=DEVICE) * inter**-0.5).to(dtype)
    return x, topk_ids, topk_weights, w_gate_up, w_down


def test_route_tokens_tiles_every_row_once():
    topk_ids = torch.tensor([[2, 0], [2, 3], [0, 2], [2, 1]])
    routing = moe.route_tokens(topk_ids, num_experts=5, block_m=2)
    flat = topk_ids.flatten()
    assert routing.counts.tolist() == [2, 1, 4, 1, 0]
    assert (flat[routing.order].diff() >= 0).all()
    covered = []
    for e, start, end in zip(routing.tile_expert.tolist(), routing.tile_row_start.tolist(),
                             routing.tile_row_end.tolist(), strict=True):  # fmt: skip
        if e < 0:
            continue
        rows = list(range(start, min(start + 2, end)))
        assert all(int(flat[routing.order[r]]) == e for r in rows)
        covered += rows
    assert sorted(covered) == list(range(8))


def test_moe_triton_interpreter():
    case = moe_case(torch.float32, 11, 64, 32, 6, 2)
    launch = moe.MoeLaunch(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=1)
    got = moe.moe_experts_triton(*case, launch=launch)
    assert relative_error(got, moe.moe_experts_reference(*case)) < 1e-5


@pytest.mark.parametrize("tokens", [3, 11])  # 3 x 2 pairs <= 8 experts: a tile per pair, unsorted; 11: sorted
def test_moe_triton_combines_shared_and_residual_interpreter(tokens):
    """The combine launch sums each token's pairs, then adds the shared expert's output, then the residual."""
    case = moe_case(torch.float32, tokens, 64, 32, 8, 2)
    shared, residual = torch.randn(2, tokens, 64, device=DEVICE)
    launch = moe.MoeLaunch(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=1)
    got = moe.moe_experts_triton(*case, launch=launch, shared=shared, residual=residual)
    assert relative_error(got, residual + (moe.moe_experts_reference(*case) + shared)) < 1e-5
    alone = moe.moe_experts_triton(*case, launch=launch)
    assert relative_error(alone, moe.moe_experts_reference(*case)) < 1e-5


@pytest.mark.parametrize("tokens", [3, 11])  # a tile per pair, and sorted tiles
@pytest.mark.parametrize("block_k", [64, 128])  # K steps inside one scale block, and one per block
def test_moe_triton_fp8_weights_match_the_dequantized_experts_interpreter(tokens, block_k):
    """FP8 experts with one scale per 128x128 block each: the grouped kernels widen and scale every tile in
    registers; the same function as the bf16 path on the dequantized weights."""
    x, ids, weights, w_gate_up, w_down = moe_case(torch.float32, tokens, 256, 128, 8, 2)
    quantized = [[quantize_fp8_blockwise(w.cpu()) for w in ws] for ws in (w_gate_up, w_down)]
    (gu, gu_s), (dn, dn_s) = ([torch.stack(t).to(DEVICE) for t in zip(*q, strict=True)] for q in quantized)
    launch = moe.MoeLaunch(block_m=16, block_n=128, block_k=block_k, num_warps=4, num_stages=1)
    got = moe.moe_experts_triton(x, ids, weights, gu, dn, launch=launch, scales=(gu_s, dn_s))
    dequantized = moe.dequantize_experts(gu, gu_s, x.dtype), moe.dequantize_experts(dn, dn_s, x.dtype)
    want = moe.moe_experts_reference(x, ids, weights, *dequantized)
    assert relative_error(got, want) < 1e-5
    assert relative_error(moe.moe_experts(x.cpu(), ids.cpu(), weights.cpu(), gu.cpu(), dn.cpu(),
                                          scales=(gu_s.cpu(), dn_s.cpu())), want.cpu()) < 1e-5  # fmt: skip


def test_moe_grouped_mm_with_empty_experts():
    if not moe.has_grouped_mm():
        pytest.skip("torch._grouped_mm is missing")
    case = moe_case(torch.float32, 9, 32, 16, 8, 2)
    got = moe.moe_experts_grouped_mm(*case)
    assert relative_error(got, moe.moe_experts_reference(*case)) < 1e-5


def test_moe_reference_matches_dense_loop():
    x, topk_ids, topk_weights, w_gate_up, w_down = moe_case(torch.float32, 5, 8, 4, 3, 2)
    out = moe.moe_experts_reference(x, topk_ids, topk_weights, w_gate_up, w_down)
    for n in range(5):
        expected = torch.zeros(8, device=DEVICE)
        for j in range(2):
            e = int(topk_ids[n, j])
            gate, up = (w_gate_up[e] @ x[n]).split(4)
            expected += topk_weights[n, j] * (w_down[e] @ (torch.nn.functional.silu(gate) * up))
        assert torch.allclose(out[n], expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_interpreter(dtype):
    from glmserve.model.norm import RMSNorm

    norm = RMSNorm(48, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48) + 0.5)
    wide = torch.randn(7, 80, device=DEVICE).to(dtype)
    x = wide[:, 16:64]  # strided rows, as the latent slice of kv_a_proj's output
    got = rms_norm.rms_norm_triton(x, norm.weight.to(dtype), norm.eps)
    ref = norm.to(dtype)(x)
    assert got.dtype == ref.dtype and relative_error(got, ref) < (1e-6 if dtype == torch.float32 else 2e-3)
    three_d = rms_norm.rms_norm_triton(wide.view(7, 2, 40), torch.ones(40, device=DEVICE, dtype=dtype), 1e-5)
    assert three_d.shape == (7, 2, 40)


def check_add_norm_and_silu_mul(dtype: torch.dtype, rows: int, dim: int, tolerance: float) -> None:
    """The residual add + RMSNorm launch and the SwiGLU activation launch against the eager modules."""
    from glmserve.model.mlp import silu_mul
    from glmserve.model.norm import RMSNorm

    norm = RMSNorm(dim, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim) + 0.5)
    norm = norm.to(dtype)
    x, delta = torch.randn(2, rows, dim, device=DEVICE).to(dtype)
    total, normed = rms_norm.add_rms_norm_triton(x, delta, norm.weight, norm.eps)
    ref_total, ref_normed = norm.add_forward(x, delta)
    assert torch.equal(total, ref_total)  # one rounding of one add: exact
    assert normed.dtype == ref_normed.dtype and relative_error(normed, ref_normed) < tolerance
    gate_up = torch.randn(rows, 2 * dim, device=DEVICE).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)  # strided halves, as the packed GEMM's output
    assert relative_error(activation.silu_mul_triton(gate, up), silu_mul(gate, up)) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rms_norm_and_silu_mul_interpreter(dtype):
    check_add_norm_and_silu_mul(dtype, rows=5, dim=48, tolerance=1e-6 if dtype == torch.float32 else 2e-3)


# ----------------------------------------------------------------------------------------------- KV write


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_matches_cache_write(dtype):
    """One launch stores latent | k_rope and the index key at the same slots as the eager scatter, on an indexer
    layer and on a layer without an index pool; rows come strided (slices of one projection's output)."""
    from glmserve.model.kv_cache import KVCacheSpec, PagedKVCache

    spec = KVCacheSpec(num_layers=2, latent_dim=48 + 16, index_dim=32, index_layers=(0,), dtype=dtype, block_size=4)
    eager, fused = (PagedKVCache(spec, 6, DEVICE) for _ in range(2))
    slots = torch.randperm(24, device=DEVICE)[:9]
    kv_a = torch.randn(9, 48 + 16 + 8, device=DEVICE).to(dtype)
    latent, k_rope = kv_a[:, :48], kv_a[:, 48:64]
    index_rows = torch.randn(9, 32, device=DEVICE).to(dtype)
    for layer, index in ((0, index_rows), (1, None)):
        eager.write(layer, slots, latent, k_rope, index)
        kv_write.write_kv_triton(fused, layer, slots, latent, k_rope, index)
        assert torch.equal(fused.latent[layer], eager.latent[layer])
    assert torch.equal(fused.index_keys[0], eager.index_keys[0]) and fused.index_keys[0].abs().sum() > 0


# ----------------------------------------------------------------------------------------------- RoPE, router


def rope_cases(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, int | None]]:
    """(x, cos, sin, interleave, rotary_dim) as the model passes them: a strided per-head slice of q, a strided
    slice of one key per token, and the indexer's heads whose first dims rotate; 1 and 13 tokens."""
    from glmserve.model.rope import rope_cos_sin

    cases = []
    for tokens in (1, 13):
        positions = torch.randint(0, 5000, (tokens,), device=DEVICE)
        cos, sin = rope_cos_sin(positions, 32, 10000.0, dtype)
        q = torch.randn(tokens, 5, 64 + 32, device=DEVICE, dtype=dtype)[..., 64:]  # q_rope of q [T, H, nope+rope]
        kv = torch.randn(tokens, 48 + 32, device=DEVICE, dtype=dtype)[:, 48:]  # k_rope of kv_a's output
        index_q = torch.randn(tokens, 3, 64, device=DEVICE, dtype=dtype)
        for interleave in (True, False):
            cases.append((q, cos.unsqueeze(-2), sin.unsqueeze(-2), interleave, None))
            cases.append((kv, cos, sin, interleave, None))
            cases.append((index_q, cos.unsqueeze(-2), sin.unsqueeze(-2), interleave, 32))
    return cases


def check_rope(dtype: torch.dtype) -> None:
    from glmserve.model.rope import apply_rope

    for x, cos, sin, interleave, rotary_dim in rope_cases(dtype):
        got = rope.rope_triton(x, cos, sin, interleave, rotary_dim)
        ref = apply_rope(x, cos, sin, interleave, rotary_dim)
        assert got.is_contiguous() and got.dtype == ref.dtype
        # torch rounds each product before the sum, the kernel only the result: at most a last-bit difference
        assert relative_error(got, ref) < 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_interpreter(dtype):
    check_rope(dtype)


def test_rope_other_shapes_take_the_torch_definition():
    from glmserve.model.rope import apply_rope, rope_cos_sin

    cos, sin = rope_cos_sin(torch.arange(6, device=DEVICE), 16, 10000.0, torch.float32)
    x = torch.randn(2, 6, 3, 16, device=DEVICE)  # the batched reference forward's [B, T, H, D]
    assert torch.equal(rope.rope_triton(x, cos.unsqueeze(-2), sin.unsqueeze(-2), True), apply_rope(
        x, cos.unsqueeze(-2), sin.unsqueeze(-2), True))  # fmt: skip


def check_router(num_rows: int, num_experts: int, top_k: int, normalize: bool) -> None:
    from types import SimpleNamespace

    from glmserve.model.moe import Router

    config = SimpleNamespace(
        n_routed_experts=num_experts, num_experts_per_tok=top_k, n_group=1, topk_group=1, norm_topk_prob=normalize,
        routed_scaling_factor=2.5, hidden_size=8,
    )  # fmt: skip
    gate = Router(config).to(DEVICE)
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.randn(num_experts) * 0.1)
    logits = torch.randn(num_rows, num_experts, device=DEVICE) * 3
    logits[0, :4] = logits[0, 4]  # a tie inside the top k
    ids, weights = router.route_triton(logits, gate.e_score_correction_bias, top_k, normalize, gate.scaling)
    ref_ids, ref_weights = gate.route(logits)
    assert ids.dtype == ref_ids.dtype and ids.shape == ref_ids.shape
    # same experts with the same weights (torch.topk may order and break exact ties differently)
    got = torch.zeros(num_rows, num_experts, device=DEVICE).scatter_(1, ids, weights)
    want = torch.zeros(num_rows, num_experts, device=DEVICE).scatter_(1, ref_ids, ref_weights)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("num_experts", "top_k", "normalize"), [(16, 4, True), (24, 3, False), (256, 8, True)])
def test_router_interpreter(num_experts, top_k, normalize):
    check_router(37, num_experts, top_k, normalize)


# ----------------------------------------------------------------------------------------------- GPU (bf16, fp8)


@gpu
@pytest.mark.gpu
def test_indexer_bf16_gpu():
    positions = [BOUNDARY_POSITIONS + list(range(2900, 3000)), list(range(0, 700, 7)), [4095]]
    case = indexer_case(torch.bfloat16, 32, 128, [3000, 700, 4096], positions)
    out = indexer.indexer_logits_triton(*case)
    assert_logits_close(out, indexer.indexer_logits_reference(*case), rtol=1e-4)


@gpu
@pytest.mark.gpu
def test_indexer_per_query_bf16_gpu():
    positions = [[4095], [0], [2047, 2048, 2049], [699]]
    case = indexer_case(torch.bfloat16, 32, 128, [4096, 1, 2050, 700], positions)
    out = indexer.indexer_logits_per_query_triton(*case, max_context=4096)
    assert_logits_close(out, indexer.indexer_logits_reference(*case), rtol=1e-4)


@gpu
@pytest.mark.gpu
def test_rms_norm_bf16_gpu():
    from glmserve.model.norm import RMSNorm

    norm = RMSNorm(6144).to(DEVICE, torch.bfloat16)
    x = torch.randn(33, 6144, device=DEVICE, dtype=torch.bfloat16)
    assert relative_error(rms_norm.rms_norm_triton(x, norm.weight, norm.eps), norm(x)) < 5e-3
    check_add_norm_and_silu_mul(torch.bfloat16, rows=33, dim=6144, tolerance=5e-3)


@gpu
@pytest.mark.gpu
def test_rope_and_router_gpu():
    check_rope(torch.bfloat16)
    check_router(300, 256, 8, True)


@gpu
@pytest.mark.gpu
def test_indexer_fp8_gpu():
    fp8_indexer_check(32, 128, [2000, 512], [BOUNDARY_POSITIONS + list(range(1900, 2000)), [511]])


@gpu
@pytest.mark.gpu
def test_topk_gpu():
    k = 2048
    query_pos = torch.tensor([0, 2047, 2048, 5000, 70000, 99999], dtype=torch.int32, device=DEVICE)
    scores = torch.randn(query_pos.numel(), 100000, device=DEVICE)
    got = topk.topk_positions_triton(scores, query_pos, k)
    assert_same_selection(got, scores, query_pos, k)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cols", [topk.SPLIT_MAX_WIDTH, 1 << 20])
def test_topk_split_wide_rows_gpu(cols):
    """Wide decode rows (ReLU-weighted scores: many exact zeros) split across programs: the same positions in the
    same slots as one program per row, lower positions first among equal scores."""
    k = 2048
    query_pos = torch.tensor([1000, cols - 1, cols * 2 // 3, 3000], dtype=torch.int32, device=DEVICE)
    scores = torch.randn(4, cols, device=DEVICE).relu() * torch.randn(4, cols, device=DEVICE)
    scores = scores.masked_fill(torch.arange(cols, device=DEVICE)[None, :] > query_pos[:, None], float("-inf"))
    got = topk_split.topk_positions_split(scores, query_pos, k)
    assert_same_selection(got, scores, query_pos, k)
    assert torch.equal(got, topk.topk_positions_triton(scores, query_pos, k))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("kernel", ["prefill", "decode"])
def test_mla_bf16_gpu(sparse, kernel):
    positions = [BOUNDARY_POSITIONS + [1000, 2999], [2047, 2048], [100]]
    case = mla_case(torch.bfloat16, 64, 512, 64, [3000, 2049, 101], positions, topk_width=2048 if sparse else None)
    fn = paged_mla.mla_prefill_triton if kernel == "prefill" else paged_mla.mla_decode_triton
    assert_mla_close(fn(*case), paged_mla.mla_attention_reference(*case), 1e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [3, 300])
def test_moe_bf16_gpu(tokens):
    case = moe_case(torch.bfloat16, tokens, 1024, 512, 16, 4)
    ref = moe.moe_experts_reference(*case)
    assert relative_error(moe.moe_experts_triton(*case), ref) < 1e-2
    if moe.has_grouped_mm():
        assert relative_error(moe.moe_experts_grouped_mm(*case), ref) < 1e-2


@gpu
@pytest.mark.gpu
def test_moe_pairs_bf16_gpu():
    case = moe_case(torch.bfloat16, 2, 1024, 512, 64, 8)  # 16 pairs <= 64 experts: routed as pairs
    assert relative_error(moe.moe_experts_triton(*case), moe.moe_experts_reference(*case)) < 1e-2

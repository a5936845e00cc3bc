"""DSA indexer scores over the paged index-key cache.

logits[s, t] = sum_h w[s, h] * relu(q[s, h] . k[t]) for t <= query_pos[s], -inf beyond. The weights already carry
the H^-0.5 and D^-0.5 scales. The Triton kernel reduces the heads in registers: [S, H, T] never exists.
"""

import torch
import triton
import triton.language as tl

from glmserve.model.kernels.paged import dot_precision, gather_rows, query_tiles

# A program scores 64 queries of one sequence against 128 keys: the fastest tile on the H200 (480 TFLOP/s at 128K
# keys, 2026-11-29; 128x128 with 8 warps gave 384). Keys are read once per tile of queries.
INDEXER_BLOCK_S = 64
INDEXER_BLOCK_T = 128
INDEXER_NUM_WARPS = 4
INDEXER_NUM_STAGES = 2


@triton.jit
def _indexer_logits_kernel(
    q_ptr,
    w_ptr,
    k_ptr,
    k_scale_ptr,
    out_ptr,
    block_tables_ptr,
    query_seq_ptr,
    query_pos_ptr,
    tile_start_ptr,
    tile_end_ptr,
    stride_qs,
    stride_qh,
    stride_ws,
    stride_kb,
    stride_kt,
    stride_ksb,
    stride_bt,
    stride_os,
    num_heads,
    max_context,
    HEAD_DIM: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_KEY_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    key_tile = tl.program_id(1)
    s_begin = tl.load(tile_start_ptr + tile)
    s_end = tl.load(tile_end_ptr + tile)
    offs_s = s_begin + tl.arange(0, BLOCK_S)
    s_mask = offs_s < s_end
    pos = tl.load(query_pos_ptr + offs_s, mask=s_mask, other=-1)
    max_pos = tl.max(pos, axis=0)
    seq = tl.load(query_seq_ptr + s_begin).to(tl.int64)

    offs_t = key_tile * BLOCK_T + tl.arange(0, BLOCK_T)
    out_ptrs = out_ptr + offs_s.to(tl.int64)[:, None] * stride_os + offs_t[None, :]
    out_mask = s_mask[:, None] & (offs_t < max_context)[None, :]
    if key_tile * BLOCK_T > max_pos:
        # Past every query of this tile: nothing to compute, only the causal -inf to write.
        tl.store(out_ptrs, tl.full([BLOCK_S, BLOCK_T], float("-inf"), tl.float32), mask=out_mask)
        return

    key_valid = offs_t <= max_pos
    block = tl.load(block_tables_ptr + seq * stride_bt + offs_t // KV_BLOCK, mask=key_valid, other=0).to(tl.int64)
    slot = offs_t % KV_BLOCK
    offs_d = tl.arange(0, HEAD_DIM)
    keys = tl.load(
        k_ptr + block[None, :] * stride_kb + slot[None, :] * stride_kt + offs_d[:, None],
        mask=key_valid[None, :],
        other=0.0,
    )  # [HEAD_DIM, BLOCK_T]

    q_ptrs = q_ptr + offs_s.to(tl.int64)[:, None] * stride_qs + offs_d[None, :]
    w_ptrs = w_ptr + offs_s.to(tl.int64) * stride_ws
    acc = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
    for h in range(num_heads):
        q = tl.load(q_ptrs + h * stride_qh, mask=s_mask[:, None], other=0.0)
        w = tl.load(w_ptrs + h, mask=s_mask, other=0.0)
        scores = tl.dot(q, keys, input_precision=DOT_PRECISION)
        acc += tl.maximum(scores, 0.0) * w[:, None]

    if HAS_KEY_SCALE:
        # relu(a * c) = c * relu(a) for c > 0: the per-token key scale factors out of the head sum.
        k_scale = tl.load(k_scale_ptr + block * stride_ksb + slot, mask=key_valid, other=0.0)
        acc = acc * k_scale[None, :]
    acc = tl.where(offs_t[None, :] <= pos[:, None], acc, float("-inf"))
    tl.store(out_ptrs, acc, mask=out_mask)


# Decode steps (a query or a few per sequence): one program per (query, key tile) with the heads as the matrix rows,
# so no tile rows are wasted on absent queries; the step is bound by reading the keys.
PER_QUERY_BLOCK_T = 128
PER_QUERY_NUM_WARPS = 4


@triton.jit
def _indexer_logits_per_query_kernel(
    q_ptr,
    w_ptr,
    k_ptr,
    out_ptr,
    block_tables_ptr,
    query_seq_ptr,
    query_pos_ptr,
    stride_qs,
    stride_qh,
    stride_ws,
    stride_kb,
    stride_kt,
    stride_bt,
    stride_os,
    num_heads,
    max_context,
    HEAD_DIM: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    key_tile = tl.program_id(1)
    pos = tl.load(query_pos_ptr + s)
    offs_t = key_tile * BLOCK_T + tl.arange(0, BLOCK_T)
    out_ptrs = out_ptr + s * stride_os + offs_t
    out_mask = offs_t < max_context
    if key_tile * BLOCK_T > pos:
        tl.store(out_ptrs, tl.full([BLOCK_T], float("-inf"), tl.float32), mask=out_mask)
        return

    seq = tl.load(query_seq_ptr + s).to(tl.int64)
    key_valid = offs_t <= pos
    block = tl.load(block_tables_ptr + seq * stride_bt + offs_t // KV_BLOCK, mask=key_valid, other=0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = tl.load(
        k_ptr + block[None, :] * stride_kb + (offs_t % KV_BLOCK)[None, :] * stride_kt + offs_d[:, None],
        mask=key_valid[None, :],
        other=0.0,
    )  # [HEAD_DIM, BLOCK_T]
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < num_heads
    q = tl.load(q_ptr + s * stride_qs + offs_h[:, None] * stride_qh + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    w = tl.load(w_ptr + s * stride_ws + offs_h, mask=h_mask, other=0.0)
    scores = tl.dot(q, keys, input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_T]
    logits = tl.sum(tl.maximum(scores, 0.0) * w[:, None], axis=0)
    tl.store(out_ptrs, tl.where(key_valid, logits, float("-inf")), mask=out_mask)


def indexer_logits_per_query_triton(
    q: torch.Tensor,
    weights: torch.Tensor,
    index_keys: torch.Tensor,
    block_tables: torch.Tensor,
    query_seq: torch.Tensor,
    query_pos: torch.Tensor,
    max_context: int,
    *,
    block_t: int = PER_QUERY_BLOCK_T,
    num_warps: int = PER_QUERY_NUM_WARPS,
) -> torch.Tensor:
    """Indexer logits [S, max_context] fp32, one program per query and key tile: the kernel for decode steps and
    MTP verification (a few queries per sequence). Same contract as `indexer_logits_triton`, any query order, and
    no host sync (CUDA-graph friendly)."""
    num_queries, num_heads, head_dim = q.shape
    assert head_dim == index_keys.shape[-1] and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    assert q.stride(-1) == 1 and index_keys.stride(-1) == 1 and weights.stride(-1) == 1
    out = torch.empty(num_queries, max_context, dtype=torch.float32, device=q.device)
    if num_queries == 0 or max_context == 0:
        return out
    _indexer_logits_per_query_kernel[(num_queries, triton.cdiv(max_context, block_t))](
        q, weights, index_keys, out, block_tables, query_seq, query_pos,
        q.stride(0), q.stride(1), weights.stride(0), index_keys.stride(0), index_keys.stride(1),
        block_tables.stride(0), out.stride(0), num_heads, max_context,
        HEAD_DIM=head_dim, KV_BLOCK=index_keys.shape[1], BLOCK_H=max(16, triton.next_power_of_2(num_heads)),
        BLOCK_T=block_t, DOT_PRECISION=dot_precision(q.dtype), num_warps=num_warps,
    )  # fmt: skip
    return out


def _launch_indexer(
    q: torch.Tensor,
    weights: torch.Tensor,
    index_keys: torch.Tensor,
    key_scale: torch.Tensor | None,
    block_tables: torch.Tensor,
    query_seq: torch.Tensor,
    query_pos: torch.Tensor,
    max_context: int | None,
    block_s: int,
    block_t: int,
    num_warps: int,
    num_stages: int,
    tiles: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    num_queries, num_heads, head_dim = q.shape
    assert head_dim == index_keys.shape[-1] and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    assert q.stride(-1) == 1 and index_keys.stride(-1) == 1 and weights.stride(-1) == 1
    if max_context is None:
        max_context = int(query_pos.max()) + 1 if num_queries else 0
    out = torch.empty(num_queries, max_context, dtype=torch.float32, device=q.device)
    if num_queries == 0 or max_context == 0:
        return out
    tile_start, tile_end = tiles if tiles is not None else query_tiles(query_seq, block_s)
    grid = (tile_start.numel(), triton.cdiv(max_context, block_t))
    scale_arg = key_scale if key_scale is not None else weights
    _indexer_logits_kernel[grid](
        q,
        weights,
        index_keys,
        scale_arg,
        out,
        block_tables,
        query_seq,
        query_pos,
        tile_start,
        tile_end,
        q.stride(0),
        q.stride(1),
        weights.stride(0),
        index_keys.stride(0),
        index_keys.stride(1),
        key_scale.stride(0) if key_scale is not None else 0,
        block_tables.stride(0),
        out.stride(0),
        num_heads,
        max_context,
        HEAD_DIM=head_dim,
        KV_BLOCK=index_keys.shape[1],
        BLOCK_S=block_s,
        BLOCK_T=block_t,
        HAS_KEY_SCALE=key_scale is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def indexer_logits_triton(
    q: torch.Tensor,
    weights: torch.Tensor,
    index_keys: torch.Tensor,
    block_tables: torch.Tensor,
    query_seq: torch.Tensor,
    query_pos: torch.Tensor,
    max_context: int | None = None,
    *,
    block_s: int = INDEXER_BLOCK_S,
    block_t: int = INDEXER_BLOCK_T,
    num_warps: int = INDEXER_NUM_WARPS,
    num_stages: int = INDEXER_NUM_STAGES,
    tiles: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Indexer logits [S, max_context] fp32 through Triton.

    q [S, H, D], weights [S, H] fp32, index_keys [num_blocks, block, D], block_tables [B, max_blocks] int32,
    query_seq / query_pos [S] int32. Queries of one sequence must be contiguous in the batch. `tiles`: the
    (start, end) int32 query tiles of at most `block_s` queries of one sequence, when the caller has them (no host
    sync then: CUDA-graph friendly); by default they are computed here.
    """
    return _launch_indexer(
        q, weights, index_keys, None, block_tables, query_seq, query_pos, max_context,
        block_s, block_t, num_warps, num_stages, tiles,
    )  # fmt: skip


def indexer_logits_fp8_triton(
    q_fp8: torch.Tensor,
    q_scale: torch.Tensor,
    weights: torch.Tensor,
    keys_fp8: torch.Tensor,
    key_scale: torch.Tensor,
    block_tables: torch.Tensor,
    query_seq: torch.Tensor,
    query_pos: torch.Tensor,
    max_context: int | None = None,
    *,
    block_s: int = INDEXER_BLOCK_S,
    block_t: int = INDEXER_BLOCK_T,
    num_warps: int = INDEXER_NUM_WARPS,
    num_stages: int = INDEXER_NUM_STAGES,
    tiles: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Indexer logits from e4m3 queries (scale per (s, h)) and e4m3 keys (scale per token [num_blocks, block])."""
    # The query scale is positive, so it moves out of the relu and into the head weight.
    scaled_weights = (weights * q_scale).float().contiguous()
    return _launch_indexer(
        q_fp8, scaled_weights, keys_fp8, key_scale, block_tables, query_seq, query_pos, max_context,
        block_s, block_t, num_warps, num_stages, tiles,
    )  # fmt: skip


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 with one fp32 scale per row of the last dimension: x ~= x_fp8 * scale."""
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / fp8_max
    x_fp8 = (x.float() / scale).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn)
    return x_fp8, scale.squeeze(-1)


def indexer_logits_reference(
    q: torch.Tensor,
    weights: torch.Tensor,
    index_keys: torch.Tensor,
    block_tables: torch.Tensor,
    query_seq: torch.Tensor,
    query_pos: torch.Tensor,
    max_context: int | None = None,
) -> torch.Tensor:
    """Plain torch indexer logits (fp32), one sequence at a time; the CPU fallback and the tests' oracle."""
    num_queries = q.shape[0]
    if max_context is None:
        max_context = int(query_pos.max()) + 1 if num_queries else 0
    out = torch.full((num_queries, max_context), float("-inf"), dtype=torch.float32, device=q.device)
    for seq in query_seq.unique().tolist():
        rows = (query_seq == seq).nonzero().flatten()
        positions = torch.arange(int(query_pos[rows].max()) + 1, device=q.device)
        keys = gather_rows(index_keys, block_tables[seq], positions).float()  # [T, D]
        scores = torch.einsum("shd,td->sht", q[rows].float(), keys).relu()
        logits = torch.einsum("sht,sh->st", scores, weights[rows].float())
        causal = positions[None, :] <= query_pos[rows, None]
        out[rows, : positions.numel()] = torch.where(causal, logits, float("-inf"))
    return out


def indexer_logits(
    q: torch.Tensor,
    weights: torch.Tensor,
    index_keys: torch.Tensor,
    block_tables: torch.Tensor,
    query_seq: torch.Tensor,
    query_pos: torch.Tensor,
    max_context: int | None = None,
) -> torch.Tensor:
    """Indexer logits [S, max_context] fp32: Triton on CUDA, plain torch elsewhere."""
    fn = indexer_logits_triton if q.is_cuda else indexer_logits_reference
    return fn(q, weights, index_keys, block_tables, query_seq, query_pos, max_context)

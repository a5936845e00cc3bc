"""Absorbed MLA attention over the paged latent cache: sparse (DSA top-k positions) or dense (all t <= pos).

q [S, H, Dv + Dr] is already absorbed (nope part times W_UK, then the roped part); each cache row is
[normalized latent (Dv) | roped key (Dr)], the values are the latent part. Per query and head:
o = softmax(q . row * scale) @ row[:Dv] over the selected rows; lse is the natural log-sum-exp of the scaled scores.
Queries with no key get o = 0 and lse = -inf.

One kernel, two launch shapes. Prefill: a program per (query, head block) walks all of that query's keys. Decode:
a program per (query, key split) holds all heads, so each gathered row is loaded once for every head; the splits
fill the GPU when there are few queries and a small kernel merges them by their log-sum-exp.
"""

import math
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from glmserve.model.kernels.paged import dot_precision

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class MlaLaunch:
    """Tile shape and launch parameters of an MLA kernel."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int


# All 64 heads per program, 64 keys per step, two warpgroups: the fastest of five tiles measured on the H200
# (2026-11-29) for prefill, and faster than 32-key steps for decode at batch 64 and for MTP verification.
PREFILL_LAUNCH = MlaLaunch(block_h=64, block_n=64, num_warps=8, num_stages=2)
DECODE_LAUNCH = MlaLaunch(block_h=64, block_n=64, num_warps=8, num_stages=2)


@triton.jit
def _attend_keys(
    acc,
    m_i,
    l_i,
    q_nope,
    q_rope,
    latent_ptr,
    block_table_ptr,
    topk_row_ptr,
    n_begin,
    n_end,
    qk_scale,
    stride_lb,
    stride_lt,
    D_V: tl.constexpr,
    D_R: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DENSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over keys n_begin..n_end (positions, or slots of the top-k row); scores in log2 units."""
    offs_v = tl.arange(0, D_V)
    offs_r = tl.arange(0, D_R)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < n_end
        if DENSE:
            pos = offs_n
            valid = in_range
        else:
            pos = tl.load(topk_row_ptr + offs_n, mask=in_range, other=-1)
            valid = pos >= 0
        block = tl.load(block_table_ptr + pos // KV_BLOCK, mask=valid, other=0).to(tl.int64)
        row_ptr = latent_ptr + block * stride_lb + (pos % KV_BLOCK) * stride_lt
        kv = tl.load(row_ptr[:, None] + offs_v[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, D_V]
        k_rope = tl.load(row_ptr[:, None] + D_V + offs_r[None, :], mask=valid[:, None], other=0.0)

        scores = tl.dot(q_nope, tl.trans(kv), input_precision=DOT_PRECISION)
        scores = tl.dot(q_rope, tl.trans(k_rope), scores, input_precision=DOT_PRECISION)
        scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays at 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _load_query(q_ptr, s, offs_h, h_mask, stride_qs, stride_qh, D_V: tl.constexpr, D_R: tl.constexpr):
    q_row = q_ptr + s * stride_qs + offs_h[:, None] * stride_qh
    q_nope = tl.load(q_row + tl.arange(0, D_V)[None, :], mask=h_mask[:, None], other=0.0)
    q_rope = tl.load(q_row + D_V + tl.arange(0, D_R)[None, :], mask=h_mask[:, None], other=0.0)
    return q_nope, q_rope


@triton.jit
def _mla_kernel(
    q_ptr,
    latent_ptr,
    block_tables_ptr,
    query_seq_ptr,
    query_pos_ptr,
    topk_ptr,
    o_ptr,
    lse_ptr,
    stride_qs,
    stride_qh,
    stride_lb,
    stride_lt,
    stride_bt,
    stride_ts,
    stride_os,
    stride_oh,
    num_heads,
    num_topk,
    num_splits,
    qk_scale,
    D_V: tl.constexpr,
    D_R: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DENSE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """A program per (query, head block), or with SPLIT per (query, head block, key split): then o_ptr/lse_ptr are
    the fp32 partials [S, splits, H, D_V] / [S, splits, H] (lse in log2 units) that `_mla_combine_kernel` merges."""
    s = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < num_heads
    q_nope, q_rope = _load_query(q_ptr, s, offs_h, h_mask, stride_qs, stride_qh, D_V, D_R)
    seq = tl.load(query_seq_ptr + s).to(tl.int64)
    if DENSE:
        n_total = tl.load(query_pos_ptr + s) + 1
    else:
        n_total = num_topk
    if SPLIT:
        split = tl.program_id(2)
        per_split = tl.cdiv(tl.cdiv(n_total, num_splits), BLOCK_N) * BLOCK_N
        n_begin = split * per_split
        n_end = tl.minimum(n_begin + per_split, n_total)
    else:
        n_begin = 0
        n_end = n_total

    acc = tl.zeros([BLOCK_H, D_V], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q_nope, q_rope, latent_ptr, block_tables_ptr + seq * stride_bt, topk_ptr + s * stride_ts,
        n_begin, n_end, qk_scale, stride_lb, stride_lt, D_V, D_R, KV_BLOCK, BLOCK_N, DENSE, DOT_PRECISION,
    )  # fmt: skip

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse2 = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    if SPLIT:
        part = (s * num_splits + split) * num_heads + offs_h
        tl.store(o_ptr + part[:, None] * D_V + tl.arange(0, D_V)[None, :], o, mask=h_mask[:, None])
        tl.store(lse_ptr + part, lse2, mask=h_mask)
    else:
        o_ptrs = o_ptr + s * stride_os + offs_h[:, None] * stride_oh + tl.arange(0, D_V)[None, :]
        tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=h_mask[:, None])
        tl.store(lse_ptr + s * num_heads + offs_h, lse2 / 1.4426950408889634, mask=h_mask)


@triton.jit
def _mla_combine_kernel(
    o_part_ptr,
    lse_part_ptr,
    o_ptr,
    lse_ptr,
    stride_os,
    stride_oh,
    num_heads,
    num_splits,
    D_V: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_split = tl.arange(0, BLOCK_SPLITS)
    split_mask = offs_split < num_splits
    part = (s * num_splits + offs_split) * num_heads + h
    lse2 = tl.load(lse_part_ptr + part, mask=split_mask, other=float("-inf"))
    m = tl.max(lse2, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.exp2(lse2 - m_safe)
    total = tl.sum(weight, axis=0)
    o_part = tl.load(o_part_ptr + part[:, None] * D_V + tl.arange(0, D_V)[None, :], mask=split_mask[:, None], other=0.0)
    o = tl.sum(o_part * weight[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(o_ptr + s * stride_os + h * stride_oh + tl.arange(0, D_V), o.to(o_ptr.dtype.element_ty))
    lse = tl.where(total > 0.0, (m_safe + tl.log2(tl.where(total > 0.0, total, 1.0))) / 1.4426950408889634, m)
    tl.store(lse_ptr + s * num_heads + h, lse)


def _check_shapes(q: torch.Tensor, latent: torch.Tensor, value_dim: int) -> int:
    rope_dim = q.shape[-1] - value_dim
    assert latent.shape[-1] == q.shape[-1], "q and the latent rows must have the same width"
    assert value_dim & (value_dim - 1) == 0 and rope_dim & (rope_dim - 1) == 0, "dims must be powers of two"
    assert q.stride(-1) == 1 and latent.stride(-1) == 1
    return rope_dim


@cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: any small number
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def mla_prefill_triton(
    q: torch.Tensor,
    latent: torch.Tensor,
    block_tables: torch.Tensor,
    query_seq: torch.Tensor,
    query_pos: torch.Tensor,
    softmax_scale: float,
    value_dim: int,
    topk_idx: torch.Tensor | None = None,
    launch: MlaLaunch = PREFILL_LAUNCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA over many queries: sparse over `topk_idx` [S, K] positions (-1 padded) or, without it, dense causal.

    Returns o [S, H, value_dim] (q's dtype) and lse [S, H] fp32.
    """
    num_queries, num_heads, _ = q.shape
    rope_dim = _check_shapes(q, latent, value_dim)
    o = torch.empty(num_queries, num_heads, value_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_queries, num_heads, dtype=torch.float32, device=q.device)
    if num_queries == 0:
        return o, lse
    dense = topk_idx is None
    topk = query_pos if dense else topk_idx  # any int32 tensor: the dense kernel never reads it
    block_h = min(launch.block_h, max(16, triton.next_power_of_2(num_heads)))
    grid = (num_queries, triton.cdiv(num_heads, block_h))
    _mla_kernel[grid](
        q, latent, block_tables, query_seq, query_pos, topk, o, lse,
        q.stride(0), q.stride(1), latent.stride(0), latent.stride(1), block_tables.stride(0),
        0 if dense else topk.stride(0), o.stride(0), o.stride(1),
        num_heads, 0 if dense else topk.shape[1], 1, softmax_scale * LOG2E,
        D_V=value_dim, D_R=rope_dim, KV_BLOCK=latent.shape[1], BLOCK_H=block_h, BLOCK_N=launch.block_n,
        DENSE=dense, SPLIT=False, DOT_PRECISION=dot_precision(q.dtype), num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )  # fmt: skip
    return o, lse


def mla_decode_triton(
    q: torch.Tensor,
    latent: torch.Tensor,
    block_tables: torch.Tensor,
    query_seq: torch.Tensor,
    query_pos: torch.Tensor,
    softmax_scale: float,
    value_dim: int,
    topk_idx: torch.Tensor | None = None,
    num_splits: int | None = None,
    launch: MlaLaunch = DECODE_LAUNCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA for few queries (decode, MTP verification): split over keys, all heads per program. Same contract
    as `mla_prefill_triton`. No host sync: CUDA-graph friendly."""
    num_queries, num_heads, _ = q.shape
    rope_dim = _check_shapes(q, latent, value_dim)
    o = torch.empty(num_queries, num_heads, value_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_queries, num_heads, dtype=torch.float32, device=q.device)
    if num_queries == 0:
        return o, lse
    dense = topk_idx is None
    topk = query_pos if dense else topk_idx
    block_h = min(launch.block_h, max(16, triton.next_power_of_2(num_heads)))
    head_blocks = triton.cdiv(num_heads, block_h)
    if num_splits is None:
        max_splits = 16 if dense else max(1, topk.shape[1] // launch.block_n)
        num_splits = max(1, min(max_splits, math.ceil(2 * _sm_count(q.device) / (num_queries * head_blocks))))
    o_part = torch.empty(num_queries, num_splits, num_heads, value_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(num_queries, num_splits, num_heads, dtype=torch.float32, device=q.device)
    _mla_kernel[(num_queries, head_blocks, num_splits)](
        q, latent, block_tables, query_seq, query_pos, topk, o_part, lse_part,
        q.stride(0), q.stride(1), latent.stride(0), latent.stride(1), block_tables.stride(0),
        0 if dense else topk.stride(0), 0, 0,
        num_heads, 0 if dense else topk.shape[1], num_splits, softmax_scale * LOG2E,
        D_V=value_dim, D_R=rope_dim, KV_BLOCK=latent.shape[1], BLOCK_H=block_h, BLOCK_N=launch.block_n,
        DENSE=dense, SPLIT=True, DOT_PRECISION=dot_precision(q.dtype), num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )  # fmt: skip
    _mla_combine_kernel[(num_queries, num_heads)](
        o_part, lse_part, o, lse, o.stride(0), o.stride(1), num_heads, num_splits,
        D_V=value_dim, BLOCK_SPLITS=triton.next_power_of_2(num_splits), num_warps=4,
    )  # fmt: skip
    return o, lse


def mla_attention_reference(
    q: torch.Tensor,
    latent: torch.Tensor,
    block_tables: torch.Tensor,
    query_seq: torch.Tensor,
    query_pos: torch.Tensor,
    softmax_scale: float,
    value_dim: int,
    topk_idx: torch.Tensor | None = None,
    query_chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch MLA (fp32 math), in query chunks; the CPU fallback and the tests' oracle."""
    num_queries, num_heads, _ = q.shape
    o = torch.zeros(num_queries, num_heads, value_dim, dtype=q.dtype, device=q.device)
    lse = torch.full((num_queries, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    block_size = latent.shape[1]
    for begin in range(0, num_queries, query_chunk):
        rows = slice(begin, min(begin + query_chunk, num_queries))
        pos = query_pos[rows].long()
        if topk_idx is None:
            positions = torch.arange(int(pos.max()) + 1, device=q.device).expand(pos.numel(), -1)
            valid = positions <= pos[:, None]
        else:
            positions = topk_idx[rows].long()
            valid = positions >= 0
        positions = torch.where(valid, positions, 0)
        blocks = block_tables[query_seq[rows].long()[:, None], positions // block_size].long()
        kv = latent[blocks, positions % block_size].float()  # [s, n, Dv + Dr]
        scores = torch.einsum("shd,snd->shn", q[rows].float(), kv) * softmax_scale
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        chunk_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - chunk_lse.nan_to_num(neginf=0.0)[..., None])
        o[rows] = torch.einsum("shn,snd->shd", probs, kv[..., :value_dim]).to(q.dtype)
        lse[rows] = chunk_lse
    return o, lse


def mla_attention_triton(
    q: torch.Tensor,
    latent: torch.Tensor,
    block_tables: torch.Tensor,
    query_seq: torch.Tensor,
    query_pos: torch.Tensor,
    softmax_scale: float,
    value_dim: int,
    topk_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode kernel when the queries are too few to fill the GPU, else the prefill kernel. The choice depends
    on shapes only (no host sync)."""
    args = (q, latent, block_tables, query_seq, query_pos, softmax_scale, value_dim, topk_idx)
    prefill_programs = q.shape[0] * triton.cdiv(q.shape[1], PREFILL_LAUNCH.block_h)
    if prefill_programs >= 2 * _sm_count(q.device):
        return mla_prefill_triton(*args)
    return mla_decode_triton(*args)


def mla_attention(
    q: torch.Tensor,
    latent: torch.Tensor,
    block_tables: torch.Tensor,
    query_seq: torch.Tensor,
    query_pos: torch.Tensor,
    softmax_scale: float,
    value_dim: int,
    topk_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA: the Triton kernels on CUDA, plain torch elsewhere."""
    fn = mla_attention_triton if q.is_cuda else mla_attention_reference
    return fn(q, latent, block_tables, query_seq, query_pos, softmax_scale, value_dim, topk_idx)

"""Routed experts: out[n] = sum_j w[n, j] * down_e(silu(gate_e(x[n])) * up_e(x[n])), e = topk_ids[n, j].

Weights: w_gate_up [E, 2I, hidden] (rows 0..I-1 gate, I..2I-1 up), w_down [E, hidden, I], in the activation dtype,
or FP8 e4m3 with one fp32 scale per 128x128 block per expert (`scales`: [E, 2I/128, hidden/128] and
[E, hidden/128, I/128], I a multiple of 128): the Triton kernels widen each tile in registers (w8a16). The (token, slot)
pairs are sorted by expert once; each expert's rows are cut into tiles of BLOCK_M, so a program does one expert's
GEMM tile (decode-sized batches skip the sort: a tile per pair). Two paths: Triton grouped GEMMs (gate/up fused
with SiLU*up, then down with the routing weight, then one combine launch that sums each token's pairs and adds the
shared expert and the residual), and `torch._grouped_mm` where this torch has it. No host sync in either.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from glmserve.model.fp8 import dequantize_fp8_blockwise
from glmserve.model.kernels.paged import dot_precision


@dataclass(frozen=True)
class ExpertRouting:
    """(token, slot) pairs sorted by expert, and the BLOCK_M row tiles of every expert."""

    order: torch.Tensor  # [N*k] flat (token * k + slot) index of each sorted row
    sorted_token: torch.Tensor  # [N*k] int32 token of each sorted row
    counts: torch.Tensor  # [E] rows per expert
    tile_expert: torch.Tensor  # [num_tiles] int32 expert of each tile, -1 for the unused tail
    tile_row_start: torch.Tensor  # [num_tiles] int32 first sorted row of the tile
    tile_row_end: torch.Tensor  # [num_tiles] int32 end of the tile's expert rows


def route_tokens(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertRouting:
    """Sort the (token, slot) pairs by expert and tile them; sized by an upper bound so nothing syncs."""
    num_tokens, k = topk_ids.shape
    flat = topk_ids.flatten().long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    row_offset = torch.cumsum(counts, 0) - counts
    tiles = (counts + block_m - 1) // block_m
    tiles_end = torch.cumsum(tiles, 0)
    tile = torch.arange(triton.cdiv(num_tokens * k, block_m) + num_experts, device=flat.device)
    expert = torch.searchsorted(tiles_end, tile, right=True)
    used = expert < num_experts
    expert = expert.clamp(max=num_experts - 1)
    row_start = row_offset[expert] + (tile - (tiles_end[expert] - tiles[expert])) * block_m
    return ExpertRouting(
        order=order,
        sorted_token=(order // k).to(torch.int32),
        counts=counts,
        tile_expert=torch.where(used, expert, -1).to(torch.int32),
        tile_row_start=row_start.to(torch.int32),
        tile_row_end=(row_offset[expert] + counts[expert]).to(torch.int32),
    )


@triton.jit
def _tile(tile_expert_ptr, tile_row_start_ptr, tile_row_end_ptr, n_limit, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          PAIRS: tl.constexpr):  # fmt: skip
    """This program's tile: its expert (-1: an empty tile), its rows of the expert-sorted pairs and its columns.
    With PAIRS, tile t is (token, slot) pair t alone, unsorted, and tile_expert_ptr holds the flat expert ids."""
    tile = tl.program_id(0)
    if PAIRS:
        offs_m = tile + tl.arange(0, BLOCK_M)
        m_mask = tl.arange(0, BLOCK_M) < 1
    else:
        offs_m = tl.load(tile_row_start_ptr + tile) + tl.arange(0, BLOCK_M)
        m_mask = offs_m < tl.load(tile_row_end_ptr + tile)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.load(tile_expert_ptr + tile).to(tl.int32), offs_m, m_mask, offs_n, offs_n < n_limit


@triton.jit
def _gate_up_silu_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    act_ptr,
    row_token_ptr,
    tile_expert_ptr,
    tile_row_start_ptr,
    tile_row_end_ptr,
    hidden,
    inter,
    stride_xn,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_an,
    top_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PAIRS: tl.constexpr,
    FP8: tl.constexpr,
):
    expert, offs_m, m_mask, offs_n, n_mask = _tile(tile_expert_ptr, tile_row_start_ptr, tile_row_end_ptr, inter,
                                                   BLOCK_M, BLOCK_N, PAIRS)  # fmt: skip
    if expert < 0:
        return
    if PAIRS:
        token = (offs_m // top_k).to(tl.int64)
    else:
        token = tl.load(row_token_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_xn + offs_k[None, :]
    gate_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    up_ptrs = gate_ptrs + inter * stride_wn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = offs_k < hidden - k0
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        gate = tl.load(gate_ptrs + k0, mask=w_mask, other=0.0)
        up = tl.load(up_ptrs + k0, mask=w_mask, other=0.0)
        if FP8:
            scales = scale_ptr + expert.to(tl.int64) * stride_se + k0 // 128
            gate_scale = tl.load(scales + (offs_n // 128) * stride_sn, mask=n_mask, other=0.0)
            up_scale = tl.load(scales + ((offs_n + inter) // 128) * stride_sn, mask=n_mask, other=0.0)
            acc_gate += tl.dot(x, gate.to(x.dtype), input_precision=DOT_PRECISION) * gate_scale[None, :]
            acc_up += tl.dot(x, up.to(x.dtype), input_precision=DOT_PRECISION) * up_scale[None, :]
        else:
            acc_gate = tl.dot(x, gate, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(x, up, acc_up, input_precision=DOT_PRECISION)
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    act_ptrs = act_ptr + offs_m.to(tl.int64)[:, None] * stride_an + offs_n[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    act_ptr,
    w_ptr,
    scale_ptr,
    y_ptr,
    row_order_ptr,
    route_weight_ptr,
    tile_expert_ptr,
    tile_row_start_ptr,
    tile_row_end_ptr,
    inter,
    hidden,
    stride_an,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PAIRS: tl.constexpr,
    FP8: tl.constexpr,
):
    expert, offs_m, m_mask, offs_n, n_mask = _tile(tile_expert_ptr, tile_row_start_ptr, tile_row_end_ptr, hidden,
                                                   BLOCK_M, BLOCK_N, PAIRS)  # fmt: skip
    if expert < 0:
        return
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + offs_m.to(tl.int64)[:, None] * stride_an + offs_k[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_mask = offs_k < inter - k0
        a = tl.load(a_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if FP8:
            scales = scale_ptr + expert.to(tl.int64) * stride_se + (offs_n // 128) * stride_sn + k0 // 128
            scale = tl.load(scales, mask=n_mask, other=0.0)
            acc += tl.dot(a, w.to(a.dtype), input_precision=DOT_PRECISION) * scale[None, :]
        else:
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    # Each sorted row goes back to its (token, slot) place, scaled by its routing weight.
    flat = offs_m if PAIRS else tl.load(row_order_ptr + offs_m, mask=m_mask, other=0)
    acc = acc * tl.load(route_weight_ptr + flat, mask=m_mask, other=0.0)[:, None]
    y_ptrs = y_ptr + flat[:, None] * stride_yn + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class MoeLaunch:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def default_moe_launch(num_rows: int, num_experts: int, itemsize: int = 2) -> MoeLaunch:
    """Tile rows to the average expert load: decode sends a handful of rows per expert, prefill hundreds. fp32 tiles
    take twice the shared memory: shorter K steps and one buffer fewer."""
    rows_per_expert = num_rows / num_experts
    if rows_per_expert <= 16:
        launch = MoeLaunch(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=4)
    elif rows_per_expert <= 64:
        launch = MoeLaunch(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)
    else:
        launch = MoeLaunch(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    if itemsize > 2:
        launch = replace(launch, block_k=min(launch.block_k, 64), num_stages=min(launch.num_stages, 3))
    return launch


@triton.jit
def _combine_kernel(y_ptr, shared_ptr, residual_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_SHARED: tl.constexpr, HAS_RESIDUAL: tl.constexpr):  # fmt: skip
    """out[n] = residual[n] + (sum_j y[n, j] + shared[n]), rounded to the output dtype after each step as the eager
    sum and adds would round."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hidden
    dtype = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (token * TOP_K + j) * hidden + offs, mask=mask, other=0.0).to(tl.float32)
    out = acc.to(dtype)
    if HAS_SHARED:
        out = (out.to(tl.float32) + tl.load(shared_ptr + token * hidden + offs, mask=mask).to(tl.float32)).to(dtype)
    if HAS_RESIDUAL:
        out = (tl.load(residual_ptr + token * hidden + offs, mask=mask).to(tl.float32) + out.to(tl.float32)).to(dtype)
    tl.store(out_ptr + token * hidden + offs, out, mask=mask)


def moe_experts_triton(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    launch: MoeLaunch | None = None,
    shared: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Routed-expert output [N, hidden] through two Triton grouped GEMMs and a combine launch, plus `shared` (the
    shared expert's output) and then `residual` where given; `scales`: the FP8 weights' block scales."""
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w_gate_up.shape
    inter = two_inter // 2
    k = topk_ids.shape[1]
    assert x.stride(-1) == 1 and w_gate_up.stride(-1) == 1 and w_down.stride(-1) == 1
    launch = launch or default_moe_launch(num_tokens * k, num_experts, x.element_size())
    fp8 = scales is not None
    if fp8:
        assert inter % 128 == 0 and 128 % launch.block_k == 0 and 128 % launch.block_n == 0
        gate_up_scale, down_scale = (s.float().contiguous() for s in scales)
    else:
        gate_up_scale = down_scale = w_gate_up  # not read
    # So few pairs that sorting them by expert costs more launches than it saves: a tile per pair, in place.
    pairs = num_tokens * k <= num_experts
    if pairs:
        ids = topk_ids.reshape(-1)
        tiles, row_token, row_order = (ids, ids, ids), ids, ids  # the kernels read the ids alone
    else:
        routing = route_tokens(topk_ids, num_experts, launch.block_m)
        tiles = (routing.tile_expert, routing.tile_row_start, routing.tile_row_end)
        row_token, row_order = routing.sorted_token, routing.order
    num_tiles = tiles[0].numel()
    act = torch.empty(num_tokens * k, inter, dtype=x.dtype, device=x.device)
    _gate_up_silu_kernel[(num_tiles, triton.cdiv(inter, launch.block_n))](
        x, w_gate_up, gate_up_scale, act, row_token, *tiles, hidden, inter, x.stride(0), w_gate_up.stride(0),
        w_gate_up.stride(1), gate_up_scale.stride(0), gate_up_scale.stride(1) if fp8 else 0, act.stride(0), k,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, DOT_PRECISION=dot_precision(x.dtype),
        PAIRS=pairs, FP8=fp8, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    y = torch.empty(num_tokens * k, hidden, dtype=x.dtype, device=x.device)
    route_weight = topk_weights.reshape(-1).float().contiguous()
    _down_kernel[(num_tiles, triton.cdiv(hidden, launch.block_n))](
        act, w_down, down_scale, y, row_order, route_weight, *tiles, inter, hidden, act.stride(0), w_down.stride(0),
        w_down.stride(1), down_scale.stride(0), down_scale.stride(1) if fp8 else 0, y.stride(0),
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, DOT_PRECISION=dot_precision(x.dtype),
        PAIRS=pairs, FP8=fp8, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    out = torch.empty_like(x)
    for name, t in (("shared", shared), ("residual", residual)):
        assert t is None or (t.shape == x.shape and t.is_contiguous()), f"{name} must be a contiguous [N, hidden]"
    block = min(triton.next_power_of_2(hidden), 1024)
    _combine_kernel[(num_tokens, triton.cdiv(hidden, block))](
        y, shared if shared is not None else y, residual if residual is not None else y, out, hidden, TOP_K=k,
        BLOCK=block, HAS_SHARED=shared is not None, HAS_RESIDUAL=residual is not None, num_warps=4,
    )  # fmt: skip
    return out


def moe_experts_grouped_mm(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Routed-expert output through `torch._grouped_mm` (rows gathered in expert order, then scattered back)."""
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w_gate_up.shape
    k = topk_ids.shape[1]
    flat = topk_ids.flatten().long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    rows = x[order // k]
    gate_up = torch._grouped_mm(rows, w_gate_up.transpose(1, 2), offs=offs)
    gate, up = gate_up.split(two_inter // 2, dim=-1)
    down = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs)
    down = down.float() * topk_weights.flatten().float()[order, None]
    out = torch.zeros(num_tokens * k, hidden, dtype=torch.float32, device=x.device).index_copy_(0, order, down)
    return out.view(num_tokens, k, hidden).sum(dim=1).to(x.dtype)


def dequantize_experts(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[E, N, K] e4m3 with [E, N/128, K/128] block scales -> [E, N, K] in `dtype`."""
    return torch.stack([dequantize_fp8_blockwise(w, s, dtype) for w, s in zip(weight, scales, strict=True)])


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def moe_experts_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Per-expert loop (fp32 accumulation of the weighted expert outputs); the CPU fallback and the oracle."""
    num_experts, two_inter, _ = w_gate_up.shape
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in range(num_experts):
        token, slot = (topk_ids == expert).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        gate, up = (x[token] @ w_gate_up[expert].T).split(two_inter // 2, dim=-1)
        y = (F.silu(gate) * up) @ w_down[expert].T
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(x.dtype)


def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    shared: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """residual + (routed-expert output [N, hidden] + shared), each term where given: Triton grouped GEMMs on
    CUDA, the per-expert loop elsewhere (FP8 weights, with their `scales`, dequantized for it)."""
    if x.is_cuda:
        return moe_experts_triton(
            x, topk_ids, topk_weights, w_gate_up, w_down, shared=shared, residual=residual, scales=scales
        )
    if scales is not None:
        w_gate_up, w_down = (
            dequantize_experts(w, s, x.dtype) for w, s in zip((w_gate_up, w_down), scales, strict=True)
        )
    out = moe_experts_reference(x, topk_ids, topk_weights, w_gate_up, w_down)
    out = out if shared is None else out + shared
    return out if residual is None else residual + out

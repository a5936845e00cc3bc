"""Rotary embedding in one kernel: `model/rope.py`'s rotation of a strided slice, computed in fp32 and rounded once.

Eager torch spends about eight launches on one rotation (four products, a difference, a sum, a concatenation, and a
split and concatenation where only the first dims rotate); at decode batch sizes those launches, not their bytes,
are the cost. Torch rounds each product to the input dtype before the sum; this kernel rounds only the result, so
bf16 values can differ from torch's in the last bit (and are the more accurate ones).
"""

import torch
import triton
import triton.language as tl

from glmserve.model.rope import apply_rope


@triton.jit(do_not_specialize=["num_rows"])  # one compile for every batch size
def _rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    num_rows,
    heads,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    stride_c,
    HALF: tl.constexpr,
    REST: tl.constexpr,
    BLOCK_REST: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    token = (rows // heads).to(tl.int64)
    x_row = x_ptr + token * stride_xt + (rows % heads) * stride_xh
    out_row = out_ptr + token * stride_ot + (rows % heads) * stride_oh
    pair = tl.arange(0, HALF)
    if INTERLEAVE:
        first, second = 2 * pair, 2 * pair + 1
    else:
        first, second = pair, pair + HALF
    mask = row_mask[:, None]
    dtype = x_ptr.dtype.element_ty
    x1 = tl.load(x_row[:, None] + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row[:, None] + second[None, :], mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token[:, None] * stride_c + pair[None, :], mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token[:, None] * stride_c + pair[None, :], mask=mask, other=0.0).to(tl.float32)
    rot1 = x1 * cos - x2 * sin
    rot2 = x2 * cos + x1 * sin
    tl.store(out_row[:, None] + pair[None, :], rot1.to(dtype), mask=mask)
    tl.store(out_row[:, None] + HALF + pair[None, :], rot2.to(dtype), mask=mask)
    if REST > 0:
        rest = tl.arange(0, BLOCK_REST)
        rest_mask = mask & (rest < REST)[None, :]
        tail = tl.load(x_row[:, None] + 2 * HALF + rest[None, :], mask=rest_mask, other=0.0)
        tl.store(out_row[:, None] + 2 * HALF + rest[None, :], tail, mask=rest_mask)


def rope_triton(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool, rotary_dim: int | None = None
) -> torch.Tensor:
    """`model.rope.apply_rope` for x [T, D] or [T, H, D] (any strides, unit stride in D) with cos/sin holding one
    row of rotary_dim / 2 angles per token ([T, R/2], or [T, 1, R/2] as broadcast against heads). Returns a new
    contiguous tensor; dims past `rotary_dim` are copied. Other shapes (the batched reference forward) take the
    torch definition."""
    dim = x.shape[-1]
    rotary_dim = dim if rotary_dim is None else rotary_dim
    half = rotary_dim // 2
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    cos2, sin2 = cos.reshape(-1, half), sin.reshape(-1, half)
    fits = x.dim() in (2, 3) and cos2.shape[0] == x3.shape[0] and x.stride(-1) == 1 and half & (half - 1) == 0
    if not fits or cos.dtype != x.dtype or cos2.stride() != sin2.stride() or cos2.stride(-1) != 1:
        return apply_rope(x, cos, sin, interleave, rotary_dim)
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    tokens, heads, _ = x3.shape
    num_rows = tokens * heads
    if num_rows == 0:
        return out.view(x.shape)
    rest = dim - rotary_dim
    block_r = 16
    _rope_kernel[(triton.cdiv(num_rows, block_r),)](
        x3, cos2, sin2, out, num_rows, heads, x3.stride(0), x3.stride(1), out.stride(0), out.stride(1), cos2.stride(0),
        HALF=half, REST=rest, BLOCK_REST=triton.next_power_of_2(max(rest, 1)), INTERLEAVE=interleave,
        BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
    return out.view(x.shape)

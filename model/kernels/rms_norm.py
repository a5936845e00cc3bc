"""RMSNorm in one kernel: statistics in fp32, normalized row rounded to the input dtype, then times the weight, as
`model/norm.py` computes it (eight elementwise launches in eager torch, one here). A second kernel adds the residual
branch first and stores the sum too: the add every sublayer ends with, and the norm the next one starts with."""

import torch
import triton
import triton.language as tl


@triton.jit
def _store_normed(x, w_ptr, out_ptr, row, stride_out, offs, mask, dim, eps, dtype: tl.constexpr):
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    normed = (x * rstd).to(dtype).to(tl.float32)  # the reference rounds before the weight
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, dim, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    _store_normed(x, w_ptr, out_ptr, row, stride_out, offs, mask, dim, eps, x_ptr.dtype.element_ty)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, delta_ptr, w_ptr, sum_ptr, out_ptr, stride_x, stride_delta, stride_out, dim, eps, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + row * stride_delta + offs, mask=mask, other=0.0).to(tl.float32)
    total = (x + delta).to(sum_ptr.dtype.element_ty)  # rounded as the eager add rounds
    tl.store(sum_ptr + row * dim + offs, total, mask=mask)
    _store_normed(total.to(tl.float32), w_ptr, out_ptr, row, stride_out, offs, mask, dim, eps, total.dtype)


def _launch_shape(dim: int) -> dict:
    block = triton.next_power_of_2(dim)
    return dict(BLOCK=block, num_warps=8 if block >= 4096 else 4)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., dim] (2-D rows may be strided) -> the promoted dtype of x and weight."""
    dim = x.shape[-1]
    assert weight.shape == (dim,)
    rows = x if x.dim() == 2 and x.stride(-1) == 1 else x.reshape(-1, dim)
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows.shape[0] == 0:
        return out.view(x.shape)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), dim, eps, **_launch_shape(dim))
    return out.view(x.shape)


def add_rms_norm_triton(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta)) for rows x, delta [N, dim] of one dtype, in one launch."""
    num_rows, dim = x.shape
    assert delta.shape == x.shape and delta.dtype == x.dtype and weight.shape == (dim,)
    assert x.stride(-1) == 1 and delta.stride(-1) == 1
    total = torch.empty(num_rows, dim, dtype=x.dtype, device=x.device)
    out = torch.empty(num_rows, dim, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if num_rows:
        _add_rms_norm_kernel[(num_rows,)](
            x, delta, weight, total, out, x.stride(0), delta.stride(0), out.stride(0), dim, eps, **_launch_shape(dim)
        )
    return total, out

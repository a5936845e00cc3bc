"""RMSNorm in one kernel: statistics in fp32, normalized row rounded to the input dtype, then times the weight, as
`model/norm.py` computes it (eight elementwise launches in eager torch, one here)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, dim, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference rounds before the weight
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., dim] (2-D rows may be strided) -> the promoted dtype of x and weight."""
    dim = x.shape[-1]
    assert weight.shape == (dim,)
    rows = x if x.dim() == 2 and x.stride(-1) == 1 else x.reshape(-1, dim)
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows.shape[0] == 0:
        return out.view(x.shape)
    block = triton.next_power_of_2(dim)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, weight, out, rows.stride(0), out.stride(0), dim, eps, BLOCK=block, num_warps=8 if block >= 4096 else 4
    )
    return out.view(x.shape)

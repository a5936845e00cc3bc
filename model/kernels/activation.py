"""SwiGLU's activation, silu(gate) * up, in one launch (two in eager torch), rounded as eager torch rounds: after
the SiLU and after the product."""

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, stride_gate, stride_up, dim, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim
    gate = tl.load(gate_ptr + row * stride_gate + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * dim + offs, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up [..., dim] (rows may be strided: the halves of one gate-up GEMM's output)."""
    assert gate.shape == up.shape and gate.dtype == up.dtype
    shape, dim = gate.shape, gate.shape[-1]
    gate, up = gate.reshape(-1, dim), up.reshape(-1, dim)
    assert gate.stride(-1) == 1 and up.stride(-1) == 1
    num_rows = gate.shape[0]
    out = torch.empty(num_rows, dim, dtype=gate.dtype, device=gate.device)
    block = min(triton.next_power_of_2(dim), 2048)
    if num_rows:
        _silu_mul_kernel[(num_rows, triton.cdiv(dim, block))](
            gate, up, out, gate.stride(0), up.stride(0), dim, BLOCK=block, num_warps=4
        )
    return out.view(shape)

"""y = x @ W^T for W kept in FP8 e4m3 with one fp32 scale per 128x128 block (the checkpoint's `weight_scale_inv`).

Two ways, chosen per call by the number of rows M (`model/fp8_linear.py`):
- few rows (decode): `fp8_gemm_small_m_triton` reads the FP8 weight once, each 128x128 tile widened to the
  activation dtype and scaled in registers; the activations stay bf16 (w8a16). Memory-bound: what counts is reading
  one byte per weight. cuBLAS's blockwise kernel refuses M=1;
- many rows (prefill): `fp8_gemm_blockwise` quantizes the activations per token per 128 channels (1x128 scales, as
  DeepSeek-V3 trains them) and runs cuBLAS's blockwise-scaled FP8 GEMM through `torch.nn.functional.scaled_mm`.
`fp8_gemm_reference` dequantizes and multiplies: the definition, and the CPU path.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..fp8 import BLOCK, dequantize_fp8_blockwise


def fp8_gemm_reference(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) -> [M, N] in x's dtype, through the dequantized weight."""
    return F.linear(x, dequantize_fp8_blockwise(weight, scale_inv, x.dtype))


@triton.jit
def _fp8_gemm_small_m_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_om, NUM_K_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, FP32: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_N (= the scale block) output columns of BLOCK_M rows, over its share of the K blocks.
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(pid_k, NUM_K_BLOCKS, SPLIT_K):
        k = kb * BLOCK_K + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + k[:, None], mask=(rn[None, :] < N) & (k[:, None] < K), other=0.0)
        scale = tl.load(s_ptr + pid_n * stride_sn + kb)
        if FP32:  # fp32 activations (tests, the reference dtype): full-precision products, not tf32
            acc += tl.dot(x, w.to(tl.float32), input_precision="ieee") * scale
        else:
            acc += tl.dot(x, w.to(x.dtype)) * scale
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


def fp8_gemm_small_m_triton(
    x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, split_k: int = 1, num_warps: int = 4
) -> torch.Tensor:
    """x [M, K] fp32/fp16/bf16 (rows strided, unit stride in K) -> [M, N] in x's dtype. `split_k` > 1 spreads the
    K blocks of a column block over that many programs (accumulated in fp32), for shapes with few column blocks."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1 and x.stride(1) == 1
    assert scale_inv.shape == (triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK))
    block_m = 16
    num_k_blocks = triton.cdiv(k, BLOCK)
    split_k = max(1, min(split_k, num_k_blocks))
    out = (
        torch.empty(m, n, dtype=x.dtype, device=x.device)
        if split_k == 1
        else torch.zeros(m, n, dtype=torch.float32, device=x.device)
    )
    grid = (triton.cdiv(n, BLOCK), triton.cdiv(m, block_m), split_k)
    scale = scale_inv.float().contiguous()
    _fp8_gemm_small_m_kernel[grid](
        x, weight, scale, out, m, n, k, x.stride(0), weight.stride(0), scale.stride(0), out.stride(0), num_k_blocks,
        BLOCK_M=block_m, BLOCK_N=BLOCK, BLOCK_K=BLOCK, SPLIT_K=split_k, FP32=x.dtype == torch.float32,
        num_warps=num_warps,
    )  # fmt: skip
    return out if split_k == 1 else out.to(x.dtype)


@triton.jit
def _quantize_groups_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, GROUPS: tl.constexpr, GROUP: tl.constexpr):
    # One row's GROUPS consecutive 128-channel groups: amax, scale, e4m3 values; the scales land M-major.
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / 448.0  # e4m3's largest finite value
    tl.store(q_ptr + row * K + cols, (x / scale[:, None]).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + g * M + row, scale, mask=g * GROUP < K)


def quantize_fp8_groups_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8.quantize_fp8_groups` in one pass: (e4m3 [M, K], fp32 scales [M, K/128] stored M-major, as cuBLAS
    reads them)."""
    m, k = x.shape
    assert k % BLOCK == 0 and x.stride(1) == 1
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(k // BLOCK, m, dtype=torch.float32, device=x.device)
    groups = 8
    _quantize_groups_kernel[(m, triton.cdiv(k // BLOCK, groups))](
        x, q, scales, m, k, x.stride(0), GROUPS=groups, GROUP=BLOCK, num_warps=4
    )
    return q, scales.t()


def fp8_gemm_blockwise(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 -> [M, N] bf16 through cuBLAS's blockwise FP8 GEMM (CUDA; `fp8.blockwise_supported` shapes). It
    reads the activation scales M-major ([K/128, M] transposed) and the weight's as the transpose of how checkpoints
    store them (found on the H200, torch 2.11: every other layout is refused)."""
    q, x_scale = quantize_fp8_groups_triton(x)
    return torch.nn.functional.scaled_mm(
        q,
        weight.t(),
        x_scale,
        torch.nn.functional.ScalingType.BlockWise1x128,
        scale_inv.t(),
        torch.nn.functional.ScalingType.BlockWise128x128,
        output_dtype=x.dtype,
    )

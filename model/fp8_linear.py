"""A Linear whose weight stays FP8 e4m3 with its 128x128 block scales, as the checkpoint ships it (no bf16 copy).

The GEMM is chosen per call: on CUDA, a Triton w8a16 kernel for few rows (decode) and cuBLAS's blockwise-scaled FP8
GEMM for many (prefill), the crossover `SCALED_MM_MIN_ROWS` measured on the H200 (`glmserve bench fp8`); elsewhere
(CPU tests) the weight is dequantized on the fly, block by block, into the activation dtype.
"""

import torch
from torch import nn

from .fp8 import BLOCK, blockwise_supported, dequantize_fp8_blockwise

# From this many rows up, the blockwise cuBLAS GEMM beats the Triton kernel (docs/benchmarks.md, FP8 GEMM table).
SCALED_MM_MIN_ROWS = 64


class Fp8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16):
        """`dtype`: what activations and outputs are in (and what `dequantized` returns)."""
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        blocks = (-(-out_features // BLOCK), -(-in_features // BLOCK))
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn), False)
        self.weight_scale_inv = nn.Parameter(torch.empty(blocks, dtype=torch.float32), False)
        self.blockwise = blockwise_supported(out_features, in_features)

    @classmethod
    def like(cls, linear: nn.Linear, dtype: torch.dtype) -> "Fp8Linear":
        """An (empty) FP8 twin of a bias-free Linear, on the same device (meta while a model is being loaded)."""
        if linear.bias is not None:
            raise ValueError("FP8 block-quantized layers have no bias")
        with torch.device(linear.weight.device):
            return cls(linear.in_features, linear.out_features, dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight in `dtype` (for the few places that need it whole: MLA's absorbed per-head matrices)."""
        return dequantize_fp8_blockwise(self.weight, self.weight_scale_inv, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        if x.device.type != "cuda":
            from .kernels.fp8_gemm import fp8_gemm_reference

            out = fp8_gemm_reference(rows, self.weight, self.weight_scale_inv)
        elif rows.shape[0] >= SCALED_MM_MIN_ROWS and self.blockwise:
            from .kernels.fp8_gemm import fp8_gemm_blockwise

            out = fp8_gemm_blockwise(rows, self.weight, self.weight_scale_inv)
        else:
            from .kernels.fp8_gemm import fp8_gemm_small_m_triton

            out = fp8_gemm_small_m_triton(rows, self.weight, self.weight_scale_inv)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3, 128x128 block scales"


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """A Linear's weight as a plain matrix, whether it is kept in FP8 or not."""
    return linear.dequantized() if isinstance(linear, Fp8Linear) else linear.weight

"""FP8 e4m3 weights with one fp32 `weight_scale_inv` per 128x128 block, as DeepSeek-V3 and GLM-5 checkpoints ship."""

import torch

BLOCK = 128


def dequantize_fp8_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w = fp8 * scale_inv, the scale broadcast over its 128x128 block (edge blocks may be partial)."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def quantize_fp8_blockwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `dequantize_fp8_blockwise`: (e4m3 weight, fp32 scale_inv [ceil(rows/128), ceil(cols/128)])."""
    rows, cols = weight.shape
    pad_r, pad_c = -rows % BLOCK, -cols % BLOCK
    w = torch.nn.functional.pad(weight.float(), (0, pad_c, 0, pad_r))
    blocks = w.view((rows + pad_r) // BLOCK, BLOCK, (cols + pad_c) // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(rows + pad_r, cols + pad_c)[:rows, :cols].contiguous(), scale_inv


def quantize_fp8_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, K] (K a multiple of 128) -> (e4m3 [M, K], fp32 scales [M, K/128]): one scale per token per
    128 channels, computed on the fly (DeepSeek-V3's dynamic 1x128 activation scaling)."""
    rows, cols = x.shape
    groups = x.float().view(rows, cols // BLOCK, BLOCK)
    scale = groups.abs().amax(-1).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    q = (groups / scale[..., None]).to(torch.float8_e4m3fn)
    return q.view(rows, cols), scale


def blockwise_supported(out_features: int, in_features: int) -> bool:
    """Whether cuBLAS's blockwise FP8 GEMM takes a weight of this shape: whole 128-blocks, and along K a multiple of
    4 of them (on the H200, torch 2.11, it refuses K=768)."""
    return out_features % BLOCK == 0 and in_features % (4 * BLOCK) == 0

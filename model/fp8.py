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

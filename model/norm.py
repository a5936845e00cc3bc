"""RMSNorm as transformers' GLM-5 computes it (statistics in fp32, weight applied in the input dtype)."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    fused = False  # set at load for serving (model/fusion.py): one Triton kernel per call

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from .kernels.rms_norm import rms_norm_triton

            return rms_norm_triton(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, the norm of it): a residual add and the norm after it (one launch on the fused path)."""
        if self.fused:
            from .kernels.rms_norm import add_rms_norm_triton

            return add_rms_norm_triton(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)

"""SwiGLU feed-forward: the dense MLP of the first layers, each routed expert and the shared expert."""

import torch
import torch.nn.functional as F
from torch import nn


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class MLP(nn.Module):
    # set at load for serving (model/fusion.py): gate and up packed [2 * intermediate, hidden] for one GEMM, and
    # the activation in one kernel
    gate_up: torch.Tensor | None = None
    fused = False

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        if self.fused:
            from .kernels.activation import silu_mul_triton

            return self.down_proj(silu_mul_triton(gate, up))
        return self.down_proj(silu_mul(gate, up))

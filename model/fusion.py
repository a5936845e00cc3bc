"""The serving form of a loaded model: weights packed for fewer GEMMs and Triton kernels chosen, once, at load.

A model loaded without it is the reference (plain PyTorch, the definition the fast paths are checked against); a
model loaded with it computes the same function in fewer launches. Nothing is patched afterwards: each module reads
what `fuse` set (`fused`, `a_proj`, `gate_up`, `packed`) in its own forward.

- MLA's two down-projections and gate and up of every dense MLP and shared expert: one GEMM each (at decode batch
  sizes a GEMM is a launch of a few microseconds whatever its size);
- the routed experts of each MoE layer: packed for one grouped GEMM (FP8 experts with their block scales);
- chains of small elementwise launches: one Triton kernel each (RMSNorm, residual add + RMSNorm, rotary
  embedding, SwiGLU's activation, the routers' selection where n_group is 1).
"""

import torch
from torch import nn

from .attention_backend import TritonAttention
from .config import GlmConfig
from .fp8 import BLOCK
from .fp8_linear import Fp8Linear
from .glm import GlmForCausalLM
from .indexer import Indexer
from .mla import MLA
from .mlp import MLP
from .moe import MoE, Router
from .norm import RMSNorm


def fusable(config: GlmConfig, device: torch.device) -> bool:
    """Whether the fused path runs here: on CUDA, for dims the Triton kernels take."""
    return device.type == "cuda" and TritonAttention.supports(config)


def fuse(model: GlmForCausalLM) -> GlmForCausalLM:
    """Pack `model`'s weights and switch its modules to their kernels, in place; returns it."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.a_proj = pack_linears([attn.q_a_proj, attn.kv_a_proj_with_mqa])
            mlp = layer.mlp.shared_experts if isinstance(layer.mlp, MoE) else layer.mlp
            if isinstance(mlp, MLP):
                mlp.gate_up = pack_linears([mlp.gate_proj, mlp.up_proj])
            if isinstance(layer.mlp, MoE):
                _pack_experts(layer.mlp)
    for module in model.modules():
        if isinstance(module, RMSNorm | MLP | MLA | Indexer) or (isinstance(module, Router) and module.n_group == 1):
            module.fused = True
    model.fused = True
    return model


def graph_safe(model: GlmForCausalLM) -> bool:
    """Whether a step can be captured as a CUDA graph: every MoE layer runs the grouped kernels (the experts' own
    modules route with a host sync)."""
    return all(layer.mlp.packed is not None for layer in model.model.layers if isinstance(layer.mlp, MoE))


def pack_linears(linears: list[nn.Linear]) -> torch.Tensor | None:
    """One [sum of out_features, in_features] weight for bias-free Linears of the same input, each Linear's weight
    pointed at its rows (the weights exist once); None where a bias or a subclass (a parallel layer) forbids it."""
    if any(type(lin) is not nn.Linear or lin.bias is not None for lin in linears):
        return None
    with torch.no_grad():
        packed = torch.cat([lin.weight for lin in linears])
        begin = 0
        for lin in linears:
            lin.weight = nn.Parameter(packed[begin : begin + lin.out_features], requires_grad=False)
            begin += lin.out_features
    return packed


def _pack_experts(moe: MoE) -> None:
    """MoE.packed = (w_gate_up [E, 2I, hidden], w_down [E, hidden, I]), the layout the grouped GEMM reads, and for
    FP8 experts MoE.packed_scales the same for their block scales. The expert modules are pointed at views of them,
    so the weights exist once (a layer's experts are briefly held twice while packing)."""
    first = moe.experts[0].gate_proj
    fp8 = isinstance(first, Fp8Linear)
    if fp8 and first.out_features % BLOCK:
        return  # gate and up would share a scale block: they stay apart, run by the expert modules
    moe.packed = _stack(moe, "weight")
    if fp8:
        moe.packed_scales = _stack(moe, "weight_scale_inv")


def _stack(moe: MoE, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's gate and up `name` tensors stacked along rows, then all experts; likewise down."""
    gate, down = getattr(moe.experts[0].gate_proj, name), getattr(moe.experts[0].down_proj, name)
    rows = gate.shape[0]
    gate_up = gate.new_empty(len(moe.experts), 2 * rows, gate.shape[1])
    down_all = down.new_empty(len(moe.experts), *down.shape)
    for e, expert in enumerate(moe.experts):
        gate_up[e, :rows] = getattr(expert.gate_proj, name)
        gate_up[e, rows:] = getattr(expert.up_proj, name)
        down_all[e] = getattr(expert.down_proj, name)
        setattr(expert.gate_proj, name, nn.Parameter(gate_up[e, :rows], requires_grad=False))
        setattr(expert.up_proj, name, nn.Parameter(gate_up[e, rows:], requires_grad=False))
        setattr(expert.down_proj, name, nn.Parameter(down_all[e], requires_grad=False))
    return gate_up, down_all

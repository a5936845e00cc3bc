"""The serving form of a loaded model: weights packed for fewer GEMMs and Triton kernels chosen, once, at load.

A model loaded without it is the reference (plain PyTorch, the definition the fast paths are checked against); a
model loaded with it computes the same function in fewer launches. Nothing is patched afterwards: each module reads
what `fuse` set (`fused`, `a_proj`, `gate_up`, `packed`) in its own forward.

- MLA's two down-projections and gate and up of every dense MLP and shared expert: one GEMM each (at decode batch
  sizes a GEMM is a launch of a few microseconds whatever its size);
- the routed experts of each MoE layer: packed for one grouped GEMM (bf16 experts; FP8 ones run as Fp8Linear);
- chains of small elementwise launches: one Triton kernel each (RMSNorm, residual add + RMSNorm, rotary
  embedding, SwiGLU's activation, the routers' selection where n_group is 1).
"""

import torch
from torch import nn

from .attention_backend import TritonAttention
from .config import GlmConfig
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
            if isinstance(layer.mlp, MoE) and type(layer.mlp.experts[0].gate_proj) is nn.Linear:
                layer.mlp.packed = _pack_experts(layer.mlp)  # FP8 experts keep their own weights and scales
    for module in model.modules():
        if isinstance(module, RMSNorm | MLP | MLA | Indexer) or (isinstance(module, Router) and module.n_group == 1):
            module.fused = True
    model.fused = True
    return model


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


def _pack_experts(moe: MoE) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_gate_up [E, 2I, hidden], w_down [E, hidden, I]), the layout the grouped GEMM reads; the expert modules are
    pointed at views of them, so the weights exist once (a layer's experts are briefly held twice while packing)."""
    inter, hidden = moe.experts[0].gate_proj.weight.shape
    like = moe.experts[0].gate_proj.weight
    gate_up = like.new_empty(len(moe.experts), 2 * inter, hidden)
    down = like.new_empty(len(moe.experts), hidden, inter)
    for e, expert in enumerate(moe.experts):
        gate_up[e, :inter] = expert.gate_proj.weight
        gate_up[e, inter:] = expert.up_proj.weight
        down[e] = expert.down_proj.weight
        expert.gate_proj.weight = nn.Parameter(gate_up[e, :inter], requires_grad=False)
        expert.up_proj.weight = nn.Parameter(gate_up[e, inter:], requires_grad=False)
        expert.down_proj.weight = nn.Parameter(down[e], requires_grad=False)
    return gate_up, down

"""Mixture of experts with sigmoid `noaux_tc` routing (DeepSeek-V3 / GLM-5)."""

import torch
from torch import nn

from .config import GlmConfig
from .mlp import MLP


class Router(nn.Module):
    """Sigmoid scores; the correction bias steers the choice but not the weights; group-limited top-k."""

    fused = False  # set at load for serving (model/fusion.py) where n_group is 1: the selection in one kernel

    def __init__(self, config: GlmConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (expert ids [N, top_k], fp32 weights [N, top_k])."""
        return self.route(x.float() @ self.weight.float().t())

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits [N, E] -> the routing."""
        if self.fused:
            from .kernels.router import route_triton

            return route_triton(logits, self.e_score_correction_bias, self.top_k, self.norm_topk_prob, self.scaling)
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            grouped = choice.unflatten(-1, (self.n_group, -1))
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(-1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(-2)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


def shared_experts(config: GlmConfig) -> MLP | None:
    """The always-on expert(s), fused into one MLP n_shared_experts times as wide (the Hub stores them so)."""
    if not config.n_shared_experts:
        return None
    return MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)


class MoE(nn.Module):
    # set at load for serving (model/fusion.py): the routed experts packed as (w_gate_up [E, 2I, hidden],
    # w_down [E, hidden, I]) for the grouped GEMM (each expert's weights are views of them)
    packed: tuple[torch.Tensor, torch.Tensor] | None = None
    packed_scales: tuple[torch.Tensor, torch.Tensor] | None = None  # their 128x128 block scales, for FP8 experts

    def __init__(self, config: GlmConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.gate = Router(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.shared_experts = shared_experts(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, weights = self.gate(x)
        out = torch.zeros_like(x)
        # Visit only the experts some token picked; tokens are grouped per expert with one sort.
        order = ids.flatten().argsort(stable=True)
        counts = torch.bincount(ids.flatten(), minlength=self.n_experts).tolist()
        token_of = order // ids.shape[1]
        start = 0
        for e, count in enumerate(counts):
            if count:
                sel = order[start : start + count]
                tokens = token_of[start : start + count]
                y = self.experts[e](x[tokens]) * weights.flatten()[sel, None]
                out.index_add_(0, tokens, y.to(x.dtype))
            start += count
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)

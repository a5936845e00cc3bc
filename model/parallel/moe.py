"""Expert-parallel MoE: routed experts split over the EP group; tokens travel to their experts' ranks and back
through all-to-all.

The input is the same on every rank of the replica (it follows attention's all-reduce). Each rank routes only its
own 1/world slice of the tokens, so no expert runs twice on a token, and the slices are all-gathered at the end.
The router and the shared expert are replicated; the shared expert runs on the rank's slice only.
"""

import torch
from torch import nn

from ..config import GlmConfig
from ..mlp import MLP
from ..moe import Router, shared_experts
from .comm import ParallelContext


class ExpertParallelMoE(nn.Module):
    def __init__(self, config: GlmConfig, ctx: ParallelContext):
        super().__init__()
        self.ep, self.world = ctx.ep, ctx.world
        self.n_experts = config.n_routed_experts
        self.experts_per_rank = self.n_experts // self.ep.size
        first = self.ep.rank * self.experts_per_rank
        self.gate = Router(config)
        # Keyed by global expert id, so parameter names are the checkpoint's (mlp.experts.{e}.*).
        self.experts = nn.ModuleDict(
            {
                str(e): MLP(config.hidden_size, config.moe_intermediate_size)
                for e in range(first, first + self.experts_per_rank)
            }
        )
        self.shared_experts = shared_experts(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        slices = tokens.tensor_split(self.world.size)
        mine = slices[self.world.rank]
        out = self._routed(mine)
        if self.shared_experts is not None:
            out = out + self.shared_experts(mine)
        return self.world.all_gather_rows(out, [len(s) for s in slices]).view(shape)

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        # (token, choice) pairs sorted by expert: that also groups them by the rank owning the expert.
        order = ids.flatten().argsort(stable=True)
        token_of = order // ids.shape[1]
        per_expert = torch.bincount(ids.flatten(), minlength=self.n_experts).view(self.ep.size, self.experts_per_rank)
        # Each owner learns how many rows per local expert it gets from each source, which also tells it the
        # expert of every received row (rows arrive sorted by expert within each source).
        recv_per_expert = self.ep.all_to_all(per_expert, [1] * self.ep.size, [1] * self.ep.size)
        send_rows, recv_rows = per_expert.sum(1).tolist(), recv_per_expert.sum(1).tolist()
        received = self.ep.all_to_all(x[token_of], send_rows, recv_rows)
        results = self.ep.all_to_all(self._run_local_experts(received, recv_per_expert), recv_rows, send_rows)
        out = torch.zeros_like(x)
        out.index_add_(0, token_of, (results * weights.flatten()[order, None]).to(x.dtype))
        return out

    def _run_local_experts(self, rows: torch.Tensor, per_expert: torch.Tensor) -> torch.Tensor:
        """rows: what each source sent, source after source, each sorted by expert; per_expert [sources, local]."""
        local_expert = torch.arange(self.experts_per_rank, device=rows.device).repeat(per_expert.shape[0])
        by_expert = local_expert.repeat_interleave(per_expert.flatten()).argsort(stable=True)
        out = torch.empty_like(rows)
        for expert, picked in zip(self.experts.values(), by_expert.split(per_expert.sum(0).tolist()), strict=True):
            if len(picked):
                out[picked] = expert(rows[picked])
        return out

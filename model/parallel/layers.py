"""Linear and embedding layers whose weights are split over a tensor-parallel group.

Each keeps the name and the per-rank shape of the layer it replaces, so checkpoint names still match and a rank's
slice of a checkpoint tensor is found by comparing shapes (see `parallel/weights.py`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .comm import Comm


class RowParallelLinear(nn.Linear):
    """Input features split over the group (o_proj after head-split attention, down_proj after a width-split MLP):
    each rank's partial product is summed by an all-reduce; the replicated bias is added once, after the sum."""

    def __init__(self, in_features_per_rank: int, out_features: int, bias: bool, comm: Comm):
        super().__init__(in_features_per_rank, out_features, bias=bias)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.comm.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Each rank holds a contiguous 1/size of the vocabulary's rows; a token's row comes from its owner through an
    all-reduce in which the other ranks add zeros (so the sum is exact)."""

    def __init__(self, vocab_size: int, hidden_size: int, comm: Comm):
        super().__init__(vocab_size // comm.size, hidden_size)
        self.first_id = comm.rank * self.num_embeddings
        self.comm = comm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.first_id
        owned = (local >= 0) & (local < self.num_embeddings)
        rows = super().forward(local.clamp(0, self.num_embeddings - 1))
        return self.comm.all_reduce(rows.masked_fill(~owned[..., None], 0))


class VocabParallelLMHead(nn.Linear):
    """Each rank scores its contiguous 1/size of the vocabulary; the slices are gathered so every rank holds the
    full logits (a sampler could instead reduce per slice; full logits keep the reference forward's contract)."""

    def __init__(self, hidden_size: int, vocab_size: int, comm: Comm):
        super().__init__(hidden_size, vocab_size // comm.size, bias=False)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(super().forward(x), dim=-1)

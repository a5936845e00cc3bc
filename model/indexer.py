"""The DSA lightning indexer: picks, per query, the `index_topk` keys sparse attention will read.

score[s, t] = sum_h w[s, h] * relu(q[s, h] . k[t]) over causal keys t <= s. Only "full" layers own an indexer;
IndexShare ("shared") layers reuse the top-k of the nearest full layer before them.
"""

import torch
from torch import nn

from .config import GlmConfig
from .rope import rotate


class Indexer(nn.Module):
    fused = False  # set at load for serving (model/fusion.py): rope in one kernel

    def __init__(self, config: GlmConfig):
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.interleave = config.indexer_rope_interleave
        self.topk = config.index_topk
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)

    def queries(self, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[..., n_heads, head_dim] from q_resid = q_a_layernorm(q_a_proj(x)); cos/sin shaped [..., rope_dim/2]."""
        q = self.wq_b(q_resid).unflatten(-1, (self.n_heads, self.head_dim))
        # Unlike MLA, the indexer ropes the FIRST rope_dim dims of its heads.
        return rotate(q, cos.unsqueeze(-2), sin.unsqueeze(-2), self.interleave, self.rope_dim, self.fused)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One key per token, [..., head_dim]: what the indexer-key cache stores."""
        return rotate(self.k_norm(self.wk(x)), cos, sin, self.interleave, self.rope_dim, self.fused)

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-query head weights [..., n_heads] in fp32, with the n_heads^-0.5 scale folded in."""
        return self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads**-0.5


def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Head-weighted ReLU scores in fp32: q [..., S, H, D], k [..., T, D], w [..., S, H] -> [..., S, T].

    Materializes [S, H, T]: this is the readable definition; model/kernels holds the fused one.
    """
    logits = torch.einsum("...shd,...td->...sht", q.float(), k.float()) * q.shape[-1] ** -0.5
    return torch.einsum("...sh,...sht->...st", w, logits.relu())


def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best scores along the last dim; among equal scores the earlier position wins.

    ReLU makes exact ties common (a key every head scores <= 0 gets exactly 0), and torch.topk breaks ties
    differently for different row lengths; a fixed rule makes the choice independent of how queries are batched.
    """
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def causal_topk_mask(scores: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, topk: int) -> torch.Tensor:
    """Boolean [..., S, T]: key t is causal for query s and among its `topk` best scores.

    With <= topk causal keys every causal key is kept, so attention is dense there.
    """
    causal = k_pos[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~causal, float("-inf"))
    k = min(topk, scores.shape[-1])
    chosen = torch.zeros_like(causal.expand_as(scores)).scatter(-1, topk_positions(scores, k), True)
    return chosen & causal

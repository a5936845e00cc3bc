"""Multi-head latent attention (MLA) with DSA sparse selection: weights, projections and the reference attention.

The projections are shared by every attention path. The reference path here expands the latent into per-head keys
and values over a whole sequence with a boolean mask; the engine's paged paths attend in the absorbed latent space.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import GlmConfig
from .fp8_linear import dense_weight
from .indexer import Indexer
from .norm import RMSNorm
from .rope import rotate


@dataclass
class MLAProjections:
    """Per-token projections of one attention layer's input."""

    q_nope: torch.Tensor  # [..., H, qk_nope]
    q_rope: torch.Tensor  # [..., H, qk_rope], roped
    latent: torch.Tensor  # [..., kv_lora], normalized: the cached part
    k_rope: torch.Tensor  # [..., qk_rope], roped: cached next to the latent
    q_resid: torch.Tensor  # [..., q_lora]: the indexer's query input


class MLA(nn.Module):
    # set at load for serving (model/fusion.py): q_a_proj's and kv_a_proj_with_mqa's weights packed
    # [q_lora + kv_lora + rope, hidden] for one GEMM (their weights are views of it), and rope in one kernel
    a_proj: torch.Tensor | None = None
    fused = False

    def __init__(self, config: GlmConfig, has_indexer: bool):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.interleave = config.rope_interleave
        self.scale = config.softmax_scale
        bias = config.attention_bias
        self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=bias)
        self.q_a_layernorm = RMSNorm(config.q_lora_rank)
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, config.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, config.hidden_size, bias=bias)
        self.indexer = Indexer(config) if has_indexer else None

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> MLAProjections:
        """x [..., hidden]; cos/sin [..., rope_dim / 2] for each token's position."""
        if self.a_proj is None:
            q_a, kv_a = self.q_a_proj(x), self.kv_a_proj_with_mqa(x)
        else:
            q_a, kv_a = F.linear(x, self.a_proj).split(
                [self.q_a_proj.out_features, self.kv_lora_rank + self.rope_dim], dim=-1
            )
        q_resid = self.q_a_layernorm(q_a)
        q = self.q_b_proj(q_resid).unflatten(-1, (self.n_heads, self.nope_dim + self.rope_dim))
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return MLAProjections(
            q_nope=q_nope,
            q_rope=rotate(q_rope, cos.unsqueeze(-2), sin.unsqueeze(-2), self.interleave, fused=self.fused),
            latent=self.kv_a_layernorm(latent),
            k_rope=rotate(k_rope, cos, sin, self.interleave, fused=self.fused),
            q_resid=q_resid,
        )

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_uk [H, nope, kv_lora], W_uv [H, v, kv_lora]): kv_b_proj split per head, for latent-space attention."""
        w = dense_weight(self.kv_b_proj).view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def reference_attention(self, p: MLAProjections, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expanded (non-absorbed) attention over whole sequences: p from [B, T], mask [B, S, T] -> (output
        [B, S, H*v], fp32 probabilities [B, H, S, T])."""
        kv = self.kv_b_proj(p.latent).unflatten(-1, (self.n_heads, self.nope_dim + self.v_dim))
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        scores = torch.einsum("bshd,bthd->bhst", p.q_nope, k_nope) + torch.einsum("bshd,btd->bhst", p.q_rope, p.k_rope)
        scores = (scores * self.scale).masked_fill(~mask[:, None], float("-inf"))
        probs = scores.softmax(-1, dtype=torch.float32)
        return torch.einsum("bhst,bthd->bshd", probs.to(v.dtype), v).flatten(-2), probs

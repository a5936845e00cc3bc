"""The GLM-5.x network (`GlmMoeDsaForCausalLM`) and its full-sequence reference forward.

Module names follow the Hub checkpoint layout, so loading is a name-for-name copy. The reference forward takes no
cache and materializes [T, T] masks: it is the definition every fast path is checked against, not a serving path.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .config import GlmConfig
from .indexer import causal_topk_mask, index_scores
from .mla import MLA
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm
from .rope import rope_cos_sin


@dataclass
class AttentionTrace:
    """What a reference attention block computed on the way, for training (the indexer's KL target)."""

    probs: torch.Tensor  # [B, H, S, T] fp32 attention probabilities
    index_scores: torch.Tensor | None  # [B, S, T] fp32, on layers with an indexer


class DecoderLayer(nn.Module):
    def __init__(self, config: GlmConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.topk = config.index_topk
        self.self_attn = MLA(config, has_indexer=config.is_full_indexer_layer(layer_idx))
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def reference_forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        shared_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> (x, the sparse mask [B, T, T] this layer used, for the shared layers after it)."""
        x, mask, _ = self.reference_attention(x, positions, cos, sin, shared_mask)
        return x + self.mlp(self.post_attention_layernorm(x)), mask

    def reference_attention(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        shared_mask: torch.Tensor | None,
        dense: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionTrace]:
        """The residual stream after attention: (x + attention, its mask [B, T, T], the trace). A layer with an
        indexer attends to its causal top-k, a shared layer to `shared_mask` (IndexShare); `dense`: every layer to
        all causal keys (the indexer still scores them: training's dense phase)."""
        h = self.input_layernorm(x)
        attn = self.self_attn
        p = attn.project(h, cos, sin)
        scores = None
        if attn.indexer is not None:
            indexer, dtype = attn.indexer, attn.indexer.k_norm.weight.dtype
            # In its weights' dtype even under autocast (fp32 in training, as at inference), on detached inputs:
            # in training only the indexer's own KL loss moves it.
            with torch.autocast(x.device.type, enabled=False):
                h_in, q_in, cos_in, sin_in = (t.detach().to(dtype) for t in (h, p.q_resid, cos, sin))
                q, k = indexer.queries(q_in, cos_in, sin_in), indexer.keys(h_in, cos_in, sin_in)
                scores = index_scores(q, k, indexer.head_weights(h_in))
        if dense:
            mask = (positions[None, :] <= positions[:, None]).expand(x.shape[0], -1, -1)
        elif scores is not None:
            mask = causal_topk_mask(scores.detach(), positions, positions, self.topk)
        elif shared_mask is not None:
            mask = shared_mask
        else:
            raise ValueError(f"layer {self.layer_idx} shares top-k but no layer with an indexer ran before it")
        out, probs = attn.reference_attention(p, mask)
        return x + attn.o_proj(out), mask, AttentionTrace(probs, scores)


class SharedHead(nn.Module):
    def __init__(self, config: GlmConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """Multi-token prediction: fuses the next token's embedding with the main model's hidden state, then runs one
    full decoder layer. It reuses the main model's embed_tokens and lm_head (not stored twice)."""

    def __init__(self, config: GlmConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def fuse(self, next_embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))


class GlmModel(nn.Module):
    def __init__(self, config: GlmConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        n = config.num_hidden_layers
        layers: list[nn.Module] = [DecoderLayer(config, i) for i in range(n)]
        layers += [MTPLayer(config, n + j) for j in range(config.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class GlmForCausalLM(nn.Module):
    fused = False  # loaded in its serving form (model/fusion.py)

    def __init__(self, config: GlmConfig):
        super().__init__()
        self.config = config
        self.model = GlmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return list(self.model.layers[: self.config.num_hidden_layers])

    @property
    def mtp(self) -> MTPLayer | None:
        return self.model.layers[-1] if self.config.num_nextn_predict_layers else None

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.config.qk_rope_head_dim, self.config.rope_theta, dtype)

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] of full causal sequences (no cache)."""
        x = self.model.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        cos, sin = self.rope(positions, x.dtype)
        mask = None
        for layer in self.decoder_layers:
            x, mask = layer.reference_forward(x, positions, cos, sin, mask)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence causal logits [B, T, vocab]."""
        return self.lm_head(self.hidden_states(input_ids))

    @torch.no_grad()
    def mtp_reference(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP step over whole sequences: position i fuses hidden[i] with token i+1 (`next_ids[i]`) and predicts
        token i+2. Returns (logits [B, T, vocab], the layer's output hidden, fed back for the next draft step)."""
        mtp = self.mtp
        if mtp is None:
            raise ValueError("this checkpoint has no MTP layer (num_nextn_predict_layers = 0)")
        x = mtp.fuse(self.model.embed_tokens(next_ids), hidden)
        positions = torch.arange(next_ids.shape[-1], device=next_ids.device)
        cos, sin = self.rope(positions, x.dtype)
        out, _ = mtp.reference_forward(x, positions, cos, sin, None)
        return self.lm_head(mtp.shared_head.norm(out)), out

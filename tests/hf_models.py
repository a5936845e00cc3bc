"""Small random GLM-5 models built with transformers (the reference) and saved in the Hub layout."""

from pathlib import Path

import torch

TINY = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    index_n_heads=16,  # ReLU ties (all heads <= 0) at the top-k boundary are then vanishingly rare
    index_head_dim=16,
    index_topk=8,
    first_k_dense_replace=1,
    index_topk_freq=2,
    index_skip_topk_offset=1,
    max_position_embeddings=1024,
)


def make_hf_model(path: Path, seed: int = 0, **overrides):
    """A transformers GlmMoeDsaForCausalLM with weights large enough that routing and top-k really discriminate."""
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    torch.manual_seed(seed)
    config = GlmMoeDsaConfig(**{**TINY, **overrides})
    model = GlmMoeDsaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    model.save_pretrained(path)
    return model

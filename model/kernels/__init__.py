"""Triton kernels for DSA sparse attention, MoE and RMSNorm, each with a plain-torch reference used off CUDA."""

from glmserve.model.kernels.indexer import (
    indexer_logits,
    indexer_logits_fp8_triton,
    indexer_logits_per_query_triton,
    indexer_logits_reference,
    indexer_logits_triton,
    quantize_fp8_rows,
)
from glmserve.model.kernels.moe import (
    moe_experts,
    moe_experts_grouped_mm,
    moe_experts_reference,
    moe_experts_triton,
    route_tokens,
)
from glmserve.model.kernels.paged_mla import (
    MlaLaunch,
    mla_attention,
    mla_attention_reference,
    mla_attention_triton,
    mla_decode_triton,
    mla_prefill_triton,
)
from glmserve.model.kernels.rms_norm import rms_norm_triton
from glmserve.model.kernels.topk import (
    topk_causal_logits,
    topk_positions_reference,
    topk_positions_triton,
)

__all__ = [
    "MlaLaunch",
    "indexer_logits",
    "indexer_logits_fp8_triton",
    "indexer_logits_per_query_triton",
    "indexer_logits_reference",
    "indexer_logits_triton",
    "mla_attention",
    "mla_attention_reference",
    "mla_attention_triton",
    "mla_decode_triton",
    "mla_prefill_triton",
    "moe_experts",
    "moe_experts_grouped_mm",
    "moe_experts_reference",
    "moe_experts_triton",
    "quantize_fp8_rows",
    "rms_norm_triton",
    "route_tokens",
    "topk_causal_logits",
    "topk_positions_reference",
    "topk_positions_triton",
]

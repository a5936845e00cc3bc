"""What a model needs in GPU memory, and how many tokens of KV a node has room for beside it.

Weights in bf16, or as the FP8 release ships them: one byte per weight of every block-quantized Linear plus a fp32
scale per 128x128 block, the rest (embeddings, lm_head, router, the indexer's head weights, norms) as in bf16
checkpoints. KV bytes per token for a bf16 cache, and for the FP8 layout FlashMLA and vLLM use (`fp8_ds_mla`: per
token and layer 512 e4m3 latent values, 4 fp32 scales and 64 bf16 RoPE values, 656 bytes; indexer keys 128 e4m3 + 1
fp32 scale, 132 bytes). Within a replica every tensor-parallel rank holds the whole latent cache (MLA has one KV
head), so the tokens that fit are set by one GPU's memory left after its share of the weights.
"""

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .config import GlmConfig
from .fp8 import BLOCK
from .glm import GlmForCausalLM
from .kv_cache import KVCacheSpec
from .weights import FP32_SUFFIXES

FP8_LATENT_ROW_BYTES = 512 + 4 * 4 + 64 * 2  # FlashMLA's FP8 MLA cache row at kv_lora 512, rope 64
FP8_INDEX_ROW_BYTES = 128 + 4  # e4m3 key + its fp32 scale (vLLM, SGLang)


@dataclass(frozen=True)
class Node:
    name: str
    gpus: int
    bytes_per_gpu: int


# NVIDIA datasheets: H200 SXM 141 GB HBM3e, H100 SXM 80 GB HBM3, B200 180 GB HBM3e (per GPU, 8 per HGX node).
NODES = {
    "8x H200": Node("8x H200", 8, 141 * 10**9),
    "8x H100": Node("8x H100", 8, 80 * 10**9),
    "8x B200": Node("8x B200", 8, 180 * 10**9),
}


def _quantized(name: str, module: nn.Module) -> bool:
    return type(module) is nn.Linear and name != "lm_head" and not f"{name}.weight".endswith(FP32_SUFFIXES)


@functools.lru_cache(maxsize=4)
def _meta_model(config_json: str) -> GlmForCausalLM:
    with torch.device("meta"):  # shapes only; GLM-5.2's 20,000 expert modules take a while to build even so
        return GlmForCausalLM(GlmConfig.model_validate_json(config_json))


def weight_bytes(config: GlmConfig, fp8: bool) -> int:
    """Bytes of every weight (MTP layer included): bf16 throughout (fp32 where checkpoints keep fp32), or FP8."""
    model = _meta_model(config.model_dump_json())
    total = 0
    for name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            full = f"{name}.{leaf}" if name else leaf
            if fp8 and leaf == "weight" and _quantized(name, module):
                rows, cols = p.shape
                total += p.numel() + 4 * (-(-rows // BLOCK)) * (-(-cols // BLOCK))
            else:
                total += p.numel() * (4 if full.endswith(FP32_SUFFIXES) else 2)
    return total


def kv_bytes_per_token(config: GlmConfig, kv_cache_dtype: str) -> int:
    """Per token, every layer (MTP included): "bf16", or "fp8" in FlashMLA's layout (GLM-5.2's 512 + 64 dims)."""
    spec = KVCacheSpec.from_config(config, torch.bfloat16)
    if kv_cache_dtype == "bf16":
        return spec.bytes_per_token
    if kv_cache_dtype != "fp8":
        raise ValueError(f"kv_cache_dtype must be bf16 or fp8, got {kv_cache_dtype!r}")
    if (config.kv_lora_rank, config.qk_rope_head_dim, config.index_head_dim) != (512, 64, 128):  # FlashMLA's dims
        raise ValueError(
            "the FP8 cache layout is defined for kv_lora_rank 512, qk_rope_head_dim 64, index_head_dim 128"
        )
    return spec.num_layers * FP8_LATENT_ROW_BYTES + len(spec.index_layers) * FP8_INDEX_ROW_BYTES


def fit_report(config: GlmConfig, node: Node, gpu_memory_utilization: float = 0.9) -> str:
    """Whether the weights fit the node spread over its GPUs, and the tokens of KV each arrangement leaves room for."""
    usable = int(node.bytes_per_gpu * gpu_memory_utilization)
    fp8_layout = (config.kv_lora_rank, config.qk_rope_head_dim, config.index_head_dim) == (512, 64, 128)
    kv_dtypes = ("bf16", "fp8") if fp8_layout else ("bf16",)
    lines = [
        f"on one {node.name} node ({node.bytes_per_gpu / 1e9:.0f} GB per GPU, {gpu_memory_utilization:.0%} usable):"
    ]
    for label, fp8 in (("bf16 weights", False), ("fp8 weights", True)):
        total = weight_bytes(config, fp8)
        per_gpu = -(-total // node.gpus)
        head = f"  {label:<13}{total / 1e12:6.2f} TB"
        if per_gpu >= usable:
            lines.append(f"{head}: does not fit ({per_gpu / 1e9:.0f} GB per GPU of {usable / 1e9:.0f})")
            continue
        left = usable - per_gpu
        fits = ", ".join(
            f"{left // kv_bytes_per_token(config, kv):,} tokens of {kv} KV ({kv_bytes_per_token(config, kv):,} B/token)"
            for kv in kv_dtypes
        )
        lines.append(f"{head}: fits, {left / 1e9:.0f} GB per GPU left: {fits}")
    return "\n".join(lines)

"""The paged KV cache: per layer a latent pool, and an indexer-key pool on full-indexer layers only.

Absorbed MLA caches, per token and layer, the normalized latent and the roped key (kv_lora_rank + qk_rope_head_dim
values: 576 for GLM-5.2). The DSA indexer caches one key per token (index_head_dim values), but only on layers that
run their own indexer: IndexShare layers reuse another layer's top-k and need no keys. One block table per sequence
serves every layer.
"""

from dataclasses import dataclass

import torch

from .config import GlmConfig

BLOCK_SIZE = 64


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int  # main layers + MTP layers
    latent_dim: int
    index_dim: int
    index_layers: tuple[int, ...]  # layers that own an indexer-key pool
    dtype: torch.dtype
    block_size: int = BLOCK_SIZE

    @classmethod
    def from_config(
        cls, config: GlmConfig, dtype: torch.dtype, block_size: int = BLOCK_SIZE, index_share: bool = True
    ) -> "KVCacheSpec":
        layers = config.num_layers_with_mtp
        index_layers = tuple(i for i in range(layers) if not index_share or config.is_full_indexer_layer(i))
        return cls(layers, config.latent_dim, config.index_head_dim, index_layers, dtype, block_size)

    @property
    def bytes_per_token(self) -> int:
        values = self.num_layers * self.latent_dim + len(self.index_layers) * self.index_dim
        return values * self.dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size


class PagedKVCache:
    """The pools themselves. Token t of a sequence lives in block `block_table[t // block_size]`, slot
    `t % block_size`; flat slot id = block * block_size + slot."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, the budget gives {num_blocks}")
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (num_blocks, spec.block_size)
        self.latent = [
            torch.zeros(*shape, spec.latent_dim, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)
        ]
        self.index_keys = {
            layer: torch.zeros(*shape, spec.index_dim, dtype=spec.dtype, device=device) for layer in spec.index_layers
        }

    @property
    def max_tokens(self) -> int:
        return self.num_blocks * self.spec.block_size

    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        index_rows: torch.Tensor | None,
    ) -> None:
        """Store new tokens' rows at flat slot ids: the latent and the roped key side by side, and the index key."""
        rows = torch.cat((latent, k_rope), dim=-1)
        self.latent[layer].view(-1, self.spec.latent_dim)[slots] = rows.to(self.spec.dtype)
        if index_rows is not None:
            self.index_keys[layer].view(-1, self.spec.index_dim)[slots] = index_rows.to(self.spec.dtype)


def num_blocks_for_budget(spec: KVCacheSpec, budget_bytes: int) -> int:
    return budget_bytes // spec.bytes_per_block


def gpu_kv_budget(device: torch.device, gpu_memory_utilization: float) -> int:
    """Bytes the cache may take: the utilization share of the whole card, minus what is already in use."""
    free, total = torch.cuda.mem_get_info(device)
    return int(total * gpu_memory_utilization) - (total - free)


def kv_bytes_report(config: GlmConfig, dtype: torch.dtype = torch.bfloat16) -> str:
    """KV bytes per token with and without IndexShare (MTP layer included)."""
    shared = KVCacheSpec.from_config(config, dtype)
    unshared = KVCacheSpec.from_config(config, dtype, index_share=False)
    per_mtok = 1 << 20
    dtype_name = str(dtype).removeprefix("torch.")
    lines = [f"KV cache per token ({dtype_name}, {config.num_layers_with_mtp} layers incl. MTP):"]
    for label, spec in [("with IndexShare", shared), ("without IndexShare", unshared)]:
        lines.append(
            f"  {label:<20} {spec.bytes_per_token:>9,} B/token  ({len(spec.index_layers)} indexer-key layers)"
            f"  {spec.bytes_per_token * per_mtok / 2**30:8.1f} GiB per 1M tokens"
        )
    return "\n".join(lines)

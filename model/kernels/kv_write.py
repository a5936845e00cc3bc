"""A step's new KV rows stored at their cache slots in one launch: the latent and the roped key side by side in the
layer's latent pool, and the indexer key where the layer has an indexer pool (eagerly: a concatenation and one
scatter per pool)."""

import torch
import triton
import triton.language as tl

from glmserve.model.kv_cache import PagedKVCache


@triton.jit
def _copy_row(src_ptr, dst_ptr, dim, BLOCK: tl.constexpr):
    for start in range(0, dim, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < dim
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_kv_kernel(
    slots_ptr,
    latent_ptr,
    k_rope_ptr,
    index_ptr,
    latent_pool_ptr,
    index_pool_ptr,
    stride_latent,
    stride_k_rope,
    stride_index,
    kv_lora,
    rope_dim,
    index_dim,
    BLOCK: tl.constexpr,
    HAS_INDEX: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    row = latent_pool_ptr + slot * (kv_lora + rope_dim)
    _copy_row(latent_ptr + token * stride_latent, row, kv_lora, BLOCK)
    _copy_row(k_rope_ptr + token * stride_k_rope, row + kv_lora, rope_dim, BLOCK)
    if HAS_INDEX:
        _copy_row(index_ptr + token * stride_index, index_pool_ptr + slot * index_dim, index_dim, BLOCK)


def write_kv_triton(
    cache: PagedKVCache,
    layer: int,
    slots: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    index_rows: torch.Tensor | None,
) -> None:
    """`PagedKVCache.write` in one launch: rows [N, dim] (strided rows allowed) to flat slot ids [N]."""
    pool = cache.latent[layer]
    index_pool = cache.index_keys.get(layer) if index_rows is not None else None
    assert latent.stride(-1) == 1 and k_rope.stride(-1) == 1
    assert index_rows is None or (index_pool is not None and index_rows.stride(-1) == 1)
    index_arg = index_rows if index_rows is not None else latent
    num_tokens = slots.numel()
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        slots, latent, k_rope, index_arg, pool, index_pool if index_pool is not None else pool,
        latent.stride(0), k_rope.stride(0), index_arg.stride(0), latent.shape[-1], k_rope.shape[-1],
        index_arg.shape[-1], BLOCK=256, HAS_INDEX=index_rows is not None, num_warps=2,
    )  # fmt: skip

"""What the two roles share about a remote prefill: the decode side's plan, the request it sends a prefill worker,
the answer, the KV layout both sides agree on, and the error a request ends with when the KV never arrives."""

from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field

from glmserve.kvtransfer.layout import KVLayout
from glmserve.model.kv_cache import PagedKVCache

from .sampling_params import SamplingParams


@dataclass
class RemotePrefill:
    """What a prefill worker must fill: tokens [start_token, start_token + num_tokens) of a sequence whose block
    table is `block_table` (the blocks before start_token already hold its cached prefix)."""

    request_id: str
    block_table: list[int]
    start_token: int
    num_tokens: int


class PrefillRequest(BaseModel):
    request_id: str  # the decode worker's own id of the request (never the client's); also the transfer id
    # the transfer's capability, drawn by the decode worker for the one prefill worker it asks: without it no call or
    # frame of the transfer is accepted (kept out of reprs and logs)
    capability: bytes = Field(min_length=16, repr=False)
    prompt_token_ids: list[int] = Field(min_length=1)
    params: SamplingParams  # for the first token (seeded the same way the decode worker continues)
    receiver_address: str  # the decode worker's KV receiver
    # more receivers that each want the same KV: the other ranks of a tensor/expert-parallel decode replica
    mirror_addresses: list[str] = Field(default_factory=list)
    affinity_key: int | None = None  # hash of the prompt's first block: the prefix router's key


class PrefillResult(BaseModel):
    request_id: str
    first_token: int
    num_cached_tokens: int  # prompt tokens this prefill worker served from its own prefix cache
    seconds: float


class RemotePrefillFailed(RuntimeError):
    """The prompt's KV never arrived and the policy is to fail rather than recompute."""


def transfer_layout(
    cache: PagedKVCache, num_layers: int
) -> tuple[KVLayout, list[torch.Tensor], dict[int, torch.Tensor]]:
    """The layout both sides of a transfer agree on for the first `num_layers` layers of `cache`, and the pools it
    covers."""
    latent = cache.latent[:num_layers]
    index_keys = {layer: pool for layer, pool in cache.index_keys.items() if layer < num_layers}
    layout = KVLayout(
        num_layers,
        cache.spec.block_size,
        cache.spec.latent_dim,
        cache.spec.index_dim,
        tuple(sorted(index_keys)),
        cache.spec.dtype,
    )
    return layout, latent, index_keys

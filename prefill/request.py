"""What a decode worker asks of a prefill worker."""

from pydantic import BaseModel, Field

from glmserve.model.sampling_params import SamplingParams


class PrefillRequest(BaseModel):
    request_id: str  # also the transfer id at the decode worker's receiver
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

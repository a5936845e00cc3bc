"""Engine arguments, named as vLLM names them where the concept is the same, so settings carry over."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # checkpoint directory; None = the embedded glm5-tiny
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    device: str = "auto"  # auto: cuda if available
    max_model_len: int | None = Field(None, gt=0)  # default: the config's max_position_embeddings, capped by the cache
    max_num_seqs: int = Field(256, gt=0)
    max_num_batched_tokens: int = Field(2048, gt=0)  # per-step token budget; prompts beyond it are chunked
    enable_prefix_caching: bool = True
    block_size: Literal[64] = 64  # the DSA kernels' block size
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    kv_cache_memory_bytes: int | None = Field(None, gt=0)  # explicit KV budget (default on CPU: 256 MiB)
    num_gpu_blocks_override: int | None = Field(None, gt=0)  # exact number of KV blocks (tests, tiny budgets)
    seed: int = 0  # for requests without their own seed
    num_speculative_tokens: int = Field(0, ge=0, le=8)  # MTP draft length K; 0 disables speculation
    adaptive_speculation: bool = True  # choose K (down to 0) per step by measured profitability; False: always K
    # One replica over several ranks: every rank runs this engine on the same requests (SPMD) inside one
    # torch.distributed group that the launcher started; heads split over tensor_parallel_size ranks, routed experts
    # over expert_parallel_size (model/parallel/).
    tensor_parallel_size: int = Field(1, ge=1)
    expert_parallel_size: int = Field(1, ge=1)

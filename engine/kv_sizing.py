"""How many KV blocks an engine allocates: an exact count, an explicit budget, or what the GPU has left."""

import torch

from glmserve.model.kv_cache import KVCacheSpec, gpu_kv_budget, num_blocks_for_budget

from .engine_args import EngineArgs

CPU_KV_BUDGET = 256 << 20


def num_kv_blocks(args: EngineArgs, spec: KVCacheSpec, device: torch.device) -> int:
    if args.num_gpu_blocks_override:
        num_blocks = args.num_gpu_blocks_override
    elif args.kv_cache_memory_bytes:
        num_blocks = num_blocks_for_budget(spec, args.kv_cache_memory_bytes)
    elif device.type == "cuda":
        num_blocks = num_blocks_for_budget(spec, gpu_kv_budget(device, args.gpu_memory_utilization))
    else:
        num_blocks = num_blocks_for_budget(spec, CPU_KV_BUDGET)
    if num_blocks < 1:
        raise ValueError(
            f"no room for a KV cache ({num_blocks} blocks): gpu_memory_utilization={args.gpu_memory_utilization} "
            "of the GPU is already in use (another engine in this process?); set kv_cache_memory_bytes"
        )
    return num_blocks

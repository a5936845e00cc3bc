"""Helpers shared by the paged-cache kernels: addressing rows by position, tiling queries by sequence, and the
precision of their dot products."""

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: full fp32 for fp32 operands (so the fp32 engine on GPU matches the CPU path), the
    default tensor-core path (tf32, which only applies to fp32 operands) for everything else."""
    return "ieee" if dtype == torch.float32 else "tf32"


def gather_rows(pool: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of one sequence at token `positions` from a pool [num_blocks, block, dim] -> [..., dim]."""
    block_size = pool.shape[1]
    blocks = block_table.long()[positions // block_size]
    return pool[blocks, positions % block_size]


def query_tiles(query_seq: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the flat query list into tiles of at most `block` consecutive queries of one sequence.

    Returns (start, end) int32 [num_tiles]. Tiles partition [0, S), so a tile ends where the next begins.
    Costs one host sync (the tile count).
    """
    num_queries = query_seq.numel()
    index = torch.arange(num_queries, device=query_seq.device)
    new_run = torch.ones(num_queries, dtype=torch.bool, device=query_seq.device)
    new_run[1:] = query_seq[1:] != query_seq[:-1]
    run_start = torch.cummax(torch.where(new_run, index, 0), dim=0).values
    starts = (((index - run_start) % block) == 0).nonzero().flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([num_queries])])
    return starts.to(torch.int32), ends.to(torch.int32)

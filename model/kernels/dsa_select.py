"""DSA key selection: indexer logits then top-k, in query chunks so memory stays bounded at 1M-token contexts."""

import torch

from glmserve.model.kernels.indexer import indexer_logits
from glmserve.model.kernels.topk import topk_positions

# 1 GiB of fp32 logits per chunk: 256 queries at 1M keys, 2048 queries at 128K.
MAX_LOGITS_BYTES = 1 << 30


def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    index_keys: torch.Tensor,
    block_tables: torch.Tensor,
    query_seq: torch.Tensor,
    query_pos: torch.Tensor,
    topk: int,
    max_logits_bytes: int = MAX_LOGITS_BYTES,
) -> torch.Tensor:
    """Positions [S, topk] int32 (-1 padded) of each query's highest-scoring causal keys."""
    num_queries = q.shape[0]
    out = torch.empty(num_queries, topk, dtype=torch.int32, device=q.device)
    if num_queries == 0:
        return out
    max_context = int(query_pos.max()) + 1
    chunk = max(1, max_logits_bytes // (4 * max_context))
    for begin in range(0, num_queries, chunk):
        rows = slice(begin, min(begin + chunk, num_queries))
        logits = indexer_logits(q[rows], weights[rows], index_keys, block_tables, query_seq[rows], query_pos[rows])
        out[rows] = topk_positions(logits, query_pos[rows], topk)
    return out

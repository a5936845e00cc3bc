"""Per-query top-k positions of the indexer scores, by radix select.

A row's k-th largest score is found digit by digit (four 8-bit passes over order-preserving integer keys, each a
histogram of the keys that still match the prefix found so far); one last pass writes the positions of the keys
above that threshold and as many keys equal to it as k needs. Rows with at most k causal keys take them all.
Output: int32 [S, k] positions, in no particular order, -1 after the selected ones.

Where it is used: decode and MTP verification, a few rows of at most `ONE_PROGRAM_MAX_WIDTH` keys, where torch.topk
sorts each row while this kernel reads it five times; rows up to `SPLIT_MAX_WIDTH` are split across programs
(`topk_split.py`); wider rows, and long prefill rows, keep torch.topk (`glmserve bench kernels --sections topk
topk_decode` on the H200: one program per row is 3.4x torch's speed on an 8K-key decode row, the split kernel 1.8x
on a 32K-key row, and both lose from 128K keys on).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from glmserve.model.kernels.topk_split import ordered_key, topk_positions_split

TOPK_BLOCK = 4096
TOPK_NUM_WARPS = 8
# Widest indexer-logits rows (keys) the decode path selects from with one program per row, then split across
# programs; wider rows take torch.topk.
ONE_PROGRAM_MAX_WIDTH = 16384
SPLIT_MAX_WIDTH = 32768


@triton.jit
def _radix_topk_kernel(
    scores_ptr,
    query_pos_ptr,
    out_ptr,
    stride_s,
    stride_o,
    num_cols,
    k,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    n_valid = tl.minimum(tl.load(query_pos_ptr + row) + 1, num_cols)
    row_ptr = scores_ptr + row.to(tl.int64) * stride_s
    out_row = out_ptr + row.to(tl.int64) * stride_o
    offs = tl.arange(0, BLOCK)

    if n_valid <= k:
        # Every causal key is selected; the rest is padding.
        for start in range(0, k, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            tl.store(out_row + offs_k, tl.where(offs_k < n_valid, offs_k, -1), mask=offs_k < k)
    else:
        prefix = tl.zeros([], dtype=tl.int32)
        remaining = k  # how many of the keys matching `prefix` still belong to the top k
        bins = tl.arange(0, 256)
        for digit_index in tl.static_range(4):
            shift = 24 - 8 * digit_index
            hist = tl.zeros([256], dtype=tl.int32)
            for start in range(0, n_valid, BLOCK):
                mask = start + offs < n_valid
                key = ordered_key(tl.load(row_ptr + start + offs, mask=mask, other=0.0))
                if digit_index == 0:
                    digit = (key >> 24) + 128  # the sign byte, biased so 0..255 follows signed order
                else:
                    mask = mask & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
                    digit = (key >> shift) & 0xFF
                hist += tl.histogram(digit, 256, mask=mask)
            at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
            chosen = tl.max(tl.where(at_or_above >= remaining, bins, -1), axis=0)
            remaining -= tl.sum(tl.where(bins == chosen, at_or_above - hist, 0), axis=0)
            if digit_index == 0:
                prefix = (chosen - 128) << 24
            else:
                prefix = prefix | (chosen << shift)

        # `prefix` is now the k-th largest key: write the keys above it, then `remaining` keys equal to it.
        first_equal_slot = k - remaining
        num_above = tl.zeros([], dtype=tl.int32)
        num_equal = tl.zeros([], dtype=tl.int32)
        for start in range(0, n_valid, BLOCK):
            mask = start + offs < n_valid
            key = ordered_key(tl.load(row_ptr + start + offs, mask=mask, other=0.0))
            above = mask & (key > prefix)
            equal = mask & (key == prefix)
            above_rank = num_above + tl.cumsum(above.to(tl.int32), axis=0) - 1
            equal_rank = num_equal + tl.cumsum(equal.to(tl.int32), axis=0) - 1
            tl.store(out_row + above_rank, start + offs, mask=above)
            tl.store(out_row + first_equal_slot + equal_rank, start + offs, mask=equal & (equal_rank < remaining))
            num_above += tl.sum(above.to(tl.int32), axis=0)
            num_equal += tl.sum(equal.to(tl.int32), axis=0)


def topk_positions_triton(
    scores: torch.Tensor,
    query_pos: torch.Tensor,
    k: int,
    *,
    block: int = TOPK_BLOCK,
    num_warps: int = TOPK_NUM_WARPS,
) -> torch.Tensor:
    """Top-k positions [S, k] int32 (-1 padded) of fp32 scores [S, T] restricted to t <= query_pos[s]."""
    assert scores.dtype == torch.float32 and scores.stride(-1) == 1
    num_rows, num_cols = scores.shape
    out = torch.empty(num_rows, k, dtype=torch.int32, device=scores.device)
    if num_rows == 0:
        return out
    block_k = min(triton.next_power_of_2(k), 4096)
    _radix_topk_kernel[(num_rows,)](
        scores,
        query_pos,
        out,
        scores.stride(0),
        out.stride(0),
        num_cols,
        k,
        BLOCK=min(block, triton.next_power_of_2(num_cols)),  # a narrow row is not read in wider masked tiles
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out


def topk_positions_reference(scores: torch.Tensor, query_pos: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk over the causal part of each row; -1 where fewer than k keys exist."""
    num_rows, num_cols = scores.shape
    positions = torch.arange(num_cols, device=scores.device)
    causal = positions[None, :] <= query_pos[:, None].long()
    masked = torch.where(causal, scores, float("-inf"))
    if num_cols < k:
        masked = torch.nn.functional.pad(masked, (0, k - num_cols), value=float("-inf"))
    index = masked.topk(k, dim=-1).indices
    n_valid = causal.sum(dim=-1, keepdim=True)
    # topk puts the -inf padding last only by value; rank by slot so exactly the causal count is kept.
    ranks = torch.arange(k, device=scores.device)[None, :]
    return torch.where(ranks < n_valid, index, -1).to(torch.int32)


def topk_causal_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k positions [S, k] int32 of indexer logits that are already -inf past each query's position (as the
    indexer kernels write them), best first, -1 where a pick is -inf (fewer than k causal keys). No host sync.

    Among equal scores the lower position wins, as on the CPU path (ReLU makes exact ties common in small models):
    torch.topk takes a margin of extra candidates, which are ordered by position and then stably by score. The rule
    holds whenever at most the margin of tied keys fall past the k-th place."""
    width = logits.shape[-1]
    values, index = logits.topk(min(k + max(64, k // 8), width), dim=-1, sorted=False)
    index, by_position = index.sort(dim=-1)
    values, by_score = values.gather(-1, by_position).sort(dim=-1, descending=True, stable=True)
    index, values = index.gather(-1, by_score)[:, :k], values[:, :k]
    picks = torch.where(values > float("-inf"), index, -1).to(torch.int32)
    return F.pad(picks, (0, k - picks.shape[-1]), value=-1) if picks.shape[-1] < k else picks


def topk_causal_logits_few_rows(logits: torch.Tensor, query_pos: torch.Tensor, k: int) -> torch.Tensor:
    """`topk_causal_logits` for steps of a few queries per sequence (decode, MTP verification): the radix select
    (one program per row, or each row split across programs) on rows of at most SPLIT_MAX_WIDTH keys, reading only
    each query's causal keys; the same positions are chosen (lower position wins among equal scores), not best
    first. Wider rows take `topk_causal_logits`."""
    width = logits.shape[-1]
    if width <= ONE_PROGRAM_MAX_WIDTH:
        return topk_positions_triton(logits, query_pos, k)
    if width <= SPLIT_MAX_WIDTH:
        return topk_positions_split(logits, query_pos, k)
    return topk_causal_logits(logits, k)

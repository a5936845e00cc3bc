"""Top-k positions of wide indexer rows, each row split across many programs.

The radix select of `topk.py` gives a row one program, which reads the row once per digit: at 32K keys that is
slower than torch.topk, and this kernel twice as fast (the decode path's 16K-32K bucket; at 128K keys and more
torch.topk wins, see `topk.py`). Here a row's keys are cut into chunks, one program per (row, chunk), and the k-th
largest key is found in three digit levels (11, 11 and 10 bits of the order-preserving integer key). Each level is
two launches: every chunk histograms the digit of its keys that match the prefix found so far (stored per chunk, no
atomics), then one program per row sums the chunks, picks the digit where the k-th key falls and adds, per chunk,
the keys above it to a running count. A last launch writes each chunk's keys above the threshold at its offset (the
exclusive sum of the chunks before it) and the keys equal to it at theirs, so among equal keys the lower positions
win, as everywhere else. Deterministic, no host sync (CUDA-graph friendly).
Output: int32 [S, k] positions, in position order within each of the two groups, -1 after the selected ones.
"""

import torch
import triton
import triton.language as tl

BINS = 2048  # 11-bit digits
# Keys per program: the rows' chunks should cover the GPU at decode batch sizes, while the per-row program that
# sums the chunks' histograms reads BINS counts per chunk.
MIN_CHUNK, MAX_CHUNKS_PER_ROW = 2048, 64
# Digit levels of a 32-bit key: (shift, bits).
LEVELS = ((21, 11), (10, 11), (0, 10))


@triton.jit
def ordered_key(x):
    """int32 keys whose signed order is the float order: flip the magnitude bits of negative floats. -0.0 is
    read as 0.0 (torch.topk holds them equal)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _digit(key, shift: tl.constexpr, bits: tl.constexpr, FIRST: tl.constexpr):
    if FIRST:
        return (key >> shift) + (1 << (bits - 1))  # the sign-carrying top digit, biased so bins follow signed order
    return (key >> shift) & ((1 << bits) - 1)


@triton.jit
def _chunk_histogram_kernel(
    scores_ptr,
    query_pos_ptr,
    state_ptr,
    hist_ptr,
    stride_s,
    num_cols,
    num_chunks,
    k,
    CHUNK: tl.constexpr,
    BINS: tl.constexpr,
    SHIFT: tl.constexpr,
    BITS: tl.constexpr,
    FIRST: tl.constexpr,
):
    row, chunk = tl.program_id(0), tl.program_id(1)
    n_valid = tl.minimum(tl.load(query_pos_ptr + row) + 1, num_cols)
    hist_row = hist_ptr + (row.to(tl.int64) * num_chunks + chunk) * BINS
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n_valid
    key = ordered_key(tl.load(scores_ptr + row.to(tl.int64) * stride_s + offs, mask=mask, other=0.0))
    if not FIRST:  # only keys that share the digits found so far
        prefix = tl.load(state_ptr + row * 2)
        mask = mask & ((key >> (SHIFT + BITS)) == (prefix >> (SHIFT + BITS)))
    hist = tl.histogram(_digit(key, SHIFT, BITS, FIRST), BINS, mask=mask & (n_valid > k))
    tl.store(hist_row + tl.arange(0, BINS), hist)


@triton.jit
def _pick_digit_kernel(
    query_pos_ptr,
    state_ptr,
    hist_ptr,
    above_ptr,
    equal_ptr,
    num_cols,
    num_chunks,
    k,
    BINS: tl.constexpr,
    SHIFT: tl.constexpr,
    BITS: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
):
    """state [S, 2]: (prefix: the digits found so far, remaining: how many keys matching it still belong to the
    top k). above [S, chunks]: per chunk, the keys above the prefix found so far; on the last level it becomes the
    exclusive offsets of each chunk's keys above the threshold, and equal [S, chunks] those of keys equal to it.
    Rows with at most k causal keys (all selected) are left alone."""
    row = tl.program_id(0)
    if tl.minimum(tl.load(query_pos_ptr + row) + 1, num_cols) > k:
        bins = tl.arange(0, BINS)
        hist_row = hist_ptr + row.to(tl.int64) * num_chunks * BINS
        total = tl.zeros([BINS], dtype=tl.int32)
        for chunk in range(num_chunks):
            total += tl.load(hist_row + chunk * BINS + bins)
        if FIRST:
            remaining = k
        else:
            remaining = tl.load(state_ptr + row * 2 + 1)
        at_or_above = tl.sum(total, axis=0) - tl.cumsum(total, axis=0) + total
        chosen = tl.max(tl.where(at_or_above >= remaining, bins, -1), axis=0)
        remaining -= tl.sum(tl.where(bins == chosen, at_or_above - total, 0), axis=0)
        if FIRST:
            prefix = (chosen - (1 << (BITS - 1))) << SHIFT
        else:
            prefix = tl.load(state_ptr + row * 2) | (chosen << SHIFT)
        tl.store(state_ptr + row * 2, prefix)
        tl.store(state_ptr + row * 2 + 1, remaining)
        above_offset = tl.zeros([], dtype=tl.int32)
        equal_offset = tl.zeros([], dtype=tl.int32)
        for chunk in range(num_chunks):
            counts = tl.load(hist_row + chunk * BINS + bins)
            above = tl.sum(tl.where(bins > chosen, counts, 0), axis=0)
            if not FIRST:
                above += tl.load(above_ptr + row * num_chunks + chunk)
            if LAST:  # the running counts become offsets
                tl.store(above_ptr + row * num_chunks + chunk, above_offset)
                tl.store(equal_ptr + row * num_chunks + chunk, equal_offset)
                above_offset += above
                equal_offset += tl.sum(tl.where(bins == chosen, counts, 0), axis=0)
            else:
                tl.store(above_ptr + row * num_chunks + chunk, above)


@triton.jit
def _write_picks_kernel(
    scores_ptr,
    query_pos_ptr,
    state_ptr,
    above_ptr,
    equal_ptr,
    out_ptr,
    stride_s,
    stride_o,
    num_cols,
    num_chunks,
    k,
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row, chunk = tl.program_id(0), tl.program_id(1)
    n_valid = tl.minimum(tl.load(query_pos_ptr + row) + 1, num_cols)
    out_row = out_ptr + row.to(tl.int64) * stride_o
    if n_valid <= k:
        if chunk == 0:  # every causal key, then padding
            for start in range(0, k, BLOCK_K):
                offs_k = start + tl.arange(0, BLOCK_K)
                tl.store(out_row + offs_k, tl.where(offs_k < n_valid, offs_k, -1), mask=offs_k < k)
    else:
        threshold = tl.load(state_ptr + row * 2)
        remaining = tl.load(state_ptr + row * 2 + 1)  # keys equal to the threshold that belong to the top k
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        mask = offs < n_valid
        key = ordered_key(tl.load(scores_ptr + row.to(tl.int64) * stride_s + offs, mask=mask, other=0.0))
        above = mask & (key > threshold)
        equal = mask & (key == threshold)
        above_rank = tl.load(above_ptr + row * num_chunks + chunk) + tl.cumsum(above.to(tl.int32), axis=0) - 1
        equal_rank = tl.load(equal_ptr + row * num_chunks + chunk) + tl.cumsum(equal.to(tl.int32), axis=0) - 1
        tl.store(out_row + above_rank, offs, mask=above)
        tl.store(out_row + k - remaining + equal_rank, offs, mask=equal & (equal_rank < remaining))


def chunk_size(num_cols: int) -> int:
    """Keys per program for rows `num_cols` wide: at most MAX_CHUNKS_PER_ROW chunks, at least MIN_CHUNK keys each."""
    return max(MIN_CHUNK, triton.next_power_of_2(triton.cdiv(num_cols, MAX_CHUNKS_PER_ROW)))


def topk_positions_split(
    scores: torch.Tensor, query_pos: torch.Tensor, k: int, *, chunk: int | None = None, num_warps: int = 8
) -> torch.Tensor:
    """Top-k positions [S, k] int32 (-1 padded) of fp32 scores [S, T] restricted to t <= query_pos[s]: the same
    selection as `topk_positions_triton` (lower positions win among equal scores)."""
    assert scores.dtype == torch.float32 and scores.stride(-1) == 1
    num_rows, num_cols = scores.shape
    out = torch.empty(num_rows, k, dtype=torch.int32, device=scores.device)
    if num_rows == 0:
        return out
    chunk = chunk or chunk_size(num_cols)
    num_chunks = triton.cdiv(num_cols, chunk)
    device = scores.device
    state = torch.empty(num_rows, 2, dtype=torch.int32, device=device)
    hist = torch.empty(num_rows, num_chunks, BINS, dtype=torch.int32, device=device)
    above = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=device)
    equal = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=device)
    grid = (num_rows, num_chunks)
    for level, (shift, bits) in enumerate(LEVELS):
        first, last = level == 0, level == len(LEVELS) - 1
        _chunk_histogram_kernel[grid](
            scores, query_pos, state, hist, scores.stride(0), num_cols, num_chunks, k,
            CHUNK=chunk, BINS=BINS, SHIFT=shift, BITS=bits, FIRST=first, num_warps=num_warps,
        )  # fmt: skip
        _pick_digit_kernel[(num_rows,)](
            query_pos, state, hist, above, equal, num_cols, num_chunks, k,
            BINS=BINS, SHIFT=shift, BITS=bits, FIRST=first, LAST=last, num_warps=num_warps,
        )  # fmt: skip
    _write_picks_kernel[grid](
        scores, query_pos, state, above, equal, out, scores.stride(0), out.stride(0), num_cols, num_chunks, k,
        CHUNK=chunk, BLOCK_K=min(triton.next_power_of_2(k), 4096), num_warps=num_warps,
    )  # fmt: skip
    return out

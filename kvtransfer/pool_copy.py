"""Copying a run of tokens from one paged pool straight into another, in one pass (the cuda_ipc receiver's copy).

Both pools are `[num_blocks, block_size, dim]`, each with its own block table of the sequence (token t in block
`ids[t // block_size]`, slot `t % block_size`). Tokens [first, first + count) split into runs that are contiguous in
both pools: one per (source block, destination block) pair for whole blocks, and the token rows of the partial head
and tail blocks. With different block sizes the runs are gcd(source, destination) tokens long. One launch copies
every run: a Triton program per (run, slice of the run's bytes), moving raw int words, so no dtype is involved and
no temporary exists. The plan is computed on the tables' device with no host sync, once per transfer and range.
Without a GPU the kernel runs under TRITON_INTERPRET=1 (tests only).
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_SLICE_WORDS = 2048  # 8 KiB of int32 per program: a 64-token latent block (576 bf16) is exactly 9 slices
_WIDE_WORDS = (torch.int32, torch.int16)


@dataclass(frozen=True)
class Runs:
    """Contiguous runs of token rows: run i copies `rows[i]` rows from flattened source row `src_row[i]` to flattened
    destination row `dst_row[i]`."""

    src_row: torch.Tensor  # int64
    dst_row: torch.Tensor  # int64
    rows: torch.Tensor  # int32
    max_rows: int  # an upper bound on any run's rows: sizes the launch grid

    def __len__(self) -> int:
        return self.rows.numel()


def plan_runs(
    src_ids: torch.Tensor, src_block_size: int, dst_ids: torch.Tensor, dst_block_size: int, first: int, count: int
) -> Runs:
    """The runs holding tokens [first, first + count); `src_ids` and `dst_ids` are int64 on one device."""
    unit = math.gcd(src_block_size, dst_block_size)
    end = first + count
    segment = torch.arange(first // unit, -(-end // unit), dtype=torch.int64, device=src_ids.device) * unit
    start = segment.clamp(min=first)
    stop = (segment + unit).clamp(max=end)
    src_row = src_ids[start // src_block_size] * src_block_size + start % src_block_size
    dst_row = dst_ids[start // dst_block_size] * dst_block_size + start % dst_block_size
    return Runs(src_row, dst_row, (stop - start).to(torch.int32), min(unit, count))


def copy_runs(src_pool: torch.Tensor, dst_pool: torch.Tensor, runs: Runs) -> None:
    """Enqueue the copy of `runs` from `src_pool` into `dst_pool` (contiguous pools of equal row bytes) on the
    current stream."""
    row_bytes = src_pool.shape[-1] * src_pool.element_size()
    if dst_pool.shape[-1] * dst_pool.element_size() != row_bytes:
        raise ValueError(f"rows of {row_bytes} bytes cannot land in rows of {dst_pool.shape[-1]} elements")
    if not len(runs):
        return
    word = _word(row_bytes, src_pool, dst_pool)
    row_words = row_bytes // word.itemsize
    run_words = runs.max_rows * row_words
    slice_words = min(_SLICE_WORDS, triton.next_power_of_2(run_words))
    grid = (len(runs), triton.cdiv(run_words, slice_words))
    _copy_runs_kernel[grid](
        _as_words(src_pool, word),
        _as_words(dst_pool, word),
        runs.src_row,
        runs.dst_row,
        runs.rows,
        row_words,
        SLICE=slice_words,
    )


@triton.jit
def _copy_runs_kernel(src, dst, src_row, dst_row, run_rows, row_words, SLICE: tl.constexpr):
    run = tl.program_id(0)
    offs = tl.program_id(1) * SLICE + tl.arange(0, SLICE)
    mask = offs < tl.load(run_rows + run) * row_words
    src_at = tl.load(src_row + run) * row_words  # int64: pools can exceed 2**31 words
    dst_at = tl.load(dst_row + run) * row_words
    tl.store(dst + dst_at + offs, tl.load(src + src_at + offs, mask=mask), mask=mask)


def _word(row_bytes: int, *pools: torch.Tensor) -> torch.dtype:
    """The widest integer that divides a row and both pools' byte offsets (wider words, fewer instructions)."""
    for word in _WIDE_WORDS:
        size = word.itemsize
        if row_bytes % size == 0 and all(p.storage_offset() * p.element_size() % size == 0 for p in pools):
            return word
    return torch.uint8


def _as_words(pool: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    return pool.view(-1).view(torch.uint8).view(word)

"""Reading and writing a run of tokens in a paged pool `[num_blocks, block_size, dim]`.

Token `t` of a sequence lives in block `block_ids[t // block_size]`, slot `t % block_size`. A run of tokens splits
into a partial head block, whole blocks, and a partial tail block: whole blocks move as `block_size * dim` rows (one
index op for all of them), the two partial ends row by row. Block-sized rows matter on CPU: scattering 1 KiB token
rows runs at ~1.5 GB/s here, 64 KiB block rows at ~20 GB/s.

On CPU the index ops go through numpy: torch's CPU index_copy_/index_select are 3-5x slower for these shapes on two
contended cores (measured: 1 GiB of 64 KiB rows, numpy 0.05 s, torch index_copy_ 0.15-0.4 s).
"""

import numpy as np
import torch

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def token_rows(block_ids: torch.Tensor, first_token: int, count: int, block_size: int) -> torch.Tensor:
    """Rows of the flattened pool `[num_blocks * block_size, dim]` holding tokens [first_token, first_token + count)."""
    tokens = torch.arange(first_token, first_token + count, device=block_ids.device)
    return block_ids[tokens // block_size] * block_size + tokens % block_size


def write_rows(pool: torch.Tensor, block_ids: torch.Tensor, first_token: int, rows: torch.Tensor) -> None:
    """pool[token first_token + i] = rows[i]."""
    bs, dim = pool.shape[1], pool.shape[2]
    end = first_token + rows.shape[0]
    lo, hi = _whole_blocks(first_token, end, bs)
    flat = pool.view(-1, dim)
    if lo > first_token:
        _scatter(flat, token_rows(block_ids, first_token, lo - first_token, bs), rows[: lo - first_token])
    if hi > lo:
        _scatter(pool, block_ids[lo // bs : hi // bs], rows[lo - first_token : hi - first_token].reshape(-1, bs, dim))
    if end > hi:
        _scatter(flat, token_rows(block_ids, hi, end - hi, bs), rows[hi - first_token :])


def read_rows(
    pool: torch.Tensor, block_ids: torch.Tensor, first_token: int, count: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows `[count, dim]` of tokens [first_token, first_token + count), into `out` if given."""
    bs, dim = pool.shape[1], pool.shape[2]
    if out is None:
        out = torch.empty(count, dim, dtype=pool.dtype, device=pool.device)
    end = first_token + count
    lo, hi = _whole_blocks(first_token, end, bs)
    flat = pool.view(-1, dim)
    if lo > first_token:
        _gather(flat, token_rows(block_ids, first_token, lo - first_token, bs), out[: lo - first_token])
    if hi > lo:
        _gather(pool, block_ids[lo // bs : hi // bs], out[lo - first_token : hi - first_token].view(-1, bs, dim))
    if end > hi:
        _gather(flat, token_rows(block_ids, hi, end - hi, bs), out[hi - first_token :])
    return out


def _whole_blocks(first: int, end: int, block_size: int) -> tuple[int, int]:
    """[lo, hi): the block-aligned middle of tokens [first, end) (empty when no block is whole)."""
    lo = min(-(-first // block_size) * block_size, end)
    return lo, max(lo, end // block_size * block_size)


def _scatter(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst[index[i]] = src[i] along dim 0."""
    if dst.is_cuda:
        dst.index_copy_(0, index, src)
    else:
        _numpy(dst)[index.numpy()] = _numpy(src)


def _gather(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = src[index[i]] along dim 0."""
    if src.is_cuda:
        torch.index_select(src, 0, index, out=out)
    else:
        np.take(_numpy(src), index.numpy(), axis=0, out=_numpy(out), mode="clip")  # "raise" would buffer `out`


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """The same memory as a numpy array of same-width integers (numpy has no bfloat16; bits are what we move)."""
    return tensor.view(_BITS[tensor.element_size()]).numpy()

"""The two halves every data-plane transport implements, the chunk of rows they move, and the receiver's side.

A sender splits each layer into chunks and hands them, in order, to its `SendChannel`. The receiver reads each
chunk's header from the session socket, checks its tag and bounds (`KVReceiver`), and asks its `ReceiveChannel` for
the rows, which it then lands in its pools through `Landing` (or drops, when the transfer is gone). Rows that pass
through host memory on both ends (tcp; nccl over gloo) are checksummed per (layer, kind): the sender folds each
chunk's bytes into a running checksum (`RowsDigest`: `Chunk.crc` in, the new value out of `send`), the receiver does
the same as they land, and the completion carries the sender's values. Transports: `tcp` (rows inline on the
socket), `nccl` (rows point-to-point through torch.distributed, gloo on CPU), `cuda_ipc` (the receiver reads the
sender's GPU memory).
"""

import os
import socket
import struct
import zlib
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from .frames import FrameHeader
from .paged_rows import read_rows

TRANSPORTS = ("tcp", "nccl", "cuda_ipc")


class Landing(Protocol):
    """What the receiver offers its channels. It decides, under each transfer's lock, whether rows may still land."""

    def land(self, header: FrameHeader, rows: torch.Tensor) -> None:
        """Write the chunk's rows into the pools (done when it returns)."""

    def set_source(self, key: int, block_ids: torch.Tensor, block_size: int) -> None:
        """The sender's block table of a transfer (CPU int64), for `copy_from` (cuda_ipc)."""

    def copy_from(self, header: FrameHeader, src_pool: torch.Tensor) -> None:
        """Enqueue the copy of the chunk's tokens from the sender's mapped pool into ours, pool to pool (cuda_ipc)."""

    def settle(self, key: int) -> None:
        """Return once every copy enqueued for the transfer has finished (cuda_ipc)."""


@dataclass
class Chunk:
    """Rows of tokens [offset, offset + count) of one (layer, kind) of a transfer, from a tensor or a paged pool."""

    header: FrameHeader
    frame_key: bytes  # tags the header (`auth.frame_key` of the transfer's capability and session)
    crc: int = 0  # running CRC-32 of the (layer, kind)'s bytes sent before this chunk
    rows: torch.Tensor | None = None  # rows mode: [count, dim]
    pool: torch.Tensor | None = None  # pools mode: the sender's pool and its block table for the sequence
    block_ids: torch.Tensor | None = None
    first_token: int = 0  # pools mode: position of the chunk's first token in the sequence

    def materialize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The rows as one contiguous tensor on the source's device (read from the pool into `out` if given)."""
        if self.rows is not None:
            return self.rows.contiguous()
        return read_rows(self.pool, self.block_ids, self.first_token, self.header.count, out)


class SendChannel(ABC):
    @abstractmethod
    def max_chunk_bytes(self, from_pool: bool) -> int | None:
        """The largest chunk this channel moves at once (None: any size, a whole layer is one chunk)."""

    @abstractmethod
    def open(self, key: int, frame_key: bytes, block_ids: torch.Tensor) -> None:
        """A transfer reads from the pools through this block table (on any device), covering its tokens."""

    @abstractmethod
    def send(self, chunk: Chunk) -> tuple[int, int | None]:
        """Move one chunk; returns payload bytes and the running CRC-32 with this chunk's bytes folded in (None when
        the bytes never pass through host memory). When it returns, the chunk's rows tensor may be reused; pool
        blocks only after `settle`."""

    @abstractmethod
    def settle(self, key: int, frame_key: bytes) -> None:
        """Return once the receiver is done reading the transfer's chunks sent so far."""

    @abstractmethod
    def close(self) -> None:
        """Release what the channel holds beyond the session socket (the sender closes that)."""


_CRC_THREADS = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="kvtransfer-crc")
CRC_PIECE_BYTES = 1 << 20


class RowsDigest:
    """The checksum of one (layer, kind)'s bytes, folded in frame by frame: each frame's payload is cut into pieces of
    `CRC_PIECE_BYTES`, each piece gets a CRC-32 (in parallel, on helper threads: zlib lets go of the GIL), and the
    pieces' CRCs, in order, are folded into the running value by another CRC-32. Both ends cut the same frames the
    same way, so they agree exactly when the bytes do; the pieces make it as fast as the cores allow."""

    def __init__(self, data, crc: int):
        view = memoryview(data).cast("B")
        self.crc = crc
        pieces = [view[i : i + CRC_PIECE_BYTES] for i in range(0, len(view), CRC_PIECE_BYTES)]
        if len(pieces) <= 1:
            self._pieces = [zlib.crc32(p) for p in pieces]
        else:
            self._pieces = [_CRC_THREADS.submit(zlib.crc32, p) for p in pieces]

    def result(self) -> int:
        """The running value with this frame folded in (the bytes must stay unchanged until this returns)."""
        pieces = [p if isinstance(p, int) else p.result() for p in self._pieces]
        return zlib.crc32(struct.pack(f"<{len(pieces)}I", *pieces), self.crc)


def crc_soon(data, crc: int) -> RowsDigest:
    """Start folding `data` into the running checksum `crc`; `.result()` gives the new value. It overlaps whatever
    else reads the same bytes meanwhile (the socket, the pool write)."""
    return RowsDigest(data, crc)


def host_crc(rows: torch.Tensor, crc: int) -> int | None:
    """`crc` with the bytes of `rows` folded in (see `RowsDigest`), if they are in host memory; None if not."""
    if rows.is_cuda:
        return None
    return crc_soon(rows.contiguous().view(-1).view(torch.uint8).numpy(), crc).result()


class ReceiveChannel(ABC):
    def __init__(self, sock: socket.socket):
        self.sock = sock

    @abstractmethod
    def extra_bytes_allowed(self, header: FrameHeader, row_bytes: int) -> bool:
        """Whether `header.extra` is what this transport sends after such a header (checked before any is read)."""

    @abstractmethod
    def receive(self, header: FrameHeader, landing: Landing) -> None:
        """Fetch the rows the header announces and hand them to `landing` once, possibly from another thread, in
        header order. Must consume the frame even when the transfer is gone, to stay in step with the sender."""

    @abstractmethod
    def close(self) -> None:
        """The session ended: land what already arrived, stop waiting for the peer, release what it shared."""

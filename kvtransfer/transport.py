"""The two halves every data-plane transport implements, the chunk of rows they move, and the receiver's side.

A sender splits each layer into chunks and hands them, in order, to its `SendChannel`. The receiver reads each
chunk's header from the session socket and asks its `ReceiveChannel` for the rows, which it then lands in its pools
through `Landing` (or drops, when the transfer is gone). Transports: `tcp` (rows inline on the socket), `nccl` (rows
point-to-point through torch.distributed, gloo on CPU), `cuda_ipc` (the receiver reads the sender's GPU memory).
"""

import socket
from abc import ABC, abstractmethod
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
    def open(self, key: int, block_ids: torch.Tensor) -> None:
        """A transfer reads from the pools through this block table (on any device), covering its tokens."""

    @abstractmethod
    def send(self, chunk: Chunk) -> int:
        """Move one chunk; returns payload bytes. When it returns, the chunk's rows tensor may be reused; pool
        blocks only after `settle`."""

    @abstractmethod
    def settle(self, key: int) -> None:
        """Return once the receiver is done reading the transfer's chunks sent so far."""

    @abstractmethod
    def close(self) -> None:
        """Release what the channel holds beyond the session socket (the sender closes that)."""


class ReceiveChannel(ABC):
    def __init__(self, sock: socket.socket):
        self.sock = sock

    @abstractmethod
    def receive(self, header: FrameHeader, landing: Landing) -> None:
        """Fetch the rows the header announces and hand them to `landing` once, possibly from another thread, in
        header order. Must consume the frame even when the transfer is gone, to stay in step with the sender."""

    @abstractmethod
    def close(self) -> None:
        """The session ended: land what already arrived, stop waiting for the peer, release what it shared."""

"""The two halves every data-plane transport implements, and the chunk of rows they move.

A sender splits each layer into chunks and hands them, in order, to its `SendChannel`. The receiver reads each
chunk's header from the session socket and asks its `ReceiveChannel` for the rows, which it then lands in its pools
(or drops, when the transfer is gone). Transports: `tcp` (rows inline on the socket), `nccl` (rows point-to-point
through torch.distributed, gloo on CPU), `cuda_ipc` (the receiver reads the sender's GPU memory).
"""

import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .frames import FrameHeader
from .paged_rows import read_rows

TRANSPORTS = ("tcp", "nccl", "cuda_ipc")

Land = Callable[[FrameHeader, torch.Tensor], None]


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
    max_chunk_bytes: int

    @abstractmethod
    def send(self, chunk: Chunk) -> int:
        """Move one chunk; returns payload bytes. When it returns, the chunk's source memory may be reused."""

    @abstractmethod
    def close(self) -> None:
        """Release what the channel holds beyond the session socket (the sender closes that)."""


class ReceiveChannel(ABC):
    def __init__(self, sock: socket.socket):
        self.sock = sock

    @abstractmethod
    def receive(self, header: FrameHeader, land: Land) -> None:
        """Fetch the rows the header announces and call `land(header, rows)` once, possibly from another thread,
        in header order. Must consume the frame even when the transfer is gone, to stay in step with the sender."""

    @abstractmethod
    def close(self) -> None:
        """The session ended: land what already arrived, stop waiting for the peer, release what it shared."""

"""`tcp`: the rows follow their header on the session socket as raw bytes. Works between any two hosts."""

import socket
from dataclasses import replace

import torch

from .frames import FrameHeader, recv_into_exact
from .layout import KVLayout
from .transport import Chunk, Landing, ReceiveChannel, SendChannel, crc_soon

CHUNK_BYTES = 8 << 20  # big enough to amortize the header and the per-chunk index ops, small enough to pipeline


def expected_bytes(layout: KVLayout, header: FrameHeader) -> int:
    return header.count * layout.row_dim(header.kind) * layout.dtype.itemsize


class TcpSendChannel(SendChannel):
    def __init__(self, sock: socket.socket, chunk_bytes: int = CHUNK_BYTES):
        self.sock = sock
        self.chunk_bytes = chunk_bytes
        self.buffer = torch.empty(0, dtype=torch.uint8)  # CPU pools gather into it: no fresh pages per chunk

    def max_chunk_bytes(self, from_pool: bool) -> int:
        return self.chunk_bytes

    def send(self, chunk: Chunk) -> tuple[int, int]:
        if chunk.pool is not None and not chunk.pool.is_cuda:
            dim, dtype = chunk.pool.shape[2], chunk.pool.dtype
            nbytes = chunk.header.count * dim * dtype.itemsize
            if self.buffer.numel() < nbytes:
                self.buffer = torch.empty(nbytes, dtype=torch.uint8)
            rows = chunk.materialize(out=self.buffer[:nbytes].view(dtype).view(-1, dim))
        else:
            rows = chunk.materialize().cpu()
        payload = rows.view(torch.uint8).numpy()
        crc = crc_soon(payload, chunk.crc)  # while the bytes go out
        header = replace(chunk.header, extra=payload.nbytes)
        self.sock.sendall(header.pack(chunk.frame_key))
        self.sock.sendall(payload)
        return payload.nbytes, crc.result()

    def open(self, key: int, frame_key: bytes, block_ids: torch.Tensor) -> None:
        """Rows travel inline: the receiver needs no block table."""

    def settle(self, key: int, frame_key: bytes) -> None:
        """Rows are copied into the socket by the time `send` returns."""

    def close(self) -> None:
        """Nothing beyond the socket."""


class TcpReceiveChannel(ReceiveChannel):
    def __init__(self, sock: socket.socket, layout: KVLayout):
        super().__init__(sock)
        self.layout = layout
        self.buffer = torch.empty(0, dtype=torch.uint8)  # reused across chunks; rows are copied out before the next

    def extra_bytes_allowed(self, header: FrameHeader, row_bytes: int) -> bool:
        return header.extra == header.count * row_bytes

    def receive(self, header: FrameHeader, landing: Landing) -> None:
        nbytes = expected_bytes(self.layout, header)  # bounded by the receiver before this is called
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        payload = self.buffer[:nbytes]
        recv_into_exact(self.sock, memoryview(payload.numpy()))
        landing.land(header, payload.view(self.layout.dtype).view(header.count, -1))

    def close(self) -> None:
        """Every chunk was landed as it arrived; nothing else is held."""
        self.buffer = torch.empty(0, dtype=torch.uint8)

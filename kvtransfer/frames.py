"""The data-plane socket: a hello naming the session, then one fixed header per chunk of rows.

Every transport keeps this socket open for the whole session: its end is how the receiver learns the sender died.
`extra` is how many bytes follow the header on the socket: the raw rows (tcp), nothing (nccl: the rows travel
point-to-point), or a small descriptor of where to read them (cuda_ipc).
"""

import socket
import struct
from dataclasses import dataclass

from .layout import RowKind

MAGIC = b"KVT1"
_HELLO = struct.Struct("<4sH")
_HEADER = struct.Struct("<QiB3xqqQ")
SOCKET_BUFFER_BYTES = 4 << 20


class ConnectionClosed(ConnectionError):
    pass


@dataclass(frozen=True)
class FrameHeader:
    key: int  # the transfer, as numbered by the receiver at OpenTransfer
    layer: int
    kind: RowKind
    offset: int  # first token of the chunk, counted from the transfer's start_token
    count: int  # tokens in the chunk
    extra: int = 0

    SIZE = _HEADER.size

    def pack(self) -> bytes:
        return _HEADER.pack(self.key, self.layer, int(self.kind), self.offset, self.count, self.extra)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> "FrameHeader":
        key, layer, kind, offset, count, extra = _HEADER.unpack(raw)
        return cls(key, layer, RowKind(kind), offset, count, extra)


def tune(sock: socket.socket) -> None:
    """Big buffers for bulk rows, no Nagle delay for the small headers."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)


def pack_hello(session_id: str) -> bytes:
    raw = session_id.encode()
    return _HELLO.pack(MAGIC, len(raw)) + raw


def read_hello(sock: socket.socket) -> str:
    magic, length = _HELLO.unpack(recv_exact(sock, _HELLO.size))
    if magic != MAGIC:
        raise ConnectionError(f"not a KV transfer peer (magic {magic!r})")
    return recv_exact(sock, length).decode()


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket; ConnectionClosed if the peer goes away first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionClosed("peer closed the data-plane connection")
        got += n


def recv_exact(sock: socket.socket, nbytes: int) -> bytearray:
    buf = bytearray(nbytes)
    recv_into_exact(sock, memoryview(buf))
    return buf


def read_header(sock: socket.socket) -> FrameHeader:
    return FrameHeader.unpack(recv_exact(sock, FrameHeader.SIZE))

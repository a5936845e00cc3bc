"""The data-plane socket: an authenticated hello naming the session, then one fixed header per chunk of rows.

Every transport keeps this socket open for the whole session: its end is how the receiver learns the sender died.
`extra` is how many bytes follow the header on the socket: the raw rows (tcp), nothing (nccl: the rows travel
point-to-point), or a small descriptor of where to read them (cuda_ipc).

The hello is a challenge and response over the cluster secret, bound to the session the control-plane handshake
created: the sender sends the magic, the session id and a nonce; the receiver answers with its own nonce and its
proof; the sender checks that and sends its proof. A peer that cannot prove the secret is hung up on and learns only
the receiver's nonce. Each header ends with a tag keyed by the transfer's capability and the session
(`auth.frame_key`), so frames of a transfer can only come from the session that opened it.
"""

import secrets
import select
import socket
import struct
from dataclasses import dataclass

from .auth import NONCE_BYTES, TAG_BYTES, ClusterSecret, frame_tag, hello_proof, same
from .layout import RowKind

MAGIC = b"KVT2"
_HELLO = struct.Struct("<4sH")
_MAX_SESSION_ID = 64
_PROOF_BYTES = 32
_HEADER = struct.Struct("<QiB3xqqQ")
SOCKET_BUFFER_BYTES = 4 << 20


class ConnectionClosed(ConnectionError):
    pass


class HelloRefused(ConnectionError):
    """The peer did not prove the cluster secret."""


@dataclass(frozen=True)
class FrameHeader:
    key: int  # the transfer, as numbered by the receiver at OpenTransfer
    layer: int
    kind: RowKind
    offset: int  # first token of the chunk, counted from the transfer's start_token
    count: int  # tokens in the chunk
    extra: int = 0

    BODY = _HEADER.size
    SIZE = _HEADER.size + TAG_BYTES

    def body(self) -> bytes:
        return _HEADER.pack(self.key, self.layer, int(self.kind), self.offset, self.count, self.extra)

    def pack(self, key: bytes) -> bytes:
        """The header and its tag under the transfer's frame key."""
        body = self.body()
        return body + frame_tag(key, body)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> tuple["FrameHeader", bytes, bytes]:
        """(header, the bytes its tag covers, the tag). Raises ValueError for a kind that does not exist."""
        raw = bytes(raw)
        key, layer, kind, offset, count, extra = _HEADER.unpack(raw[: cls.BODY])
        return cls(key, layer, RowKind(kind), offset, count, extra), raw[: cls.BODY], raw[cls.BODY :]


def tag_ok(key: bytes, body: bytes, tag: bytes) -> bool:
    return same(frame_tag(key, body), tag)


def tune(sock: socket.socket) -> None:
    """Big buffers for bulk rows, no Nagle delay for the small headers."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)


def send_hello(sock: socket.socket, secret: ClusterSecret, session_id: str) -> None:
    """The sender's side of the hello; raises HelloRefused if the receiver cannot prove the secret."""
    raw = session_id.encode()
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    sock.sendall(_HELLO.pack(MAGIC, len(raw)) + raw + client_nonce)
    answer = recv_exact(sock, NONCE_BYTES + _PROOF_BYTES)
    server_nonce, proof = bytes(answer[:NONCE_BYTES]), bytes(answer[NONCE_BYTES:])
    if not same(proof, hello_proof(secret, b"receiver", session_id, client_nonce, server_nonce)):
        raise HelloRefused("the KV receiver did not prove the cluster secret")
    sock.sendall(hello_proof(secret, b"sender", session_id, client_nonce, server_nonce))


def read_hello(sock: socket.socket, secret: ClusterSecret) -> str:
    """The receiver's side: the session id the sender proved it may attach to. Raises HelloRefused."""
    magic, length = _HELLO.unpack(recv_exact(sock, _HELLO.size))
    if magic != MAGIC or not 0 < length <= _MAX_SESSION_ID:
        raise HelloRefused("not a KV transfer peer")
    body = recv_exact(sock, length + NONCE_BYTES)
    try:
        session_id = bytes(body[:length]).decode("ascii")
    except UnicodeDecodeError:
        raise HelloRefused("not a KV transfer peer") from None
    client_nonce = bytes(body[length:])
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    sock.sendall(server_nonce + hello_proof(secret, b"receiver", session_id, client_nonce, server_nonce))
    proof = bytes(recv_exact(sock, _PROOF_BYTES))
    if not same(proof, hello_proof(secret, b"sender", session_id, client_nonce, server_nonce)):
        raise HelloRefused("the peer did not prove the cluster secret")
    return session_id


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket; ConnectionClosed if the peer goes away first (socket.timeout if it stalls
    longer than the socket's timeout)."""
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


def discard_exact(sock: socket.socket, nbytes: int, scratch: memoryview) -> None:
    """Read and drop `nbytes` through `scratch` (memory stays bounded by it)."""
    while nbytes:
        piece = scratch[: min(nbytes, len(scratch))]
        recv_into_exact(sock, piece)
        nbytes -= len(piece)


def read_header(sock: socket.socket) -> tuple[FrameHeader, bytes, bytes]:
    return FrameHeader.unpack(recv_exact(sock, FrameHeader.SIZE))


def socket_closed(sock: socket.socket) -> bool:
    """For a socket the peer only writes to in answer to us: readable means closed."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)

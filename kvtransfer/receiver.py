"""The receiving end, run by the decode worker next to its KV pools.

The decode worker registers a transfer (destination blocks, tokens, lease, and a capability it drew) and gets a
future; a prefill worker connects with a `KVSender`, opens the transfer with the capability, streams layers over the
data plane, and completes it. The future resolves with the `Completion` once every layer landed and matched its
checksum, or fails with `TransferFailed` on lease expiry, abort, a lost sender, a bad field or receiver shutdown.
After a failure the transfer is forgotten: rows that still arrive for it are dropped.

Trust: every control-plane call must be signed with the cluster secret and every data-plane connection must prove it
in its hello (`auth`, `control`, `frames`); calls about a transfer must carry its capability and come from the
session that opened it; a data frame must name a transfer its session opened and carry that transfer's tag. Every
field is checked against what was registered before memory is allocated or written, and every resource a peer can
make this spend is bounded (`ReceiverLimits`). A peer that breaks the protocol after authenticating loses its session
(and its transfers fail, so the decode worker recomputes); one that never authenticated learns nothing.

Threads: gRPC workers (control plane, bounded), one accept loop, one thread per data-plane connection (bounded), one
lease reaper. The receiver is its channels' `Landing`. On a GPU, cuda_ipc copies run on the receiver's own copy
stream. From asyncio: `await asyncio.wrap_future(receiver.register(...))`.
"""

import contextlib
import logging
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch
import torch.distributed as dist

from . import kv_transfer_pb2 as pb
from .auth import CAPABILITY_BYTES, ClusterSecret, resolve_secret, same
from .completion import Completion
from .control import MAX_MESSAGE_BYTES, server_handler
from .cuda_ipc_transport import CudaIpcReceiveChannel, PeerBuffers
from .errors import (
    FailureKind,
    LeaseExpired,
    PeerLost,
    TransferAborted,
    TransferFailed,
    status_of,
    status_ok,
)
from .frames import ConnectionClosed, FrameHeader, HelloRefused, discard_exact, read_hello, recv_exact, tag_ok, tune
from .host import host_id
from .incoming_transfer import IncomingTransfer, State
from .layout import KVLayout
from .limits import CompletionCheck, ReceiverLimits
from .nccl_transport import RECEIVER_RANK, NcclReceiveChannel, backend_for, create_group, create_store
from .stats import ReceiverStats
from .tcp_transport import TcpReceiveChannel
from .transport import TRANSPORTS, ReceiveChannel

log = logging.getLogger(__name__)

_REMEMBERED_FAILURES = 4096  # so a late sender learns why its transfer is gone, not just that it is
_REMEMBERED_KEYS = 4096  # per session: transfers it opened, so their late frames are recognized (and dropped)
_IDLE_POLL_S = 1.0


class ProtocolViolation(ConnectionError):
    """An authenticated peer sent what the protocol does not allow: its session ends."""


@dataclass
class _OpenedKey:
    """A transfer a session opened, as its frames are checked (kept after the transfer ends, to drop late frames)."""

    frame_key: bytes
    num_tokens: int


@dataclass
class _Session:
    session_id: str
    transport: str
    created_at: float
    peer: PeerBuffers | None = None  # cuda_ipc: the sender's memory, mapped at handshake
    sock: socket.socket | None = None
    opened: OrderedDict[int, _OpenedKey] = field(default_factory=OrderedDict)


@dataclass
class _Failure:
    error: TransferFailed
    capability: bytes


class KVReceiver:
    def __init__(
        self,
        layout: KVLayout,
        latent: list[torch.Tensor],
        index_keys: dict[int, torch.Tensor],
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        transports: Sequence[str] = ("tcp",),
        rendezvous_timeout_s: float = 60.0,
        secret: ClusterSecret | bytes | str | None = None,
        limits: ReceiverLimits | None = None,
        completion_check: CompletionCheck | None = None,
    ):
        """Listens on `host` only (gRPC, the data plane and nccl's rendezvous store), advertising `advertise_host`
        (default `host`). `transports`: the handshakes accepted (one, in a deployment: the configured one).
        `secret`: the cluster secret (default: `auth.resolve_secret()`). `completion_check`: what a completion must
        satisfy for the model (token ids in its vocabulary, its hidden width)."""
        layout.check_pools(latent, index_keys)
        unknown = set(transports) - set(TRANSPORTS)
        if unknown or not transports:
            raise ValueError(f"unknown transports {sorted(unknown)}; choose from {TRANSPORTS}")
        self.layout = layout
        self.latent = latent
        self.index_keys = index_keys
        self.device = latent[0].device
        self.num_blocks = latent[0].shape[0]
        # cuda_ipc copies pool to pool here, off the decode worker's stream, as the sender's frames arrive
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.transports = tuple(transports)
        self.rendezvous_timeout_s = rendezvous_timeout_s
        self.limits = limits or ReceiverLimits()
        self.completion_check = completion_check
        self.stats = ReceiverStats()
        self._secret = resolve_secret(secret)

        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._transfers: dict[str, IncomingTransfer] = {}
        self._by_key: dict[int, IncomingTransfer] = {}
        self._failed: OrderedDict[str, _Failure] = OrderedDict()
        self._sessions: dict[str, _Session] = {}
        self._connections = threading.BoundedSemaphore(self.limits.max_connections)
        self._closed = False
        self._store: dist.TCPStore | None = None  # nccl rendezvous, started on first use

        self.bind_host = host
        self.host = advertise_host or host
        self._listener = socket.create_server((host, 0), backlog=self.limits.max_connections)
        self.data_port = self._listener.getsockname()[1]
        self._server = grpc.server(
            ThreadPoolExecutor(self.limits.rpc_workers, thread_name_prefix="kvtransfer-rpc"),
            maximum_concurrent_rpcs=self.limits.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        self._server.add_generic_rpc_handlers(
            (
                server_handler(
                    self._secret,
                    {
                        "Handshake": self._handshake,
                        "OpenTransfer": self._open,
                        "RenewLease": self._renew,
                        "Complete": self._complete,
                        "Abort": self._abort,
                    },
                ),
            )
        )
        self.port = self._server.add_insecure_port(f"{host}:0")
        self._server.start()
        self._threads = [
            threading.Thread(target=self._accept_loop, name="kvtransfer-accept", daemon=True),
            threading.Thread(target=self._reap_loop, name="kvtransfer-lease", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info("KV receiver on %s (data plane port %d, transports %s)", self.address, self.data_port, transports)

    @property
    def address(self) -> str:
        """What a sender passes to `KVSender.connect`."""
        return f"{self.host}:{self.port}"

    def register(
        self,
        transfer_id: str,
        dst_block_ids: Sequence[int] | torch.Tensor,
        num_tokens: int,
        start_token: int = 0,
        lease_s: float = 30.0,
        *,
        capability: bytes,
    ) -> Future[Completion]:
        """Expect tokens [start_token, start_token + num_tokens) of a sequence whose block table is `dst_block_ids`
        (token t lands in block dst_block_ids[t // block_size], slot t % block_size; blocks before start_token's are
        not touched). Only a sender that presents `capability` (`auth.new_capability()`: hand it to the one prefill
        worker chosen) may open and complete it. The lease starts now; the sender renews it."""
        bs = self.layout.block_size
        dst = torch.as_tensor(dst_block_ids, dtype=torch.int64).flatten()
        if num_tokens < 0 or start_token < 0 or lease_s <= 0:
            raise ValueError(f"bad transfer: num_tokens {num_tokens}, start_token {start_token}, lease_s {lease_s}")
        if not isinstance(capability, bytes) or len(capability) < CAPABILITY_BYTES // 2:
            raise ValueError(f"a transfer's capability must be random bytes (at least {CAPABILITY_BYTES // 2})")
        if dst.numel() * bs < start_token + num_tokens:
            raise ValueError(f"{dst.numel()} blocks of {bs} cannot hold tokens up to {start_token + num_tokens}")
        touched = dst[start_token // bs : -(-(start_token + num_tokens) // bs)]
        if touched.numel() and (touched.min() < 0 or touched.max() >= self.num_blocks):
            raise ValueError(f"destination blocks must lie in [0, {self.num_blocks})")
        with self._lock:
            if self._closed:
                raise RuntimeError("the KV receiver is closed")
            if transfer_id in self._transfers:
                raise ValueError(f"transfer {transfer_id!r} is already registered")
            self._failed.pop(transfer_id, None)
            key = secrets.randbits(63)
            while key in self._by_key or key == 0:
                key = secrets.randbits(63)
            transfer = IncomingTransfer(
                transfer_id,
                key,
                self.layout,
                self.latent,
                self.index_keys,
                dst.to(self.device),
                start_token,
                num_tokens,
                lease_s,
                capability,
                self._copy_stream,
            )
            self._transfers[transfer_id] = transfer
            self._by_key[transfer.key] = transfer
            self.stats.transfers_registered += 1
            self._wakeup.notify()
        return transfer.future

    def abort(self, transfer_id: str, reason: str = "aborted by the receiver") -> bool:
        """Fail a transfer now (e.g. the client went away); False if it is not live."""
        with self._lock:
            transfer = self._transfers.get(transfer_id)
        return transfer is not None and self._fail(transfer, TransferAborted(reason))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            transfers = list(self._transfers.values())
            sessions = list(self._sessions.values())
            self._wakeup.notify()
        for transfer in transfers:
            self._fail(transfer, TransferFailed("the KV receiver shut down", FailureKind.CLOSED))
        self._server.stop(grace=1.0)
        self._listener.close()
        for session in sessions:
            if session.sock is not None:
                _shutdown(session.sock)
        self._store = None
        log.info("KV receiver %s closed", self.address)

    def __enter__(self) -> "KVReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- outcomes -------------------------------------------------------------------------------------------------

    def _fail(self, transfer: IncomingTransfer, error: TransferFailed) -> bool:
        if not transfer.fail(error):  # after this no write is in flight and none will start
            return False
        with self._lock:
            self._forget(transfer)
            self._failed[transfer.transfer_id] = _Failure(error, transfer.capability)
            while len(self._failed) > _REMEMBERED_FAILURES:
                self._failed.popitem(last=False)
            self.stats.transfers_failed += 1
            self.stats.failures_by_kind[error.kind.value] += 1
        # an abort is what a client disconnect looks like: ordinary, one line per request at DEBUG
        level = logging.DEBUG if error.kind is FailureKind.ABORTED else logging.WARNING
        log.log(level, "KV transfer %s failed (%s): %s", transfer.transfer_id, error.kind.value, error.reason)
        transfer.future.set_exception(error)
        return True

    def _finish(self, transfer: IncomingTransfer) -> None:
        with self._lock:
            self._forget(transfer)
            self.stats.transfers_completed += 1
            self.stats.transfer_seconds += time.monotonic() - transfer.registered_at
            if transfer.num_tokens:
                self.stats.data_seconds += transfer.rows_landed_at - transfer.first_rows_at
        log.debug("KV transfer %s complete", transfer.transfer_id)
        transfer.future.set_result(transfer.completion)

    def _forget(self, transfer: IncomingTransfer) -> None:
        self._transfers.pop(transfer.transfer_id, None)
        self._by_key.pop(transfer.key, None)

    def _reap_loop(self) -> None:
        while True:
            with self._wakeup:
                if self._closed:
                    return
                now = time.monotonic()
                expired = [t for t in self._transfers.values() if t.deadline <= now]
                # a handshake whose sender never connected holds a session slot (and, cuda_ipc, mapped memory)
                stale = [
                    s
                    for s in self._sessions.values()
                    if s.sock is None and now - s.created_at > self.limits.hello_timeout_s + self.rendezvous_timeout_s
                ]
                for session in stale:
                    del self._sessions[session.session_id]
                    session.peer = None
                if not expired:
                    next_deadline = min((t.deadline for t in self._transfers.values()), default=now + 1.0)
                    self._wakeup.wait(timeout=min(next_deadline - now, 1.0))
                    continue
            for transfer in expired:
                waiting_for = "the sender's renewal" if transfer.session_id else "a sender to open it"
                self._fail(transfer, LeaseExpired(f"lease of {transfer.lease_s:g}s expired waiting for {waiting_for}"))

    # -- data plane -----------------------------------------------------------------------------------------------

    # `Landing`, for the channels: called in frame order per session, for frames whose tag and bounds were checked

    def land(self, header: FrameHeader, rows: torch.Tensor) -> None:
        self._deliver(header, rows.numel() * rows.element_size(), lambda t: t.write(header, rows))

    def copy_from(self, header: FrameHeader, src_pool: torch.Tensor) -> None:
        nbytes = header.count * src_pool.shape[2] * src_pool.element_size()
        self._deliver(header, nbytes, lambda t: t.copy_from(header, src_pool))

    def set_source(self, key: int, block_ids: torch.Tensor, block_size: int) -> None:
        transfer = self._live(key)
        if transfer is not None:
            try:
                transfer.set_source(block_ids, block_size)
            except TransferFailed as e:
                self._fail(transfer, e)

    def settle(self, key: int) -> None:
        transfer = self._live(key)
        if transfer is not None:  # one that is gone waited for its copies when it went
            transfer.settle()

    def _live(self, key: int) -> IncomingTransfer | None:
        with self._lock:
            return self._by_key.get(key)

    def _deliver(self, header: FrameHeader, nbytes: int, write: Callable[[IncomingTransfer], bool | None]) -> None:
        """Write one chunk into its transfer (`write` returns what `IncomingTransfer.write` does) and account it."""
        transfer = self._live(header.key)
        try:
            landed = None if transfer is None else write(transfer)
        except TransferFailed as e:
            self._fail(transfer, e)
            return
        with self._lock:
            if landed is None:
                self.stats.chunks_dropped += 1
            else:
                self.stats.bytes_received += nbytes
        if landed is None:
            log.debug("dropped a chunk for a transfer that is gone (layer %d)", header.layer)
        elif landed:
            self._finish(transfer)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return  # closed
            if not self._connections.acquire(blocking=False):
                self.stats.connections_refused += 1
                log.debug("refused a data-plane connection from %s: %d open", peer, self.limits.max_connections)
                _close(conn)
                continue
            try:
                threading.Thread(
                    target=self._serve_connection, args=(conn, peer), name="kvtransfer-session", daemon=True
                ).start()
            except RuntimeError:  # no thread to be had
                self._connections.release()
                _close(conn)

    def _serve_connection(self, conn: socket.socket, peer) -> None:
        try:
            self._serve_session(conn, peer)
        finally:
            self._connections.release()

    def _serve_session(self, conn: socket.socket, peer) -> None:
        session = None
        channel = None
        reason = "the sender closed the connection"
        try:
            conn.settimeout(self.limits.hello_timeout_s)
            try:
                session_id = read_hello(conn, self._secret)
            except (HelloRefused, OSError, ValueError) as e:  # OSError: timeouts and resets; nothing was learned
                self.stats.hellos_refused += 1
                log.debug("refused a data-plane hello from %s: %s", peer, e)
                return
            with self._lock:
                found = self._sessions.get(session_id)
                if found is None or found.sock is not None:
                    self.stats.hellos_refused += 1
                    log.debug("refused a data-plane hello from %s: no such session, or attached already", peer)
                    return
                found.sock = conn
                session = found
            tune(conn)
            conn.settimeout(self.rendezvous_timeout_s)
            channel = self._open_channel(session, conn)
            log.info("KV sender %s attached (session %s, %s)", peer, session.session_id, session.transport)
            scratch = None
            while True:
                header, body, tag = self._next_header(conn, session)
                if self._frame_for_gone_transfer(session, channel, header, body, tag):
                    scratch = scratch if scratch is not None else memoryview(bytearray(1 << 20))
                    self._drain(channel, conn, header, scratch)
                else:
                    channel.receive(header, self)
        except ConnectionClosed:
            pass
        except Exception as e:
            reason = f"data plane error: {e}"
            if not self._closed:
                log.warning("KV session from %s ended: %s", peer, e)
        finally:
            if channel is not None:
                channel.close()  # lands what already arrived before anything fails
            if session is not None:
                self._end_session(session, reason)
            _close(conn)

    def _next_header(self, conn: socket.socket, session: _Session) -> tuple[FrameHeader, bytes, bytes]:
        """Wait for a frame while the session has live transfers (or was active within the idle timeout); once its
        first byte is here, the rest must follow within the read timeout."""
        conn.settimeout(_IDLE_POLL_S)
        idle_since = time.monotonic()
        while True:
            try:
                first = conn.recv(1)
                break
            except TimeoutError:
                if self._closed:
                    raise ConnectionClosed("the receiver is closing") from None
                now = time.monotonic()
                if self._has_live(session):
                    idle_since = now
                elif now - idle_since > self.limits.idle_timeout_s:
                    raise ConnectionClosed(f"idle for {self.limits.idle_timeout_s:g} s") from None
        if not first:
            raise ConnectionClosed("peer closed the data-plane connection")
        conn.settimeout(self.limits.read_timeout_s)
        try:
            raw = first + recv_exact(conn, FrameHeader.SIZE - 1)
            header, body, tag = FrameHeader.unpack(raw)
        except TimeoutError:
            raise ProtocolViolation(f"a frame header stalled for {self.limits.read_timeout_s:g} s") from None
        except ValueError as e:
            raise ProtocolViolation(f"bad frame header: {e}") from None
        return header, body, tag

    def _has_live(self, session: _Session) -> bool:
        with self._lock:
            return any(t.session_id == session.session_id for t in self._transfers.values())

    def _frame_for_gone_transfer(
        self, session: _Session, channel: ReceiveChannel, header: FrameHeader, body: bytes, tag: bytes
    ) -> bool:
        """Check a header against what the session opened before anything is read or allocated for it. False: it
        is for a live transfer; True: for one this session opened that has ended (drain it). A header for anything
        else, with a bad tag, or out of bounds raises ProtocolViolation."""
        opened = session.opened.get(header.key)
        if opened is None or not tag_ok(opened.frame_key, body, tag):
            raise ProtocolViolation("a frame for no transfer this session opened (or with a bad tag)")
        layout = self.layout
        if not 0 <= header.layer < layout.num_layers or header.kind not in layout.kinds(header.layer):
            raise ProtocolViolation(f"a frame for layer {header.layer} {header.kind.name.lower()}, not in the layout")
        row_bytes = layout.row_dim(header.kind) * layout.dtype.itemsize
        if not 0 <= header.count <= opened.num_tokens or header.count * row_bytes > self.limits.max_frame_bytes:
            raise ProtocolViolation(
                f"a frame of {header.count} rows (the transfer has {opened.num_tokens} tokens, frames at most "
                f"{self.limits.max_frame_bytes} bytes)"
            )
        if header.extra > self.limits.max_frame_bytes or not channel.extra_bytes_allowed(header, row_bytes):
            raise ProtocolViolation(f"a frame announcing {header.extra} bytes after its header")
        return self._live(header.key) is None

    def _drain(self, channel: ReceiveChannel, conn: socket.socket, header: FrameHeader, scratch: memoryview) -> None:
        """A late frame for a transfer that has ended: consume it (to stay in step with the sender) without
        writing anything. nccl and cuda_ipc frames go to their channel, whose landing drops them."""
        if isinstance(channel, TcpReceiveChannel):
            discard_exact(conn, header.extra, scratch)
            with self._lock:
                self.stats.chunks_dropped += 1
            return
        channel.receive(header, self)

    def _open_channel(self, session: _Session, conn: socket.socket) -> ReceiveChannel:
        if session.transport == "tcp":
            return TcpReceiveChannel(conn, self.layout)
        if session.transport == "cuda_ipc":
            return CudaIpcReceiveChannel(conn, self.layout, session.peer, self.device, self._copy_stream)
        backend = backend_for(self.device)
        host = self.bind_host if backend == "gloo" else None
        group = create_group(self._store, session.session_id, RECEIVER_RANK, backend, self.rendezvous_timeout_s, host)
        return NcclReceiveChannel(conn, self.layout, group, self.device)

    def _end_session(self, session: _Session, reason: str) -> None:
        with self._lock:
            self._sessions.pop(session.session_id, None)
            orphans = [t for t in self._transfers.values() if t.session_id == session.session_id]
        for transfer in orphans:
            self._fail(transfer, PeerLost(f"lost the sender: {reason}"))
        session.peer = None

    # -- control plane (signed calls only: `control.server_handler` checked the signature) -----------------------

    def _handshake(self, request: pb.HandshakeRequest) -> pb.HandshakeReply:
        def reject(error: str) -> pb.HandshakeReply:
            log.warning("KV handshake rejected: %s", error)
            return pb.HandshakeReply(accepted=False, error=error)

        if request.transport not in self.transports:
            return reject(f"transport {request.transport!r} not offered (this receiver offers {self.transports})")
        try:
            peer_layout = KVLayout.from_proto(request.layout)
        except ValueError as e:
            return reject(str(e))
        mismatch = self.layout.mismatch(peer_layout)
        if mismatch:
            return reject(f"KV layouts differ: {mismatch}")
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                return reject(f"too many sessions ({self.limits.max_sessions})")
        session = _Session(secrets.token_hex(16), request.transport, time.monotonic())
        reply = pb.HandshakeReply(
            accepted=True,
            layout=self.layout.to_proto(),
            session_id=session.session_id,
            data_host=self.host,
            data_port=self.data_port,
        )
        if request.transport == "cuda_ipc":
            if self.device.type != "cuda":
                return reject("cuda_ipc needs the receiver's pools on a GPU")
            if request.host_id != host_id():
                return reject("cuda_ipc needs both ends on one host")
            try:
                session.peer = PeerBuffers.map(request.cuda_ipc, self.layout, self.device)
            except Exception as e:
                return reject(f"could not map the sender's CUDA IPC buffers: {e}")
        if request.transport == "nccl":
            with self._lock:
                if self._store is None:
                    self._store = create_store(self.bind_host, self.rendezvous_timeout_s)
            reply.store_host, reply.store_port = self.host, self._store.port
            reply.nccl_backend = backend_for(self.device)
        with self._lock:
            if self._closed:
                return reject("the KV receiver is closed")
            self._sessions[session.session_id] = session
        return reply

    def _find(self, session_id: str, ref: pb.TransferRef, opening: bool = False):
        """(transfer, None) if `ref` names a live transfer with its capability, opened by `session_id` (or, when
        `opening`, by no session yet); else (None, why). Call with the lock held. Without the right capability the
        answer is the same as for a transfer that never existed."""
        transfer = self._transfers.get(ref.transfer_id)
        if transfer is None or not same(transfer.capability, ref.capability):
            failure = self._failed.get(ref.transfer_id)
            if failure is not None and same(failure.capability, ref.capability):
                return None, status_of(failure.error)
            return None, pb.TransferStatus(failure=pb.UNKNOWN_TRANSFER, reason="no such transfer")
        if opening:
            if transfer.session_id is not None:
                return None, pb.TransferStatus(failure=pb.INVALID, reason="the transfer is open in another session")
        elif transfer.session_id != session_id:
            return None, pb.TransferStatus(failure=pb.INVALID, reason="the transfer is not open in this session")
        return transfer, None

    def _open(self, request: pb.OpenTransferRequest) -> pb.OpenTransferReply:
        with self._lock:
            session = self._sessions.get(request.session_id)
            if session is None:
                return pb.OpenTransferReply(
                    status=pb.TransferStatus(failure=pb.PEER_LOST, reason="unknown or closed session")
                )
            transfer, status = self._find(request.session_id, request.transfer, opening=True)
            if transfer is None:
                return pb.OpenTransferReply(status=status)
            transfer.attach(session.session_id)
            session.opened[transfer.key] = _OpenedKey(transfer.frame_key, transfer.num_tokens)
            while len(session.opened) > _REMEMBERED_KEYS:
                session.opened.popitem(last=False)
            transfer.renew()
            return pb.OpenTransferReply(
                status=status_ok(),
                key=transfer.key,
                num_tokens=transfer.num_tokens,
                start_token=transfer.start_token,
                lease_seconds=transfer.lease_s,
                max_frame_bytes=self.limits.max_frame_bytes,
            )

    def _renew(self, request: pb.RenewLeaseRequest) -> pb.RenewLeaseReply:
        statuses = []
        with self._lock:
            for ref in request.transfers:  # one status each, as the sender expects (the message is bounded)
                transfer, status = self._find(request.session_id, ref)
                if transfer is not None and transfer.state is State.LIVE:
                    transfer.renew()
                    statuses.append(status_ok())
                else:
                    statuses.append(status or pb.TransferStatus(failure=pb.CLOSED, reason="the transfer has ended"))
        return pb.RenewLeaseReply(statuses=statuses)

    def _complete(self, request: pb.CompleteRequest) -> pb.TransferStatus:
        with self._lock:
            transfer, status = self._find(request.session_id, request.transfer)
            if transfer is None:
                return status
        transfer.renew()  # the sender stops renewing now; rows may still be landing
        try:
            completion = Completion.from_proto(request)
            problem = self.completion_check.problem(completion) if self.completion_check is not None else None
            if problem is not None:
                raise TransferFailed(f"bad completion: {problem}", FailureKind.INVALID)
            finished = transfer.complete(completion, list(request.checksums))
        except TransferFailed as e:
            self._fail(transfer, e)
            return status_of(e)
        except (ValueError, RuntimeError) as e:  # a hidden state whose bytes do not match its shape and dtype
            error = TransferFailed(f"bad completion: {e}", FailureKind.INVALID)
            self._fail(transfer, error)
            return status_of(error)
        if finished is None:
            return status_of(transfer.failure)
        if finished:
            self._finish(transfer)
        return status_ok()

    def _abort(self, request: pb.AbortRequest) -> pb.TransferStatus:
        with self._lock:
            transfer, status = self._find(request.session_id, request.transfer)
            if transfer is None:
                return status
        self._fail(transfer, TransferAborted(f"aborted by the sender: {request.reason[:200]}"))
        return status_ok()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _close(sock: socket.socket) -> None:
    _shutdown(sock)
    with contextlib.suppress(OSError):
        sock.close()

"""The receiving end, run by the decode worker next to its KV pools.

The decode worker registers a transfer (destination blocks, tokens, lease) and gets a future; a prefill worker
connects with a `KVSender`, opens the transfer, streams layers over the data plane, and completes it. The future
resolves with the `Completion` once every layer landed, or fails with `TransferFailed` on lease expiry, abort, a lost
sender or receiver shutdown. After a failure the transfer is forgotten: rows that still arrive for it are dropped.

Threads: gRPC workers (control plane), one accept loop, one thread per sender session (data plane), one lease reaper.
The receiver is its channels' `Landing`. On a GPU, cuda_ipc copies run on the receiver's own copy stream.
From asyncio: `await asyncio.wrap_future(receiver.register(...))`.
"""

import contextlib
import itertools
import logging
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import grpc
import torch
import torch.distributed as dist

from . import kv_transfer_pb2 as pb
from . import kv_transfer_pb2_grpc as pb_grpc
from .completion import Completion
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
from .frames import ConnectionClosed, FrameHeader, read_header, read_hello, tune
from .host import host_id
from .incoming_transfer import IncomingTransfer, State
from .layout import KVLayout
from .nccl_transport import RECEIVER_RANK, NcclReceiveChannel, backend_for, create_group
from .stats import ReceiverStats
from .tcp_transport import TcpReceiveChannel
from .transport import TRANSPORTS, ReceiveChannel

log = logging.getLogger(__name__)

_REMEMBERED_FAILURES = 4096  # so a late sender learns why its transfer is gone, not just that it is


@dataclass
class _Session:
    session_id: str
    transport: str
    peer: PeerBuffers | None = None  # cuda_ipc: the sender's memory, mapped at handshake
    sock: socket.socket | None = None


class KVReceiver:
    def __init__(
        self,
        layout: KVLayout,
        latent: list[torch.Tensor],
        index_keys: dict[int, torch.Tensor],
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        transports: Sequence[str] = TRANSPORTS,
        rendezvous_timeout_s: float = 60.0,
        rpc_workers: int = 8,
    ):
        layout.check_pools(latent, index_keys)
        unknown = set(transports) - set(TRANSPORTS)
        if unknown:
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
        self.stats = ReceiverStats()

        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._transfers: dict[str, IncomingTransfer] = {}
        self._by_key: dict[int, IncomingTransfer] = {}
        self._failed: OrderedDict[str, TransferFailed] = OrderedDict()
        self._sessions: dict[str, _Session] = {}
        self._keys = itertools.count(1)
        self._closed = False
        self._store: dist.TCPStore | None = None  # nccl rendezvous, started on first use

        self.host = advertise_host or host
        self._listener = socket.create_server((host, 0))
        self.data_port = self._listener.getsockname()[1]
        self._server = grpc.server(ThreadPoolExecutor(rpc_workers, thread_name_prefix="kvtransfer-rpc"))
        pb_grpc.add_KVTransferServicer_to_server(_Servicer(self), self._server)
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
    ) -> Future[Completion]:
        """Expect tokens [start_token, start_token + num_tokens) of a sequence whose block table is `dst_block_ids`
        (token t lands in block dst_block_ids[t // block_size], slot t % block_size; blocks before start_token's are
        not touched). The lease starts now; the sender renews it."""
        bs = self.layout.block_size
        dst = torch.as_tensor(dst_block_ids, dtype=torch.int64).flatten()
        if num_tokens < 0 or start_token < 0 or lease_s <= 0:
            raise ValueError(f"bad transfer: num_tokens {num_tokens}, start_token {start_token}, lease_s {lease_s}")
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
            transfer = IncomingTransfer(
                transfer_id,
                next(self._keys),
                self.layout,
                self.latent,
                self.index_keys,
                dst.to(self.device),
                start_token,
                num_tokens,
                lease_s,
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
            self._failed[transfer.transfer_id] = error
            while len(self._failed) > _REMEMBERED_FAILURES:
                self._failed.popitem(last=False)
            self.stats.transfers_failed += 1
            self.stats.failures_by_kind[error.kind.value] += 1
        log.warning("KV transfer %s failed (%s): %s", transfer.transfer_id, error.kind.value, error.reason)
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

    def _status(self, transfer_id: str) -> pb.TransferStatus:
        """Why a transfer that is not live is gone (call with the lock held)."""
        error = self._failed.get(transfer_id)
        if error is None:
            return pb.TransferStatus(failure=pb.UNKNOWN_TRANSFER, reason=f"no live transfer {transfer_id!r}")
        return status_of(error)

    def _reap_loop(self) -> None:
        while True:
            with self._wakeup:
                if self._closed:
                    return
                now = time.monotonic()
                expired = [t for t in self._transfers.values() if t.deadline <= now]
                if not expired:
                    next_deadline = min((t.deadline for t in self._transfers.values()), default=now + 1.0)
                    self._wakeup.wait(timeout=min(next_deadline - now, 1.0))
                    continue
            for transfer in expired:
                waiting_for = "the sender's renewal" if transfer.session_id else "a sender to open it"
                self._fail(transfer, LeaseExpired(f"lease of {transfer.lease_s:g}s expired waiting for {waiting_for}"))

    # -- data plane -----------------------------------------------------------------------------------------------

    # `Landing`, for the channels: called in frame order per session

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
            log.debug("dropped a chunk for a transfer that is gone (key %d, layer %d)", header.key, header.layer)
        elif landed:
            self._finish(transfer)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(
                target=self._serve_session, args=(conn, peer), name="kvtransfer-session", daemon=True
            ).start()

    def _serve_session(self, conn: socket.socket, peer) -> None:
        tune(conn)
        session = None
        channel = None
        reason = "the sender closed the connection"
        try:
            conn.settimeout(self.rendezvous_timeout_s)
            session_id = read_hello(conn)
            with self._lock:
                found = self._sessions.get(session_id)
                if found is None or found.sock is not None:
                    raise ConnectionError(f"no handshake for session {session_id!r} (or it is attached already)")
                found.sock = conn
                session = found
            channel = self._open_channel(session, conn)
            conn.settimeout(None)
            log.info("KV sender %s attached (session %s, %s)", peer, session.session_id, session.transport)
            while True:
                channel.receive(read_header(conn), self)
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
            conn.close()

    def _open_channel(self, session: _Session, conn: socket.socket) -> ReceiveChannel:
        if session.transport == "tcp":
            return TcpReceiveChannel(conn, self.layout)
        if session.transport == "cuda_ipc":
            return CudaIpcReceiveChannel(conn, self.layout, session.peer, self.device, self._copy_stream)
        backend = backend_for(self.device)
        group = create_group(self._store, session.session_id, RECEIVER_RANK, backend, self.rendezvous_timeout_s)
        return NcclReceiveChannel(conn, self.layout, group, self.device)

    def _end_session(self, session: _Session, reason: str) -> None:
        with self._lock:
            self._sessions.pop(session.session_id, None)
            orphans = [t for t in self._transfers.values() if t.session_id == session.session_id]
        for transfer in orphans:
            self._fail(transfer, PeerLost(f"lost the sender: {reason}"))
        session.peer = None

    # -- control plane (called by the gRPC servicer) -------------------------------------------------------------

    def _handshake(self, request: pb.HandshakeRequest) -> pb.HandshakeReply:
        def reject(error: str) -> pb.HandshakeReply:
            log.warning("KV handshake rejected: %s", error)
            return pb.HandshakeReply(accepted=False, error=error, layout=self.layout.to_proto())

        try:
            peer_layout = KVLayout.from_proto(request.layout)
        except ValueError as e:
            return reject(str(e))
        mismatch = self.layout.mismatch(peer_layout)
        if mismatch:
            return reject(f"KV layouts differ: {mismatch}")
        if request.transport not in self.transports:
            return reject(f"transport {request.transport!r} not offered (this receiver offers {self.transports})")
        session = _Session(uuid.uuid4().hex, request.transport)
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
                    self._store = dist.TCPStore(
                        self.host,
                        0,
                        is_master=True,
                        wait_for_workers=False,
                        timeout=timedelta(seconds=self.rendezvous_timeout_s),
                    )
            reply.store_host, reply.store_port = self.host, self._store.port
            reply.nccl_backend = backend_for(self.device)
        with self._lock:
            if self._closed:
                return reject("the KV receiver is closed")
            self._sessions[session.session_id] = session
        return reply

    def _open(self, request: pb.OpenTransferRequest) -> pb.OpenTransferReply:
        with self._lock:
            session = self._sessions.get(request.session_id)
            transfer = self._transfers.get(request.transfer_id)
            if session is None:
                status = pb.TransferStatus(failure=pb.PEER_LOST, reason="unknown or closed session")
            elif transfer is None:
                status = self._status(request.transfer_id)
            elif transfer.session_id is not None:
                status = pb.TransferStatus(failure=pb.INVALID, reason="the transfer is open in another session")
            else:
                transfer.session_id = session.session_id
                transfer.renew()
                return pb.OpenTransferReply(
                    status=status_ok(),
                    key=transfer.key,
                    num_tokens=transfer.num_tokens,
                    start_token=transfer.start_token,
                    lease_seconds=transfer.lease_s,
                )
        return pb.OpenTransferReply(status=status)

    def _renew(self, request: pb.RenewLeaseRequest) -> pb.RenewLeaseReply:
        statuses = []
        with self._lock:
            for transfer_id in request.transfer_ids:
                transfer = self._transfers.get(transfer_id)
                if transfer is not None and transfer.state is State.LIVE:
                    transfer.renew()
                    statuses.append(status_ok())
                else:
                    statuses.append(self._status(transfer_id))
        return pb.RenewLeaseReply(statuses=statuses)

    def _complete(self, request: pb.CompleteRequest) -> pb.TransferStatus:
        with self._lock:
            transfer = self._transfers.get(request.transfer_id)
            if transfer is None:
                return self._status(request.transfer_id)
        transfer.renew()  # the sender stops renewing now; rows may still be landing
        try:
            finished = transfer.complete(Completion.from_proto(request))
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
            transfer = self._transfers.get(request.transfer_id)
            if transfer is None:
                return self._status(request.transfer_id)
        self._fail(transfer, TransferAborted(f"aborted by the sender: {request.reason}"))
        return status_ok()


class _Servicer(pb_grpc.KVTransferServicer):
    def __init__(self, receiver: KVReceiver):
        self.receiver = receiver

    def Handshake(self, request, context):
        return self.receiver._handshake(request)

    def OpenTransfer(self, request, context):
        return self.receiver._open(request)

    def RenewLease(self, request, context):
        return self.receiver._renew(request)

    def Complete(self, request, context):
        return self.receiver._complete(request)

    def Abort(self, request, context):
        return self.receiver._abort(request)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)

"""The sending end, run by a prefill worker: one `KVSender` per decode receiver, one `OutgoingTransfer` per request.

    sender = KVSender.connect(address, layout, transport="tcp", pools=(latent, index_keys))   # once per receiver
    transfer = sender.open_transfer(transfer_id, capability, src_block_ids=block_table)     # learns start, tokens
    for layer in ...: compute it; transfer.send_layer(layer)            # queued: overlaps the next layers' compute
    transfer.complete(first_token, logprob, top_logprobs, hidden).result()   # or: await asyncio.wrap_future(...)

`send_layer` only queues: one worker thread per sender moves chunks in order, so a layer's tensors (or the source
blocks) must stay unchanged until `complete()`'s future resolves (or the transfer failed). With cuda_ipc and pools
the receiver reads the source blocks in place, after the layer went out; the settle round trip before completion
is what makes the resolved future mean it is done (contract in `cuda_ipc_transport`).

A background thread renews the leases of transfers that make progress (send_layer, keepalive, chunks going out) and
learns when the receiver gave one up; a transfer idle for a whole lease is no longer renewed, so a hung prefill loses
its lease even though its process is alive.
`connect` and `open_transfer` block on one RPC each; call them through `asyncio.to_thread` from async code.

Credentials: `connect` signs every call with the cluster secret (default `auth.resolve_secret()`), proves it in the
data-plane hello and checks that the receiver proves it back; `open_transfer` needs the capability the decode worker
drew for the transfer, and every later call and frame of the transfer carries it (frames as a tag). A sender whose
session the receiver closed (idle, or the receiver restarted) says so through `alive`: connect a new one.

Receivers that each need the whole KV (the ranks of a tensor/expert-parallel decode replica each hold a full copy of
the latent cache): `open_mirrored(senders, transfer_id)` opens the transfer at every one and returns a
`MirroredTransfer`, which takes the same calls and repeats them to each.
"""

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from datetime import timedelta

import grpc
import torch
import torch.distributed as dist

from . import kv_transfer_pb2 as pb
from .auth import ClusterSecret, frame_key, resolve_secret
from .completion import Completion
from .control import ControlClient, Unauthenticated
from .cuda_ipc_transport import STAGING_BYTES, CudaIpcSendChannel, export_buffers
from .errors import FailureKind, PeerLost, TransferAborted, TransferFailed, raise_for_status, transfer_failed
from .frames import FrameHeader, send_hello, socket_closed, tune
from .host import host_id
from .layout import KVLayout, RowKind
from .nccl_transport import CHUNK_BYTES as NCCL_CHUNK_BYTES
from .nccl_transport import SENDER_RANK, NcclSendChannel, create_group
from .stats import SenderStats
from .tcp_transport import CHUNK_BYTES as TCP_CHUNK_BYTES
from .tcp_transport import TcpSendChannel
from .transport import TRANSPORTS, Chunk, SendChannel

log = logging.getLogger(__name__)

Pools = tuple[list[torch.Tensor], dict[int, torch.Tensor]]
_RETRY_S = 0.5
_IDLE_POLL_S = 1.0


@dataclass
class _LayerJob:
    transfer: "OutgoingTransfer"
    layer: int
    sources: dict[RowKind, torch.Tensor | None]  # None: read from the sender's pools
    device: torch.device | None  # the GPU the rows come from, if any
    ready: torch.cuda.Event | None  # recorded on the caller's stream after it produced the rows


@dataclass
class _OpenJob:
    transfer: "OutgoingTransfer"


@dataclass
class _CompleteJob:
    transfer: "OutgoingTransfer"
    completion: Completion
    future: Future


class OutgoingTransfer:
    def __init__(self, sender: "KVSender", transfer_id: str, capability: bytes, reply: pb.OpenTransferReply):
        self.sender = sender
        self.transfer_id = transfer_id
        self.ref = pb.TransferRef(transfer_id=transfer_id, capability=capability)
        self.frame_key = frame_key(capability, sender.session_id)
        self.max_frame_bytes = reply.max_frame_bytes or None
        self.checksums: dict[tuple[int, RowKind], int | None] = {}  # running CRC-32 of each (layer, kind) sent
        self.key = reply.key
        self.num_tokens = reply.num_tokens
        self.start_token = reply.start_token  # rows sent are tokens [start_token, start_token + num_tokens)
        self.lease_s = reply.lease_seconds
        self.src_block_ids: torch.Tensor | None = None  # set by read_from_pools
        self.last_renewed = self.last_active = time.monotonic()
        self.renew_at = self.last_renewed + self.lease_s / 3
        self.failure: TransferFailed | None = None
        self.completing = False
        self.done = False

    def read_from_pools(self, block_ids: Sequence[int] | torch.Tensor) -> None:
        """Send layers straight from the sender's pools: `block_ids` is this sender's block table of the sequence
        (token t in block block_ids[t // block_size]). The blocks must stay the sequence's until the transfer has
        completed or failed: the rows are read from them while later layers compute."""
        sender = self.sender
        if sender.pools is None:
            raise ValueError("reading from pools needs the sender to be connected with pools")
        if self.src_block_ids is not None:
            raise RuntimeError("the transfer already reads from pools")
        ids = torch.as_tensor(block_ids, dtype=torch.int64, device=sender.pools[0][0].device)
        end = self.start_token + self.num_tokens
        needed = -(-end // sender.layout.block_size)
        if ids.numel() < needed:
            raise ValueError(f"src_block_ids has {ids.numel()} blocks, tokens up to {end} need {needed}")
        self.src_block_ids = ids[:needed]  # entries past the tokens may be padding
        sender._submit(_OpenJob(self))  # the channel may announce the table now, before the first layer

    def send_layer(
        self, layer: int, latent_rows: torch.Tensor | None = None, index_rows: torch.Tensor | None = None
    ) -> None:
        """Queue one layer: rows `[num_tokens, dim]` for tokens [start_token, start_token + num_tokens), or, with
        no rows, read them from the sender's pools through `src_block_ids`. Raises if the transfer already failed."""
        self._raise_if_failed()
        if self.completing:
            raise RuntimeError("send_layer after complete")
        self.last_active = time.monotonic()
        layout = self.sender.layout
        if not 0 <= layer < layout.num_layers:
            raise ValueError(f"layer {layer} outside [0, {layout.num_layers})")
        has_index = layer in layout.index_layers
        if latent_rows is None and index_rows is None:
            if self.src_block_ids is None:
                raise ValueError("no rows given and no src_block_ids to read them from the pools")
            sources = dict.fromkeys(layout.kinds(layer))
        else:
            if latent_rows is None or (index_rows is None) == has_index:
                need = "latent_rows and index_rows" if has_index else "latent_rows only"
                raise ValueError(f"layer {layer} takes {need}")
            sources = {RowKind.LATENT: latent_rows}
            if has_index:
                sources[RowKind.INDEX] = index_rows
            for kind, rows in sources.items():
                expected = (self.num_tokens, layout.row_dim(kind))
                if tuple(rows.shape) != expected or rows.dtype != layout.dtype:
                    raise ValueError(f"{kind.name.lower()} rows {tuple(rows.shape)} {rows.dtype}, want {expected}")
        on_gpu = [t for t in sources.values() if t is not None and t.is_cuda]
        if self.src_block_ids is not None and self.src_block_ids.is_cuda:
            on_gpu.append(self.src_block_ids)
        device = ready = None
        if on_gpu:
            device = on_gpu[0].device
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        self.sender._submit(_LayerJob(self, layer, sources, device, ready))

    def complete(
        self,
        first_token: int,
        logprob: float,
        top_logprobs: Sequence[tuple[int, float]] = (),
        hidden: torch.Tensor | None = None,
    ) -> Future:
        """After every queued layer went out, hand over the first token and hidden state. The future resolves when
        the receiver accepted it, or fails with `TransferFailed`."""
        if self.completing:
            raise RuntimeError("complete called twice")
        future: Future = Future()
        if self.failure is not None:
            future.set_exception(self.failure)
            return future
        self.completing = True
        self.last_active = time.monotonic()
        self.sender._submit(_CompleteJob(self, Completion(first_token, logprob, list(top_logprobs), hidden), future))
        return future

    def keepalive(self) -> None:
        """Say the prefill is still working on this request (call it each engine step while no layer is ready yet:
        leases are only renewed for transfers active within the last lease)."""
        self._raise_if_failed()
        self.last_active = time.monotonic()

    def abort(self, reason: str = "aborted by the sender") -> None:
        """Give up: queued chunks are skipped and the receiver fails the transfer."""
        if self._fail(TransferAborted(reason)):
            self.sender._rpc_abort(self, reason)

    def _fail(self, error: TransferFailed) -> bool:
        with self.sender._lock:
            if self.failure is not None or self.done:
                return False
            self.failure = error
            self.sender._transfers.pop(self.transfer_id, None)
            self.sender.stats.transfers_failed += 1
        # an abort (the client left, or we gave up) is ordinary: one line per request at DEBUG
        level = logging.DEBUG if error.kind is FailureKind.ABORTED else logging.WARNING
        kind, reason = error.kind.value, error.reason
        log.log(level, "KV transfer %s failed on the sender side (%s): %s", self.transfer_id, kind, reason)
        return True

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure


class KVSender:
    def __init__(self, control: ControlClient, layout: KVLayout, pools: Pools | None):
        self.layout = layout
        self.pools = pools
        self.stats = SenderStats()
        self._control = control
        self._lock = threading.Lock()
        self._transfers: dict[str, OutgoingTransfer] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._renew_wakeup = threading.Event()
        self._broken: TransferFailed | None = None
        self._stream: torch.cuda.Stream | None = None
        self.session_id = ""
        self._sock: socket.socket | None = None
        self._data: SendChannel | None = None

    @classmethod
    def connect(
        cls,
        address: str,
        layout: KVLayout,
        transport: str = "tcp",
        pools: Pools | None = None,
        rpc_timeout_s: float = 10.0,
        chunk_bytes: int | None = None,
        rendezvous_timeout_s: float = 60.0,
        secret: ClusterSecret | bytes | str | None = None,
    ) -> "KVSender":
        """Handshake with the receiver at `address` and open the data plane. `pools` = (latent, index_keys) lets
        `send_layer` read rows by block id (and, with cuda_ipc, lets the receiver read them in place). `secret`: the
        cluster secret (default `auth.resolve_secret()`). Raises ConnectionError if the receiver refuses (or cannot
        prove the secret)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; choose from {TRANSPORTS}")
        if pools is not None:
            layout.check_pools(*pools)
        secret = resolve_secret(secret)
        sender = cls(ControlClient(address, secret, rpc_timeout_s), layout, pools)
        try:
            sender._open_session(secret, transport, chunk_bytes, rendezvous_timeout_s, rpc_timeout_s)
        except grpc.RpcError as e:
            sender.close()
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise ConnectionError("the KV receiver refused our credentials") from None
            raise ConnectionError(f"cannot reach the KV receiver at {address}: {e.code()}") from None
        except BaseException:
            sender.close()
            raise
        return sender

    def _open_session(
        self,
        secret: ClusterSecret,
        transport: str,
        chunk_bytes: int | None,
        rendezvous_timeout_s: float,
        rpc_timeout_s: float,
    ) -> None:
        request = pb.HandshakeRequest(layout=self.layout.to_proto(), transport=transport, host_id=host_id())
        staging = None
        if transport == "cuda_ipc":
            device = self.pools[0][0].device if self.pools else torch.device("cuda", torch.cuda.current_device())
            if device.type != "cuda":
                raise ValueError("cuda_ipc needs the sender's pools on a GPU")
            staging = torch.empty(chunk_bytes or STAGING_BYTES, dtype=torch.uint8, device=device)
            request.cuda_ipc.CopyFrom(export_buffers(staging, *(self.pools or (None, None))))
        reply = self._control.call("Handshake", request)
        if not reply.accepted:
            raise ConnectionError(f"KV receiver refused the handshake: {reply.error}")
        self.session_id = reply.session_id
        self._sock = socket.create_connection((reply.data_host, reply.data_port), timeout=rpc_timeout_s)
        send_hello(self._sock, secret, self.session_id)
        self._sock.settimeout(None)
        tune(self._sock)
        if transport == "tcp":
            self._data = TcpSendChannel(self._sock, chunk_bytes or TCP_CHUNK_BYTES)
        elif transport == "cuda_ipc":
            self._data = CudaIpcSendChannel(self._sock, staging, exported_pools=self.pools is not None)
        else:
            timeout = timedelta(seconds=rendezvous_timeout_s)
            store = dist.TCPStore(reply.store_host, reply.store_port, is_master=False, timeout=timeout)
            group = create_group(store, self.session_id, SENDER_RANK, reply.nccl_backend, rendezvous_timeout_s)
            device = self._nccl_device(reply.nccl_backend)
            self._data = NcclSendChannel(self._sock, group, device, chunk_bytes or NCCL_CHUNK_BYTES)
        self._threads = [
            threading.Thread(target=self._send_loop, name="kvtransfer-send", daemon=True),
            threading.Thread(target=self._renew_loop, name="kvtransfer-renew", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info("KV sender connected (session %s, %s)", self.session_id, transport)

    @property
    def alive(self) -> bool:
        """Whether the session can still carry transfers (not broken, and the receiver has not hung up)."""
        if self._broken is not None or self._sock is None:
            return False
        with self._lock:
            busy = bool(self._transfers)
        # while a transfer is open a cuda_ipc receiver may be writing an ack; otherwise readable means closed
        return busy or not socket_closed(self._sock)

    def _nccl_device(self, backend: str) -> torch.device:
        if backend == "gloo":
            return torch.device("cpu")
        if self.pools is not None and self.pools[0][0].is_cuda:
            return self.pools[0][0].device
        return torch.device("cuda", torch.cuda.current_device())

    def open_transfer(
        self, transfer_id: str, capability: bytes, src_block_ids: Sequence[int] | torch.Tensor | None = None
    ) -> OutgoingTransfer:
        """Attach to a transfer the receiver registered, presenting its `capability`. `src_block_ids`: this
        sender's block table of the sequence (token t in block src_block_ids[t // block_size]), to send layers
        straight from the pools."""
        if self._broken is not None:
            raise self._broken
        if src_block_ids is not None and self.pools is None:
            raise ValueError("src_block_ids needs the sender to be connected with pools")
        ref = pb.TransferRef(transfer_id=transfer_id, capability=capability)
        try:
            reply = self._control.call("OpenTransfer", pb.OpenTransferRequest(session_id=self.session_id, transfer=ref))
        except (grpc.RpcError, Unauthenticated) as e:
            error = PeerLost(f"cannot open the transfer at the receiver: {_rpc_error(e)}")
            self._break(error)
            raise error from None
        if reply.status.failure == pb.PEER_LOST:  # the receiver no longer knows this session
            self._break(transfer_failed(FailureKind.PEER_LOST, reply.status.reason))
        raise_for_status(reply.status)
        transfer = OutgoingTransfer(self, transfer_id, capability, reply)
        with self._lock:
            self._transfers[transfer_id] = transfer
            self.stats.transfers_opened += 1
        self._renew_wakeup.set()
        if src_block_ids is not None:
            try:
                transfer.read_from_pools(src_block_ids)
            except ValueError as e:
                transfer.abort(str(e))
                raise
        return transfer

    def close(self) -> None:
        """Stop the threads and hang up; transfers still open fail on both sides."""
        self._break(TransferFailed("the KV sender was closed", FailureKind.CLOSED))
        self._stop.set()
        self._renew_wakeup.set()
        self._jobs.put(None)
        for thread in getattr(self, "_threads", []):
            thread.join(timeout=5.0)
        if self._data is not None:
            self._data.close()
        if self._sock is not None:
            self._sock.close()
        self._control.close()

    def __enter__(self) -> "KVSender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- worker threads -------------------------------------------------------------------------------------------

    def _submit(self, job) -> None:
        if self._broken is not None:
            raise self._broken
        self._jobs.put(job)

    def _send_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            transfer = job.transfer
            try:
                transfer._raise_if_failed()
                if self._broken is not None:
                    raise self._broken
                if isinstance(job, _OpenJob):
                    self._data.open(transfer.key, transfer.frame_key, transfer.src_block_ids)
                elif isinstance(job, _LayerJob):
                    self._send_layer(job)
                else:
                    self._complete(job)
            except TransferFailed as e:
                transfer._fail(e)
                if isinstance(job, _CompleteJob):
                    _resolve(job.future, error=transfer.failure)
            except Exception as e:  # the data plane or the receiver is gone: every open transfer fails
                self._break(PeerLost(f"lost the receiver: {e}"))
                transfer._fail(self._broken)
                if isinstance(job, _CompleteJob):
                    _resolve(job.future, error=transfer.failure)

    def _send_layer(self, job: _LayerJob) -> None:
        if job.ready is None:
            self._send_chunks(job)
            return
        job.ready.synchronize()
        if self._stream is None:  # gathers on a side stream: the caller's stream is busy with later layers
            self._stream = torch.cuda.Stream(job.device)
        with torch.cuda.stream(self._stream):
            self._send_chunks(job)

    def _send_chunks(self, job: _LayerJob) -> None:
        transfer, layout = job.transfer, self.layout
        for kind, rows in job.sources.items():
            pool = None
            if rows is None:
                latent, index_keys = self.pools
                pool = latent[job.layer] if kind == RowKind.LATENT else index_keys[job.layer]
            max_bytes = self._data.max_chunk_bytes(from_pool=pool is not None)
            if max_bytes is not None and transfer.max_frame_bytes is not None:
                max_bytes = min(max_bytes, transfer.max_frame_bytes)  # the receiver refuses bigger frames
            row_bytes = layout.row_dim(kind) * layout.dtype.itemsize
            chunk_tokens = max(1, transfer.num_tokens if max_bytes is None else max_bytes // row_bytes)
            where = (job.layer, kind)
            crc: int | None = transfer.checksums.get(where, 0)
            for offset in range(0, transfer.num_tokens, chunk_tokens):
                transfer._raise_if_failed()  # an abort or a lost lease stops a layer midway
                count = min(chunk_tokens, transfer.num_tokens - offset)
                header = FrameHeader(transfer.key, job.layer, kind, offset, count)
                if pool is None:
                    chunk = Chunk(header, transfer.frame_key, crc or 0, rows=rows[offset : offset + count])
                else:
                    first = transfer.start_token + offset
                    table = transfer.src_block_ids
                    chunk = Chunk(header, transfer.frame_key, crc or 0, pool=pool, block_ids=table, first_token=first)
                began = time.perf_counter()
                nbytes, sent_crc = self._data.send(chunk)
                crc = None if crc is None or sent_crc is None else sent_crc  # one chunk not on the host: no checksum
                transfer.checksums[where] = crc
                transfer.last_active = time.monotonic()  # a long layer on a slow link is progress too
                with self._lock:
                    self.stats.bytes_sent += nbytes
                    self.stats.send_seconds += time.perf_counter() - began

    def _complete(self, job: _CompleteJob) -> None:
        transfer = job.transfer
        self._data.settle(transfer.key, transfer.frame_key)  # the receiver is done reading: no chunk is overtaken
        request = job.completion.to_proto(transfer.ref, self.session_id)
        request.checksums.extend(
            pb.RowChecksum(layer=layer, kind=int(kind), crc32=crc)
            for (layer, kind), crc in transfer.checksums.items()
            if crc is not None
        )
        status = self._control.call("Complete", request)
        raise_for_status(status)
        with self._lock:
            transfer.done = True
            self._transfers.pop(transfer.transfer_id, None)
            self.stats.transfers_completed += 1
        _resolve(job.future)

    def _break(self, error: TransferFailed) -> None:
        """The session is unusable: fail every open transfer; later calls raise `error`."""
        with self._lock:
            if self._broken is None:
                self._broken = error
            transfers = list(self._transfers.values())
        if transfers:
            log.warning("KV sender session %s ends with %d open transfers: %s", self.session_id, len(transfers), error)
        for transfer in transfers:
            transfer._fail(error)

    def _renew_loop(self) -> None:
        """Renew the leases of working transfers in one RPC whenever one is a third of the way to expiry. A transfer
        idle for a whole lease (no send_layer, keepalive or chunk sent) is left to expire: its prefill is stuck."""
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                working = [
                    t for t in self._transfers.values() if t.failure is None and now - t.last_active <= t.lease_s
                ]
            next_at = min((t.renew_at for t in working), default=now + _IDLE_POLL_S)
            if next_at > now:
                # open_transfer wakes us (a new lease may be shorter); the cap notices transfers going idle
                self._renew_wakeup.wait(min(next_at - now, _IDLE_POLL_S))
                self._renew_wakeup.clear()
                continue
            self._renew(working)

    def _renew(self, transfers: list[OutgoingTransfer]) -> None:
        request = pb.RenewLeaseRequest(session_id=self.session_id, transfers=[t.ref for t in transfers])
        try:
            reply = self._control.call("RenewLease", request)
        except (grpc.RpcError, Unauthenticated) as e:
            now = time.monotonic()
            for transfer in transfers:  # past its lease the receiver has given the transfer up anyway
                if now - transfer.last_renewed > transfer.lease_s:
                    transfer._fail(PeerLost(f"cannot reach the receiver to renew the lease: {_rpc_error(e)}"))
                transfer.renew_at = now + min(transfer.lease_s / 3, _RETRY_S)
            return
        now = time.monotonic()
        for transfer, status in zip(transfers, reply.statuses, strict=True):
            if status.failure == pb.NONE:
                transfer.last_renewed = now
                transfer.renew_at = now + transfer.lease_s / 3
            else:
                transfer._fail(transfer_failed(FailureKind.from_proto(status.failure), status.reason))

    def _rpc_abort(self, transfer: OutgoingTransfer, reason: str) -> None:
        request = pb.AbortRequest(session_id=self.session_id, transfer=transfer.ref, reason=reason[:200])
        try:
            self._control.call("Abort", request)
        except (grpc.RpcError, Unauthenticated) as e:  # the receiver's lease will expire instead
            log.warning("could not tell the receiver that %s was aborted: %s", transfer.transfer_id, _rpc_error(e))


class MirroredTransfer:
    """One request's KV sent to several receivers that each need all of it, through one `OutgoingTransfer` each:
    every call goes to all of them. The receiving side needs every copy, so a failure at one aborts the others."""

    def __init__(self, transfers: list[OutgoingTransfer]):
        self.transfers = transfers

    def read_from_pools(self, block_ids: Sequence[int] | torch.Tensor) -> None:
        self._each(lambda t: t.read_from_pools(block_ids))

    def send_layer(
        self, layer: int, latent_rows: torch.Tensor | None = None, index_rows: torch.Tensor | None = None
    ) -> None:
        self._each(lambda t: t.send_layer(layer, latent_rows, index_rows))

    def keepalive(self) -> None:
        self._each(OutgoingTransfer.keepalive)

    def complete(
        self,
        first_token: int,
        logprob: float,
        top_logprobs: Sequence[tuple[int, float]] = (),
        hidden: torch.Tensor | None = None,
    ) -> Future:
        """Resolves once every receiver accepted the completion; fails with the first failure."""
        futures = [t.complete(first_token, logprob, top_logprobs, hidden) for t in self.transfers]
        combined: Future = Future()
        lock = threading.Lock()

        def settle(_: Future) -> None:
            with lock:
                if combined.done():
                    return
                error = next((f.exception() for f in futures if f.done() and f.exception() is not None), None)
                if error is not None:
                    combined.set_exception(error)
                elif all(f.done() for f in futures):
                    combined.set_result(None)
                else:
                    return
            if error is not None:
                self.abort(f"another receiver of the same KV failed: {error}")

        for future in futures:
            future.add_done_callback(settle)
        return combined

    def abort(self, reason: str = "aborted by the sender") -> None:
        for transfer in self.transfers:
            transfer.abort(reason)

    def _each(self, call: Callable[[OutgoingTransfer], None]) -> None:
        try:
            for transfer in self.transfers:
                call(transfer)
        except TransferFailed as e:
            self.abort(f"another receiver of the same KV failed: {e.reason}")
            raise


def open_mirrored(
    senders: Sequence[KVSender], transfer_id: str, capability: bytes
) -> OutgoingTransfer | MirroredTransfer:
    """Open `transfer_id` at each sender's receiver (one sender: its plain transfer); the decode replica registered
    it with the same capability at each. If one refuses, the transfers already opened are aborted."""
    transfers: list[OutgoingTransfer] = []
    try:
        for sender in senders:
            transfers.append(sender.open_transfer(transfer_id, capability))
    except BaseException as e:
        for transfer in transfers:
            transfer.abort(f"another receiver of the same KV refused it: {e!r}")
        raise
    return transfers[0] if len(transfers) == 1 else MirroredTransfer(transfers)


def _rpc_error(error: Exception) -> str:
    return str(error.code()) if isinstance(error, grpc.RpcError) else str(error)


def _resolve(future: Future, error: BaseException | None = None) -> None:
    """Settle a completion future, unless its caller gave up on it (cancelled it): the send loop must live on."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(None)
    except InvalidStateError:
        pass

"""`nccl`: rows go point-to-point through a private 2-rank torch.distributed group (receiver rank 0, sender rank 1).

The group is built from the backend classes directly, not `init_process_group`, so one process can hold a group per
peer next to whatever default group it already has. Rendezvous: a TCPStore the receiver serves, one key prefix per
session. Backend "nccl" for GPU pools, "gloo" for CPU pools (same code, so CPU tests cover the protocol).
The store listens only on the receiver's configured interface (a socket we bind, handed to the store), and gloo's
pairs bind to the address given; NCCL's own bootstrap follows NCCL_SOCKET_IFNAME.
"""

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist

from .frames import FrameHeader, socket_closed
from .layout import KVLayout
from .transport import Chunk, Landing, ReceiveChannel, SendChannel, host_crc

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20
_PENDING = 64  # headers read ahead of their point-to-point receives (the session thread waits beyond that)
RECEIVER_RANK, SENDER_RANK = 0, 1
_POLL_S = 0.0005
_DRAIN_S = 1.0


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def create_store(host: str, timeout_s: float) -> dist.TCPStore:
    """A rendezvous store listening on `host` only (torch's own listener would take every interface): the store is
    handed a socket we bound, and owns it from then on (it closes it when it goes)."""
    listener = socket.create_server((host, 0), backlog=64)
    port = listener.getsockname()[1]
    return dist.TCPStore(
        host,
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout_s),
        master_listen_fd=listener.detach(),  # not closed by Python as well: that fd number may be reused by then
    )


def create_group(
    store: dist.Store, session_id: str, rank: int, backend: str, timeout_s: float, host: str | None = None
) -> dist.Backend:
    """Blocks until the peer joins with the other rank (or the timeout passes). `host`: the address gloo's pairs
    listen on (default: what this host's name resolves to)."""
    prefixed = dist.PrefixStore(f"kvtransfer/{session_id}/", store)
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        if host is None:
            return dist.ProcessGroupGloo(prefixed, rank, 2, timeout)
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(prefixed, rank, 2, options)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(prefixed, rank, 2, options)


def wait_work(work: dist.Work, backend: str, peer_gone: Callable[[], bool]) -> None:
    """Wait for a point-to-point op without hanging on a dead peer: gloo raises when the peer's socket closes; an
    NCCL op would wait forever, so poll it and give up once `peer_gone()` (the caller then aborts the group)."""
    if backend == "gloo":
        work.wait()
        return
    while not work.is_completed():
        if peer_gone():
            raise ConnectionError("the peer went away while a point-to-point op was in flight")
        time.sleep(_POLL_S)
    work.wait()


class NcclSendChannel(SendChannel):
    def __init__(self, sock: socket.socket, group: dist.Backend, device: torch.device, chunk_bytes: int = CHUNK_BYTES):
        self.sock = sock
        self.group = group
        self.device = device
        self.backend = backend_for(device)
        self.chunk_bytes = chunk_bytes

    def max_chunk_bytes(self, from_pool: bool) -> int:
        return self.chunk_bytes

    def send(self, chunk: Chunk) -> tuple[int, int | None]:
        rows = chunk.materialize().to(self.device).contiguous()
        self.sock.sendall(replace(chunk.header, extra=0).pack(chunk.frame_key))
        # the receiver never writes to the session socket in this transport, so readable means closed
        wait_work(self.group.send([rows], RECEIVER_RANK, 0), self.backend, lambda: socket_closed(self.sock))
        if rows.is_cuda:  # the rows may be the caller's tensor: make sure NCCL is done reading it
            torch.cuda.current_stream(rows.device).synchronize()
        return rows.numel() * rows.element_size(), host_crc(rows, chunk.crc)

    def open(self, key: int, frame_key: bytes, block_ids: torch.Tensor) -> None:
        """Rows travel point-to-point: the receiver needs no block table."""

    def settle(self, key: int, frame_key: bytes) -> None:
        """`send` returns after the point-to-point send finished."""

    def close(self) -> None:
        self.group.abort()


class NcclReceiveChannel(ReceiveChannel):
    """Headers come off the socket in the session thread; a worker thread posts the matching receives, so a dead
    sender is still noticed (socket closed) while a receive is in flight."""

    def __init__(self, sock: socket.socket, layout: KVLayout, group: dist.Backend, device: torch.device):
        super().__init__(sock)
        self.layout = layout
        self.group = group
        self.device = device
        self.backend = backend_for(device)
        self.stopped = threading.Event()
        self.pending: queue.Queue[tuple[FrameHeader, Landing] | None] = queue.Queue(_PENDING)
        self.worker = threading.Thread(target=self._receive_loop, name="kvtransfer-nccl-recv", daemon=True)
        self.worker.start()

    def extra_bytes_allowed(self, header: FrameHeader, row_bytes: int) -> bool:
        return header.extra == 0

    def receive(self, header: FrameHeader, landing: Landing) -> None:
        while not self.stopped.is_set():
            try:
                self.pending.put((header, landing), timeout=_DRAIN_S)
                return
            except queue.Full:
                if not self.worker.is_alive():
                    raise ConnectionError("the point-to-point receiver stopped") from None
        raise ConnectionError("the session is closing")

    def _receive_loop(self) -> None:
        while (item := self.pending.get()) is not None:
            header, landing = item
            rows = torch.empty(
                header.count, self.layout.row_dim(header.kind), dtype=self.layout.dtype, device=self.device
            )
            try:
                wait_work(self.group.recv([rows], SENDER_RANK, 0), self.backend, self.stopped.is_set)
                landing.land(header, rows)
            except Exception as e:  # the peer died or the session closed: end the session, its transfers fail
                if not self.stopped.is_set():
                    log.warning("point-to-point receive failed, closing the session: %s", e)
                    with contextlib.suppress(OSError):
                        self.sock.shutdown(socket.SHUT_RDWR)
                return

    def close(self) -> None:
        """Land what the sender finished sending, then give up on the rest."""
        with contextlib.suppress(queue.Full):
            self.pending.put(None, timeout=_DRAIN_S)
        self.worker.join(timeout=_DRAIN_S)
        if self.worker.is_alive():
            self.stopped.set()
            self.group.abort()
            self.worker.join(timeout=_DRAIN_S)

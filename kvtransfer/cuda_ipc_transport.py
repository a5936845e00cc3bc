"""`cuda_ipc`: both workers on one host; the receiver copies rows device-to-device out of the sender's GPU memory.

At handshake the sender exports, as CUDA IPC handles, a staging buffer and (if it has them) its paged pools; the
receiver maps them once. Frames on the session socket, each a header plus a descriptor whose first byte says what
follows:

- table: when a transfer opens, the sender's block table of the sequence. The receiver checks it against the
  sender's pools and moves it to its GPU once.
- pool: a whole (layer, kind) named by its header. The receiver enqueues, on its copy stream, one copy straight from
  the mapped sender pool into its own (`pool_copy`: whole blocks by block pair, partial end blocks by token rows),
  and reads the next header without waiting: no staging, no temporary, no ack.
- settle: sent before the sender completes a transfer; the receiver waits for that transfer's copies and acks.
- staging (rows given as tensors, e.g. a prefill worker without exported pools): the sender copies the rows into
  staging and waits for a one-byte ack; the receiver lands them from there, synchronizes, and acks.

Contract on the sender's pool blocks: the receiver may read them from `send_layer` until `complete()`'s future
resolves (the settle ack comes first) or the transfer fails. A failure the sender learns from the receiver (abort
reply, lease renewal, completion reply) comes after the receiver drained its copies, and later frames of the
transfer are dropped unread; when the sender gives up on its own (lost session), the receiver may still read until
it notices, which only spoils rows of a transfer that is failing anyway. Reads never write the sender's memory.
A sender given rows instead (the prefill worker copies each finished layer out of its blocks) is not bound by this.

Why the receiver pulls rather than the sender pushing into the receiver's pools: the receiver decides, under the
transfer's lock, whether rows may still land, and a failure takes that lock and waits for the copies enqueued
before it (`IncomingTransfer`). A sender writing into the receiver's pools could not be stopped after the lease
expired, and the blocks might already belong to another request.
"""

import socket
from dataclasses import dataclass, replace
from enum import IntEnum

import numpy as np
import torch

from . import kv_transfer_pb2 as pb
from .frames import FrameHeader, recv_exact
from .layout import KVLayout, RowKind
from .transport import Chunk, Landing, ReceiveChannel, SendChannel

STAGING_BYTES = 256 << 20
ACK = b"\x01"


class Frame(IntEnum):
    """The descriptor's first byte."""

    STAGING = 0
    POOL = 1
    TABLE = 2  # int64 block ids follow
    SETTLE = 3


def export_tensor(tensor: torch.Tensor) -> pb.CudaIpcBuffer:
    (_device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync) = (
        tensor.untyped_storage()._share_cuda_()
    )
    return pb.CudaIpcBuffer(
        handle=handle,
        storage_size_bytes=size,
        storage_offset_bytes=offset,
        ref_counter_handle=ref_handle,
        ref_counter_offset=ref_offset,
        event_handle=event_handle,
        event_sync_required=event_sync,
        tensor_offset=tensor.storage_offset(),
        shape=list(tensor.shape),
    )


def import_tensor(msg: pb.CudaIpcBuffer, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Map a peer's tensor. `device` is our index for the GPU: the peer's own index may differ (each process may see
    a different CUDA_VISIBLE_DEVICES), so the handle is opened on ours."""
    storage = torch.UntypedStorage._new_shared_cuda(
        device.index,
        msg.handle,
        msg.storage_size_bytes,
        msg.storage_offset_bytes,
        msg.ref_counter_handle,
        msg.ref_counter_offset,
        msg.event_handle,
        msg.event_sync_required,
    )
    shape = tuple(msg.shape)
    stride = torch.empty(shape, device="meta").stride()
    return torch.empty(0, dtype=dtype, device=device).set_(storage, msg.tensor_offset, shape, stride)


def export_buffers(
    staging: torch.Tensor, latent: list[torch.Tensor] | None, index_keys: dict[int, torch.Tensor] | None
) -> pb.CudaIpcExport:
    msg = pb.CudaIpcExport(staging=export_tensor(staging))
    if latent is not None:
        msg.latent.extend(export_tensor(pool) for pool in latent)
        for layer, pool in (index_keys or {}).items():
            msg.index_keys[layer].CopyFrom(export_tensor(pool))
    return msg


@dataclass
class PeerBuffers:
    """The sender's memory as mapped in the receiver."""

    staging: torch.Tensor  # uint8
    latent: list[torch.Tensor]
    index_keys: dict[int, torch.Tensor]

    @classmethod
    def map(cls, msg: pb.CudaIpcExport, layout: KVLayout, device: torch.device) -> "PeerBuffers":
        latent = [import_tensor(m, layout.dtype, device) for m in msg.latent]
        index_keys = {layer: import_tensor(m, layout.dtype, device) for layer, m in msg.index_keys.items()}
        return cls(import_tensor(msg.staging, torch.uint8, device), latent, index_keys)

    def pool(self, layer: int, kind: RowKind) -> torch.Tensor:
        if not self.latent:
            raise ConnectionError("the sender named its pools but exported none")
        return self.latent[layer] if kind == RowKind.LATENT else self.index_keys[layer]

    def table(self, raw: bytes | bytearray | memoryview) -> torch.Tensor:
        """A block table the sender sent, as CPU int64, every block checked to lie in its pools."""
        ids = np.frombuffer(raw, np.int64)
        num_blocks = self.pool(0, RowKind.LATENT).shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= num_blocks):
            raise ConnectionError(f"the sender named blocks outside its {num_blocks}")
        return torch.from_numpy(ids.copy())


class CudaIpcSendChannel(SendChannel):
    def __init__(self, sock: socket.socket, staging: torch.Tensor, exported_pools: bool):
        self.sock = sock
        self.staging = staging
        self.exported_pools = exported_pools

    def max_chunk_bytes(self, from_pool: bool) -> int | None:
        return None if from_pool and self.exported_pools else self.staging.numel()

    def open(self, key: int, frame_key: bytes, block_ids: torch.Tensor) -> None:
        if self.exported_pools:
            table = block_ids.to("cpu", torch.int64).numpy().tobytes()
            self._frame(_control(key), frame_key, Frame.TABLE, table)

    def send(self, chunk: Chunk) -> tuple[int, None]:
        if chunk.pool is not None and self.exported_pools:  # the receiver reads it in place, later
            self._frame(chunk.header, chunk.frame_key, Frame.POOL)
            return chunk.header.count * chunk.pool.shape[2] * chunk.pool.element_size(), None
        rows = chunk.materialize()
        nbytes = rows.numel() * rows.element_size()
        self.staging[:nbytes].view(rows.dtype).view(rows.shape).copy_(rows)
        torch.cuda.current_stream(self.staging.device).synchronize()
        self._frame(chunk.header, chunk.frame_key, Frame.STAGING)
        self._wait_ack()  # the receiver has copied the rows out: staging is free again
        return nbytes, None

    def settle(self, key: int, frame_key: bytes) -> None:
        if self.exported_pools:
            self._frame(_control(key), frame_key, Frame.SETTLE)
            self._wait_ack()

    def close(self) -> None:
        """The exported buffers stay alive with the sender (the receiver may still hold mappings)."""

    def _frame(self, header: FrameHeader, frame_key: bytes, frame: Frame, payload: bytes = b"") -> None:
        self.sock.sendall(replace(header, extra=1 + len(payload)).pack(frame_key) + bytes((frame,)) + payload)

    def _wait_ack(self) -> None:
        if recv_exact(self.sock, 1) != ACK:
            raise ConnectionError("bad ack from the receiver")


class CudaIpcReceiveChannel(ReceiveChannel):
    def __init__(
        self,
        sock: socket.socket,
        layout: KVLayout,
        peer: PeerBuffers,
        device: torch.device,
        copy_stream: torch.cuda.Stream,
    ):
        super().__init__(sock)
        self.layout = layout
        self.peer = peer
        self.device = device
        self.copy_stream = copy_stream

    def extra_bytes_allowed(self, header: FrameHeader, row_bytes: int) -> bool:
        """A one-byte descriptor, or a block table of at most the sender's block count."""
        num_blocks = self.peer.latent[0].shape[0] if self.peer is not None and self.peer.latent else 0
        return 1 <= header.extra <= 1 + 8 * num_blocks

    def receive(self, header: FrameHeader, landing: Landing) -> None:
        descriptor = recv_exact(self.sock, header.extra)
        frame = descriptor[0] if descriptor else None
        if frame == Frame.POOL:
            landing.copy_from(header, self.peer.pool(header.layer, header.kind))
        elif frame == Frame.TABLE:
            block_size = self.peer.pool(0, RowKind.LATENT).shape[1]
            landing.set_source(header.key, self.peer.table(memoryview(descriptor)[1:]), block_size)
        elif frame == Frame.SETTLE:
            landing.settle(header.key)
            self.sock.sendall(ACK)
        elif frame == Frame.STAGING:
            dim = self.layout.row_dim(header.kind)
            nbytes = header.count * dim * self.layout.dtype.itemsize
            if nbytes > self.peer.staging.numel():
                raise ConnectionError(f"{nbytes} bytes of rows do not fit the sender's staging buffer")
            rows = self.peer.staging[:nbytes].view(self.layout.dtype).view(header.count, dim)
            landing.land(header, rows)
            torch.cuda.current_stream(self.device).synchronize()  # done reading the sender's memory
            self.sock.sendall(ACK)
        else:
            raise ConnectionError(f"unknown cuda_ipc frame {frame}")

    def close(self) -> None:
        """Copies out of the mapped memory must finish before the mapping can go."""
        self.copy_stream.synchronize()
        self.peer = None


def _control(key: int) -> FrameHeader:
    """The header of a frame about a transfer that carries no rows."""
    return FrameHeader(key, 0, RowKind.LATENT, 0, 0)

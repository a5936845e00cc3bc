"""`cuda_ipc`: both workers on one host; the receiver copies rows device-to-device out of the sender's GPU memory.

At handshake the sender exports, as CUDA IPC handles, a staging buffer and (if it has them) its paged pools; the
receiver maps them once. Per chunk the sender either copies rows into staging or names its source blocks, writes
the header and a small descriptor on the session socket, and waits for a one-byte ack; the receiver gathers the rows
from the mapped memory, lands them, and acks.

Why the receiver pulls rather than the sender pushing into the receiver's pools: the receiver decides, under the
transfer's lock, whether rows may still land. A sender writing into the receiver's pools could not be stopped after
the lease expired, and the blocks might already belong to another request.
"""

import socket
import struct
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import kv_transfer_pb2 as pb
from .frames import FrameHeader, recv_exact
from .layout import KVLayout, RowKind
from .paged_rows import read_rows
from .transport import Chunk, Land, ReceiveChannel, SendChannel

STAGING_BYTES = 256 << 20
ACK = b"\x01"
_FROM_STAGING, _FROM_POOL = 0, 1
_DESCRIPTOR = struct.Struct("<Bq")  # source, first token in the first named block (pool source)


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


class CudaIpcSendChannel(SendChannel):
    def __init__(self, sock: socket.socket, staging: torch.Tensor, exported_pools: bool):
        self.sock = sock
        self.staging = staging
        self.exported_pools = exported_pools
        self.max_chunk_bytes = staging.numel()

    def send(self, chunk: Chunk) -> int:
        if chunk.pool is not None and self.exported_pools:
            bs = chunk.pool.shape[1]
            first_block, last_block = chunk.first_token // bs, (chunk.first_token + chunk.header.count - 1) // bs
            blocks = chunk.block_ids[first_block : last_block + 1].to("cpu", torch.int64).numpy()
            descriptor = _DESCRIPTOR.pack(_FROM_POOL, chunk.first_token % bs) + blocks.tobytes()
            nbytes = chunk.header.count * chunk.pool.shape[2] * chunk.pool.element_size()
        else:
            rows = chunk.materialize()
            nbytes = rows.numel() * rows.element_size()
            self.staging[:nbytes].view(rows.dtype).view(rows.shape).copy_(rows)
            torch.cuda.current_stream(self.staging.device).synchronize()
            descriptor = _DESCRIPTOR.pack(_FROM_STAGING, 0)
        self.sock.sendall(replace(chunk.header, extra=len(descriptor)).pack() + descriptor)
        if recv_exact(self.sock, 1) != ACK:  # the receiver has copied the rows out: staging is free again
            raise ConnectionError("bad ack from the receiver")
        return nbytes

    def close(self) -> None:
        """The exported buffers stay alive with the sender (the receiver may still hold mappings)."""


class CudaIpcReceiveChannel(ReceiveChannel):
    def __init__(self, sock: socket.socket, layout: KVLayout, peer: PeerBuffers, device: torch.device):
        super().__init__(sock)
        self.layout = layout
        self.peer = peer
        self.device = device

    def receive(self, header: FrameHeader, land: Land) -> None:
        descriptor = recv_exact(self.sock, header.extra)
        source, first = _DESCRIPTOR.unpack_from(descriptor)
        dim = self.layout.row_dim(header.kind)
        if source == _FROM_STAGING:
            nbytes = header.count * dim * self.layout.dtype.itemsize
            rows = self.peer.staging[:nbytes].view(self.layout.dtype).view(header.count, dim)
        else:
            pool = self.peer.pool(header.layer, header.kind)
            blocks = torch.from_numpy(np.frombuffer(descriptor, np.int64, offset=_DESCRIPTOR.size).copy())
            rows = read_rows(pool, blocks.to(self.device), first, header.count)
        land(header, rows)
        torch.cuda.current_stream(self.device).synchronize()  # done reading the sender's memory
        self.sock.sendall(ACK)

    def close(self) -> None:
        self.peer = None

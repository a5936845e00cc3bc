"""One transfer as the receiver tracks it: where its rows land, what has landed, its lease, and its outcome.

The safety rule lives here: rows are written (or their copies enqueued) only while the transfer is live, under the
transfer's lock, and leaving the live state takes the same lock and then waits, still holding it, for the copies
already enqueued on the receiver's copy stream. So once the caller sees `TransferFailed` (or the completion), no
write is in flight and none will follow; the destination blocks are the caller's again.

Rows come either as a tensor (written and synchronized at once) or, with cuda_ipc, as tokens of the sender's mapped
pool: those are copied pool to pool by `pool_copy` on the copy stream, asynchronously, and an event recorded after
each copy is what the waits above wait for.

What a transfer accepts is what was registered: each (layer, kind) its tokens in order, no more; rows of the layout's
shape and dtype. Rows that land from host memory are folded into a CRC-32 per (layer, kind), and the transfer is done
only once the completion's checksums match them (a mismatch fails it: the decode worker recomputes).
"""

import contextlib
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from enum import Enum

import torch

from . import kv_transfer_pb2 as pb
from . import pool_copy
from .auth import frame_key
from .completion import Completion
from .errors import FailureKind, TransferFailed
from .frames import FrameHeader
from .layout import KVLayout, RowKind
from .paged_rows import write_rows
from .transport import crc_soon


class State(Enum):
    LIVE = "live"
    DONE = "done"
    FAILED = "failed"


class IncomingTransfer:
    def __init__(
        self,
        transfer_id: str,
        key: int,
        layout: KVLayout,
        latent: list[torch.Tensor],
        index_keys: dict[int, torch.Tensor],
        dst_block_ids: torch.Tensor,
        start_token: int,
        num_tokens: int,
        lease_s: float,
        capability: bytes,
        copy_stream: torch.cuda.Stream | None = None,
    ):
        self.transfer_id = transfer_id
        self.key = key
        self.capability = capability
        self.frame_key: bytes | None = None  # set when a session opens it
        self.layout = layout
        self.pools = {(layer, RowKind.LATENT): pool for layer, pool in enumerate(latent)}
        self.pools.update({(layer, RowKind.INDEX): pool for layer, pool in index_keys.items()})
        self.dst_block_ids = dst_block_ids  # the sequence's block table, on the pools' device
        self.num_tokens = num_tokens
        self.start_token = start_token
        self.lease_s = lease_s
        self.registered_at = time.monotonic()
        self.deadline = self.registered_at + lease_s
        self.session_id: str | None = None  # the sender's session, once it opened the transfer
        self.future: Future[Completion] = Future()
        self.lock = threading.Lock()
        self.state = State.LIVE
        self.landed = {(layer, kind): 0 for layer in range(layout.num_layers) for kind in layout.kinds(layer)}
        self.rows_left = self.num_tokens * len(self.landed)
        self.crc: dict[tuple[int, RowKind], int | None] = dict.fromkeys(self.landed, 0)  # None: not all on host
        self.checksums: dict[tuple[int, int], int] | None = None  # the sender's, from the completion
        self.completion: Completion | None = None
        self.failure: TransferFailed | None = None
        self.first_rows_at: float | None = None  # the first chunk arrived (perf_counter)
        self.rows_landed_at: float | None = None  # every row was in the pools, copies finished (perf_counter)
        # cuda_ipc pool to pool copies: the sender's block table (on our device) and the plans made from it
        self.copy_stream = copy_stream
        self.src_block_ids: torch.Tensor | None = None
        self.src_block_size = 0
        self._runs: dict[tuple[int, int], pool_copy.Runs] = {}
        self._copied = torch.cuda.Event() if copy_stream is not None else None
        self._registered = None
        if copy_stream is not None:  # the copies must follow what the caller did to the blocks (and to the table)
            self._registered = torch.cuda.Event()
            self._registered.record(torch.cuda.current_stream(copy_stream.device))

    def renew(self) -> None:
        self.deadline = time.monotonic() + self.lease_s

    def attach(self, session_id: str) -> None:
        """A session opened the transfer: only its frames, tagged with the capability, are accepted from now."""
        self.session_id = session_id
        self.frame_key = frame_key(self.capability, session_id)

    def write(self, header: FrameHeader, rows: torch.Tensor) -> bool | None:
        """Land one chunk. None: dropped (the transfer is no longer live). True: that was the last piece."""
        arrived = rows
        rows = rows.to(self.dst_block_ids.device)  # before the lock: the copy from host can be slow
        with self.lock:
            if self.state is not State.LIVE:
                return None
            self._arrived()
            self._check(header, rows.shape, rows.dtype)
            where = (header.layer, header.kind)
            crc = None
            if self.crc[where] is not None and not arrived.is_cuda:  # the bytes as they came off the wire
                crc = crc_soon(arrived.view(torch.uint8).numpy(), self.crc[where])  # while they are written
            pool = self.pools[where]
            write_rows(pool, self.dst_block_ids, self.start_token + header.offset, rows)
            self.crc[where] = None if crc is None else crc.result()
            if pool.is_cuda:  # the write must be finished before a failure or completion can be reported
                torch.cuda.current_stream(pool.device).synchronize()
            self._count(header)
            return self._finish_if_ready()

    def set_source(self, block_ids: torch.Tensor, block_size: int) -> bool:
        """The sender's block table (CPU int64, its blocks checked against its pools) for pool to pool copies. False:
        the transfer is no longer live."""
        with self.lock:
            if self.state is not State.LIVE:
                return False
            if self.src_block_ids is not None:
                raise TransferFailed("the sender's block table came twice", FailureKind.INVALID)
            end = self.start_token + self.num_tokens
            if block_ids.numel() * block_size < end:
                raise TransferFailed(
                    f"the sender's {block_ids.numel()} blocks of {block_size} cannot hold tokens up to {end}",
                    FailureKind.INVALID,
                )
            with self._on_copy_stream():
                if self.copy_stream is not None:
                    self.copy_stream.wait_event(self._registered)
                    block_ids = block_ids.pin_memory()  # an upload from pageable memory would wait for the stream
                self.src_block_ids = block_ids.to(self.dst_block_ids.device, non_blocking=True)
                self.src_block_size = block_size
                self._plan(0, self.num_tokens)  # the range every whole-layer chunk asks for
            return True

    def copy_from(self, header: FrameHeader, src_pool: torch.Tensor) -> bool | None:
        """Enqueue the copy of the chunk's tokens from the sender's mapped pool through its block table. None:
        dropped (the transfer is no longer live). True: that was the last piece (and it has been copied)."""
        with self.lock:
            if self.state is not State.LIVE:
                return None
            self._arrived()
            self._check(header, (header.count, src_pool.shape[2]), src_pool.dtype)
            self.crc[(header.layer, header.kind)] = None  # copied device to device: nothing to checksum on the host
            if self.src_block_ids is None:
                raise TransferFailed("pool rows came before the sender's block table", FailureKind.INVALID)
            with self._on_copy_stream():
                runs = self._plan(self.start_token + header.offset, header.count)
                pool_copy.copy_runs(src_pool, self.pools[(header.layer, header.kind)], runs)
                if self._copied is not None:
                    self._copied.record(self.copy_stream)
            self._count(header)
            return self._finish_if_ready()

    def settle(self) -> None:
        """Return once every copy enqueued for this transfer has finished (the sender may then reuse its blocks)."""
        with self.lock:
            self._wait_copies()

    def complete(self, completion: Completion, checksums: Sequence[pb.RowChecksum] = ()) -> bool | None:
        """Record the completion and the sender's checksums. None: the transfer is no longer live. True: every row
        had already landed (and matched)."""
        with self.lock:
            if self.state is not State.LIVE:
                return None
            if self.completion is not None:
                raise TransferFailed("completed twice", FailureKind.INVALID)
            self.completion = completion
            self.checksums = {(c.layer, c.kind): c.crc32 for c in checksums}
            return self._finish_if_ready()

    def fail(self, error: TransferFailed) -> bool:
        """Stop accepting rows; True if this call ended the transfer (it was live). Waits for a write in flight and
        for the copies already enqueued."""
        with self.lock:
            if self.state is not State.LIVE:
                return False
            self.state = State.FAILED
            self.failure = error
            self._wait_copies()
            return True

    def _finish_if_ready(self) -> bool:
        if self.rows_left == 0 and self.completion is not None:
            self._verify_checksums()
            self.state = State.DONE
            self._wait_copies()
            return True
        return False

    def _verify_checksums(self) -> None:
        for (layer, kind), crc in self.crc.items():
            if crc is None or not self.num_tokens:
                continue
            sent = self.checksums.get((layer, int(kind)))
            if sent is None:
                raise TransferFailed(f"no checksum for layer {layer} {kind.name.lower()} rows", FailureKind.INVALID)
            if sent != crc:
                raise TransferFailed(
                    f"layer {layer} {kind.name.lower()} rows are corrupt (crc32 {crc:08x}, the sender's {sent:08x})",
                    FailureKind.INVALID,
                )

    def _wait_copies(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()
        if self.rows_left == 0 and self.rows_landed_at is None:
            self.rows_landed_at = time.perf_counter()

    def _on_copy_stream(self):
        return torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else contextlib.nullcontext()

    def _plan(self, first: int, count: int) -> pool_copy.Runs:
        runs = self._runs.get((first, count))
        if runs is None:
            bs = self.layout.block_size
            runs = pool_copy.plan_runs(self.src_block_ids, self.src_block_size, self.dst_block_ids, bs, first, count)
            self._runs[(first, count)] = runs
        return runs

    def _arrived(self) -> None:
        if self.first_rows_at is None:
            self.first_rows_at = time.perf_counter()

    def _count(self, header: FrameHeader) -> None:
        self.landed[(header.layer, header.kind)] += header.count
        self.rows_left -= header.count
        if self.rows_left == 0:  # one wait per transfer, after its last chunk: the data plane is done
            self._wait_copies()

    def _check(self, header: FrameHeader, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        where = (header.layer, header.kind)
        if where not in self.landed:
            raise TransferFailed(f"layer {header.layer} has no {header.kind.name.lower()} rows", FailureKind.INVALID)
        if header.offset < 0 or header.count < 1 or header.offset + header.count > self.num_tokens:
            raise TransferFailed(
                f"tokens [{header.offset}, {header.offset + header.count}) outside the transfer's {self.num_tokens}",
                FailureKind.INVALID,
            )
        if header.offset != self.landed[where]:  # in order, each token once: no gap can pass for a full layer
            raise TransferFailed(
                f"layer {header.layer} {header.kind.name.lower()} rows at token {header.offset}, "
                f"expected {self.landed[where]}",
                FailureKind.INVALID,
            )
        if tuple(shape) != (header.count, self.layout.row_dim(header.kind)) or dtype != self.layout.dtype:
            raise TransferFailed(f"rows {tuple(shape)} {dtype} do not fit the layout", FailureKind.INVALID)

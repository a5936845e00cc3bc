"""One transfer as the receiver tracks it: where its rows land, what has landed, its lease, and its outcome.

The safety rule lives here: rows are written only while the transfer is live, under the transfer's lock, and a
failure takes the same lock. So once the caller sees `TransferFailed`, no write is in flight and none will follow;
the destination blocks are the caller's again.
"""

import threading
import time
from concurrent.futures import Future
from enum import Enum

import torch

from .completion import Completion
from .errors import FailureKind, TransferFailed
from .frames import FrameHeader
from .layout import KVLayout, RowKind
from .paged_rows import write_rows


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
    ):
        self.transfer_id = transfer_id
        self.key = key
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
        self.completion: Completion | None = None
        self.failure: TransferFailed | None = None

    def renew(self) -> None:
        self.deadline = time.monotonic() + self.lease_s

    def write(self, header: FrameHeader, rows: torch.Tensor) -> bool | None:
        """Land one chunk. None: dropped (the transfer is no longer live). True: that was the last piece."""
        rows = rows.to(self.dst_block_ids.device)  # before the lock: the copy from host can be slow
        with self.lock:
            if self.state is not State.LIVE:
                return None
            self._check(header, rows)
            pool = self.pools[(header.layer, header.kind)]
            write_rows(pool, self.dst_block_ids, self.start_token + header.offset, rows)
            if pool.is_cuda:  # the write must be finished before a failure or completion can be reported
                torch.cuda.current_stream(pool.device).synchronize()
            self.landed[(header.layer, header.kind)] += header.count
            self.rows_left -= header.count
            return self._finish_if_ready()

    def complete(self, completion: Completion) -> bool | None:
        """Record the completion. None: the transfer is no longer live. True: every row had already landed."""
        with self.lock:
            if self.state is not State.LIVE:
                return None
            if self.completion is not None:
                raise TransferFailed("completed twice", FailureKind.INVALID)
            self.completion = completion
            return self._finish_if_ready()

    def fail(self, error: TransferFailed) -> bool:
        """Stop accepting rows; True if this call ended the transfer (it was live). Waits for a write in flight."""
        with self.lock:
            if self.state is not State.LIVE:
                return False
            self.state = State.FAILED
            self.failure = error
            return True

    def _finish_if_ready(self) -> bool:
        if self.rows_left == 0 and self.completion is not None:
            self.state = State.DONE
            return True
        return False

    def _check(self, header: FrameHeader, rows: torch.Tensor) -> None:
        where = (header.layer, header.kind)
        if where not in self.landed:
            raise TransferFailed(f"layer {header.layer} has no {header.kind.name.lower()} rows", FailureKind.INVALID)
        if header.offset < 0 or header.count < 1 or header.offset + header.count > self.num_tokens:
            raise TransferFailed(
                f"tokens [{header.offset}, {header.offset + header.count}) outside the transfer's {self.num_tokens}",
                FailureKind.INVALID,
            )
        if self.landed[where] + header.count > self.num_tokens:
            raise TransferFailed(
                f"layer {header.layer} {header.kind.name.lower()} rows exceed the transfer's tokens",
                FailureKind.INVALID,
            )
        if rows.shape != (header.count, self.layout.row_dim(header.kind)) or rows.dtype != self.layout.dtype:
            raise TransferFailed(f"rows {tuple(rows.shape)} {rows.dtype} do not fit the layout", FailureKind.INVALID)

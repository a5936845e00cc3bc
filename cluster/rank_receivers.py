"""Where a remote prefill lands for a tensor/expert-parallel decode replica: the `KVReceiver` of every rank.

Each rank holds a full copy of the latent KV and indexer-key caches (MLA's latent is not split by TP), so every rank
needs the prompt's KV. Each rank actor runs its own receiver and the prefill worker sends the same rows to all of
them (`PrefillRequest.mirror_addresses`, `kvtransfer.sender.MirroredTransfer`). That was chosen over one receiver on
rank 0 broadcasting to the others inside a lockstep step: the copies move on the receivers' own threads while the
ranks keep decoding (a broadcast would stall every rank's step for the prompt's whole cache), each rank's transfer
keeps the receiver's lease, abort and failure handling as it is, and a rank needs nothing but its own pools. The cost
is that the prefill worker sends the KV once per rank.

The lockstep engine reserves the same block ids on every rank, so every rank registers the transfer with the same
destination blocks. A transfer has arrived when it has arrived at every rank; when it fails at one, it is aborted at
the others and fails here. One thread per rank polls its rank for transfers that ended (`EngineRank.settled`).
"""

import asyncio
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayError

from glmserve.engine.remote import RemotePrefill
from glmserve.kvtransfer.completion import Completion
from glmserve.kvtransfer.errors import FailureKind, PeerLost, TransferAborted, TransferFailed
from glmserve.kvtransfer.stats import ReceiverStats

log = logging.getLogger(__name__)

_POLL_S = 1.0


@dataclass
class _Pending:
    future: Future = field(default_factory=Future)
    completions: dict[int, Completion] = field(default_factory=dict)  # rank -> what arrived there


class RankReceivers:
    """The `KVDestination` (see `decode.kv_destination`) of a replica whose ranks each run a KV receiver."""

    def __init__(self, ranks: Sequence[ray.actor.ActorHandle], addresses: list[str]):
        self.ranks = list(ranks)
        self.addresses = addresses
        self.stats = ReceiverStats()
        self._rank_stats = [{"bytes_received": 0, "transfer_seconds": 0.0} for _ in ranks]
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._closed = threading.Event()
        self._pollers = [
            threading.Thread(target=self._poll, args=(rank,), name=f"kv-poll-rank{rank}", daemon=True)
            for rank in range(len(self.ranks))
        ]
        for poller in self._pollers:
            poller.start()

    async def register(self, plan: RemotePrefill, lease_s: float, capability: bytes) -> "asyncio.Future[Completion]":
        """Register the transfer at every rank, with the same capability (the prefill worker presents it to each);
        the returned future resolves once the KV has landed at all of them (with rank 0's completion) or fails with
        `TransferFailed`."""
        rid = plan.request_id
        pending = _Pending()
        with self._lock:
            self._pending[rid] = pending  # before any rank knows it: its first poll may already report it
            self.stats.transfers_registered += 1
        args = (rid, plan.block_table, plan.num_tokens, plan.start_token, lease_s, capability)
        try:
            await asyncio.gather(*(r.register_transfer.remote(*args) for r in self.ranks))
        except RayError as e:
            self.abort(rid, "registering it failed")
            raise PeerLost(f"could not register the transfer at every rank: {e}") from e
        except BaseException:
            self.abort(rid, "the request was cancelled")
            raise
        return asyncio.wrap_future(pending.future)

    def abort(self, transfer_id: str, reason: str) -> None:
        """Fail the transfer now, here and (without waiting) at every rank. Before a rank frees the request's
        blocks it ends the transfer itself (`EngineRank._apply`), so no row lands in them afterwards."""
        self._fail(transfer_id, TransferAborted(reason))

    def _fail(self, transfer_id: str, error: TransferFailed) -> None:
        with self._lock:
            pending = self._pending.pop(transfer_id, None)
            if pending is None:
                return
            self.stats.transfers_failed += 1
            self.stats.failures_by_kind[error.kind.value] += 1
        for rank in self.ranks:
            rank.abort_transfer.remote(transfer_id, error.reason)
        pending.future.set_exception(error)

    def _poll(self, rank: int) -> None:
        while not self._closed.is_set():
            try:
                settled, stats = ray.get(self.ranks[rank].settled.remote(_POLL_S))
            except RayError as e:
                if not self._closed.is_set():
                    self._fail_all(PeerLost(f"lost decode rank {rank}: {e}"))
                return
            self._rank_stats[rank] = stats
            self.stats.bytes_received = sum(s["bytes_received"] for s in self._rank_stats)
            self.stats.transfer_seconds = self._rank_stats[0]["transfer_seconds"]
            for transfer_id, outcome in settled.items():
                if isinstance(outcome, TransferFailed):
                    self._fail(transfer_id, outcome)
                else:
                    self._landed(transfer_id, rank, outcome)

    def _landed(self, transfer_id: str, rank: int, completion: Completion) -> None:
        with self._lock:
            pending = self._pending.get(transfer_id)
            if pending is None:
                return  # failed already (or another orchestrator's)
            pending.completions[rank] = completion
            if len(pending.completions) < len(self.ranks):
                return
            del self._pending[transfer_id]
            self.stats.transfers_completed += 1
        pending.future.set_result(pending.completions[0])

    def _fail_all(self, error: TransferFailed) -> None:
        with self._lock:
            pending = list(self._pending)
        for transfer_id in pending:
            self._fail(transfer_id, error)

    def close(self) -> None:
        """Stop polling; transfers still pending fail. The receivers close with their ranks."""
        self._closed.set()
        self._fail_all(TransferFailed("the decode replica shut down", FailureKind.CLOSED))
        for poller in self._pollers:
            poller.join(timeout=2 * _POLL_S)

"""Where a decode worker's remote prefills land: its own `KVReceiver` (`LocalReceiver`), or, for a
tensor/expert-parallel replica, the receivers of all its ranks (`glmserve.cluster.rank_receivers.RankReceivers`)."""

import asyncio
from typing import Protocol

from glmserve.engine.remote import RemotePrefill
from glmserve.kvtransfer.completion import Completion
from glmserve.kvtransfer.receiver import KVReceiver
from glmserve.kvtransfer.stats import ReceiverStats


class KVDestination(Protocol):
    stats: ReceiverStats

    @property
    def addresses(self) -> list[str]:
        """The receivers a prefill worker must send the KV to (each wants all of it)."""

    async def register(self, plan: RemotePrefill, lease_s: float, capability: bytes) -> "asyncio.Future[Completion]":
        """Expect the plan's KV from the one sender that presents `capability` (registered when this returns); the
        future resolves once it has landed, or fails with `TransferFailed`."""

    def abort(self, transfer_id: str, reason: str) -> None:
        """Fail the transfer now: its future fails, and no row lands once the engine frees the blocks."""

    def close(self) -> None: ...


class LocalReceiver:
    """A `KVReceiver` next to this process's engine."""

    def __init__(self, receiver: KVReceiver):
        self.receiver = receiver
        self.stats = receiver.stats

    @property
    def addresses(self) -> list[str]:
        return [self.receiver.address]

    async def register(self, plan: RemotePrefill, lease_s: float, capability: bytes) -> "asyncio.Future[Completion]":
        future = self.receiver.register(
            plan.request_id, plan.block_table, plan.num_tokens, plan.start_token, lease_s, capability=capability
        )
        return asyncio.wrap_future(future)

    def abort(self, transfer_id: str, reason: str) -> None:
        self.receiver.abort(transfer_id, reason)

    def close(self) -> None:
        self.receiver.close()

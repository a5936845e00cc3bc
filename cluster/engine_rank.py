"""One rank of a tensor/expert-parallel decode replica: an actor hosting an `LLMEngine` shard.

Every rank must run the same sequence of engine commands (add, abort, and in disaggregated serving complete_remote /
fail_remote), so that the collectives inside the split layers line up; `ParallelEngine` sends each rank the same
commands, which `step` (or `apply`, between steps) applies in order.

In disaggregated serving each rank also runs its own `KVReceiver`: MLA's latent cache and the indexer keys are not
split by TP, so every rank holds a full copy and a prefill worker sends the prompt's KV to every rank. The receiver
moves data on its own threads; the methods the orchestrator calls about transfers run in their own concurrency groups,
so they answer while a step runs in the default group (which keeps engine calls on one thread, one at a time).
"""

import hashlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import ray

from glmserve.engine.engine_args import EngineArgs
from glmserve.engine.llm_engine import LLMEngine
from glmserve.engine.outputs import RequestOutput
from glmserve.engine.remote import RemotePrefill
from glmserve.kvtransfer.completion import Completion
from glmserve.kvtransfer.errors import TransferFailed
from glmserve.kvtransfer.limits import CompletionCheck
from glmserve.kvtransfer.receiver import KVReceiver

from .rank_group import RankProcess

# (method name, args): the engine calls that change its state between steps
Command = tuple[str, tuple]
COMMANDS = frozenset({"add_request", "abort", "complete_remote", "fail_remote"})
# commands that may free a request's blocks: its transfer must end first, so that no row lands in them afterwards
_ENDS_TRANSFER = frozenset({"abort", "fail_remote"})

# A transfer's outcome as the orchestrator polls it: what the prefill worker handed over, or why it failed.
Settled = Completion | TransferFailed


@dataclass
class RankStep:
    """What one rank reports after a step. Only rank 0 sends its outputs and counters (the ranks' are equal);
    every rank sends a digest of all the tokens it has produced, so the driver can tell that they agree."""

    digest: str
    has_work: bool
    idle: bool
    outputs: list[RequestOutput] | None = None
    stats: dict[str, float] | None = None


class EngineRankProcess(RankProcess):
    """The rank's engine and its commands (`EngineRank`); `cluster.prefill_ranks.PrefillRank` extends it."""

    def start(self, master_addr: str, master_port: int, timeout_s: float, args: EngineArgs) -> None:
        self.join(master_addr, master_port, timeout_s)  # the engine builds its groups over this process group
        self.engine = LLMEngine(args.model_copy(update={"device": self.device.type}))
        self._digest = hashlib.blake2b(digest_size=16)
        self.receiver: KVReceiver | None = None
        self._settled: dict[str, Settled] = {}
        self._settled_changed = threading.Condition()

    def step(self, commands: list[Command]) -> RankStep:
        """Apply the commands queued since the last step, in order, then run one step."""
        self._apply(commands)
        outputs = self.engine.step()
        self._record(outputs)
        return self.report(outputs)

    def apply(self, commands: list[Command]) -> tuple[list | None, RankStep]:
        """Apply commands without stepping, for results needed before the next step (a remote-prefill plan, the
        output that completes one): their results on rank 0, and this rank's state."""
        results = self._apply(commands)
        return (results if self.rank == 0 else None), self.report()

    def _apply(self, commands: list[Command]) -> list:
        results = []
        for name, args in commands:
            command = self._command(name)
            if name in _ENDS_TRANSFER and self.receiver is not None:
                self.receiver.abort(args[0], "the request ended on the decode side")
            result = command(*args)
            if isinstance(result, RemotePrefill):  # every rank must reserve the same blocks: the KV lands in them
                self._digest.update(f"{result};".encode())
            elif isinstance(result, RequestOutput):
                self._record([result])
            results.append(result)
        return results

    def _command(self, name: str) -> Callable:
        """What a command named `name` calls (subclasses add their own)."""
        if name not in COMMANDS:
            raise ValueError(f"unknown engine command {name!r}")
        return getattr(self.engine, name)

    def _record(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:  # the new tokens (not the whole sequences that finished requests carry)
            for d in out.deltas:
                self._digest.update(f"{out.request_id}#{d.index}:{d.token_ids}:{d.finish_reason};".encode())

    def report(self, outputs: list[RequestOutput] | None = None) -> RankStep:
        """This rank's state (and, on rank 0, `outputs` and the engine's counters)."""
        first = self.rank == 0
        return RankStep(
            self._digest.hexdigest(),
            self.engine.has_work,
            self.engine.idle,
            outputs if first else None,
            self.engine.stats() if first else None,
        )

    def info(self) -> dict:
        """What the driver needs to check requests before they reach the ranks."""
        return {"config": self.engine.config, "max_model_len": self.engine.max_model_len}

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        super().stop()

    # ---- KV transfers (disaggregated serving) ----
    def open_receiver(self, host: str | None, transport: str = "tcp") -> str:
        """Start this rank's KV receiver (once) on `host`, default this node's address, accepting `transport` only
        (and peers with the cluster secret: `GLMSERVE_KV_SECRET`, set in the deployment's runtime env); its
        address."""
        if self.receiver is None:
            layout, latent, index_keys = self.engine.transfer_layout()
            config = self.engine.config
            self.receiver = KVReceiver(
                layout,
                latent,
                index_keys,
                host=host or ray.util.get_node_ip_address(),
                transports=(transport,),
                completion_check=CompletionCheck(config.vocab_size, config.hidden_size),
            )
        return self.receiver.address

    @ray.method(concurrency_group="kv")
    def register_transfer(
        self,
        transfer_id: str,
        block_table: Sequence[int],
        num_tokens: int,
        start_token: int,
        lease_s: float,
        capability: bytes,
    ) -> None:
        """Expect a remote prefill's KV in these blocks, from the sender with `capability`; `settled` reports how
        it ended."""
        future = self.receiver.register(
            transfer_id, block_table, num_tokens, start_token, lease_s, capability=capability
        )
        future.add_done_callback(lambda f: self._settle(transfer_id, f))

    def _settle(self, transfer_id: str, future: Future) -> None:
        with self._settled_changed:
            self._settled[transfer_id] = future.exception() or future.result()
            self._settled_changed.notify_all()

    @ray.method(concurrency_group="kv")
    def abort_transfer(self, transfer_id: str, reason: str) -> None:
        self.receiver.abort(transfer_id, reason)

    @ray.method(concurrency_group="kv_poll")
    def settled(self, timeout_s: float) -> tuple[dict[str, Settled], dict[str, float]]:
        """The transfers that ended since the last call (waiting up to `timeout_s` for one), and the receiver's
        byte and time counters."""
        with self._settled_changed:
            self._settled_changed.wait_for(lambda: self._settled, timeout_s)
            settled, self._settled = self._settled, {}
        stats = self.receiver.stats
        return settled, {"bytes_received": stats.bytes_received, "transfer_seconds": stats.transfer_seconds}


# the transfer calls answer while a step runs (the default group)
EngineRank = ray.remote(concurrency_groups={"kv": 2, "kv_poll": 1})(EngineRankProcess)

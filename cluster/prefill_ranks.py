"""A prefill replica over several devices: `ParallelPrefillWorker` is a `PrefillWorker` whose engine is a
`ParallelEngine` of `PrefillRank` actors, driven in lockstep as a decode replica's ranks are.

Configuration: prefill replicas get their own split, `ServingConfig.prefill_engine` (`--prefill-tensor-parallel-size`,
`--prefill-expert-parallel-size`), TP=EP=1 by default. That is what vLLM and SGLang users expect from disaggregated
serving, where each role is launched with its own `--tp`: prefill is compute-bound and decode memory-bound, so the
best splits differ, and reusing `engine.tensor_parallel_size` would silently change existing TP decode deployments'
prefill replicas. Nothing else can differ: both roles must run the same model with the same cache layout.

Every rank runs the same prefill steps (the ranks' collectives must line up); only rank 0 sends. MLA's latent cache
and the indexer keys are not split by TP, so rank 0's pools hold the whole prompt's KV, and its outputs (first token,
logprobs) and last hidden state are the replica's. Rank 0 opens a request's transfer (in a concurrency group of its
own, while steps run); then `track`, queued with the add, registers the prompt on every rank, so every rank holds the
prompt's blocks when its last chunk is written (rank 0 sends from them), and `release`, queued once the transfer has
ended, frees them on every rank: the ranks' block managers stay alike, and so do their schedules.

A rank that dies or raises fails the step (`RankGroup` releases every rank, rank 0's sender with them): the prefill
raises EngineDeadError, its transfer ends at the decode side (aborted, or its sender gone), which recomputes the
prompt or fails the request by its policy; the replica's health check then fails so that Serve replaces it.
"""

import logging

import ray

from glmserve.engine.async_engine import AsyncEngine
from glmserve.engine.engine_args import EngineArgs
from glmserve.engine.remote import PrefillRequest
from glmserve.kvtransfer.sender import MirroredTransfer, OutgoingTransfer
from glmserve.prefill.worker import KVStreams, PrefillWorker, prefill_stats

from .engine_rank import EngineRankProcess, RankStep
from .parallel_engine import ParallelEngine

log = logging.getLogger(__name__)

Transfer = OutgoingTransfer | MirroredTransfer


class PrefillRankProcess(EngineRankProcess):
    """A rank of a parallel prefill replica: an engine shard with `KVStreams` hooks; rank 0's opens transfers."""

    def start(self, master_addr: str, master_port: int, timeout_s: float, args: EngineArgs, transport: str) -> None:
        super().start(master_addr, master_port, timeout_s, args)
        self.streams = KVStreams(self.engine, transport)
        self._opened: dict[str, Transfer] = {}  # request id -> its transfer, until released (rank 0)

    def _command(self, name: str):
        if name == "track":
            return self._track
        if name == "release":
            return self._release
        return super()._command(name)

    def _track(self, request_id: str, prompt_len: int) -> None:
        self.streams.track(request_id, prompt_len, self._opened.get(request_id))

    def _release(self, request_id: str) -> None:
        self._opened.pop(request_id, None)
        self.streams.release(request_id)

    def report(self, outputs: list | None = None) -> RankStep:
        """Rank 0's counters include its KV senders'."""
        step = super().report(outputs)
        if step.stats is not None:
            step.stats.update(self.streams.stats())
        return step

    def stop(self) -> None:
        self.streams.close()
        super().stop()

    # ---- rank 0's transfers, answered while a step runs ----
    @ray.method(concurrency_group="kv")
    def open_prefill(self, request: PrefillRequest) -> None:
        self._opened[request.request_id] = self.streams.open(request)

    @ray.method(concurrency_group="kv")
    def complete_prefill(self, request_id: str, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        """Hand over the first token; returns once the decode side has everything (raises TransferFailed if not)."""
        self.streams.complete(request_id, token, logprob, top).result()

    @ray.method(concurrency_group="kv")
    def abort_prefill(self, request_id: str, reason: str) -> None:
        transfer = self._opened.get(request_id)
        if transfer is not None:
            transfer.abort(reason)


# "kv" (several transfers at once) and the base class's groups, which its (unused here) receiver methods name
PrefillRank = ray.remote(concurrency_groups={"kv": 4, "kv_poll": 1})(PrefillRankProcess)


class ParallelPrefillWorker(PrefillWorker):
    """`PrefillWorker.prefill` over a `ParallelEngine` of `PrefillRank`s: the engine and the KV streams live on the
    ranks, so this replaces the base's constructor and the steps it runs on its own engine."""

    def __init__(
        self, engine_args: EngineArgs, transport: str = "tcp", use_gpu: bool = False, timeout_s: float = 300.0
    ):
        self.engine = ParallelEngine(engine_args, use_gpu, timeout_s, PrefillRank, (transport,))
        self._rank0 = self.engine.group.ranks[0]
        self.async_engine = AsyncEngine(self.engine)

    async def _open(self, request: PrefillRequest) -> None:
        await self._rank0.open_prefill.remote(request)  # the transfer stays on rank 0

    def _track(self, request_id: str, prompt_len: int, transfer: None) -> None:
        self.engine.enqueue(("track", (request_id, prompt_len)))

    async def _complete(self, request_id: str, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        await self._rank0.complete_prefill.remote(request_id, token, logprob, top)

    def _abort(self, request_id: str, transfer: None, reason: str) -> None:
        # not awaited: after a rank failure rank 0 is gone too, and its sender's connection with it
        self._rank0.abort_prefill.remote(request_id, reason)

    def _release(self, request_id: str) -> None:
        self.engine.enqueue(("release", (request_id,)))

    def stats(self) -> dict[str, float]:
        """As of the last step, on rank 0."""
        return prefill_stats(self.engine.stats())

    def shutdown(self) -> None:
        self.async_engine.shutdown()
        self.engine.shutdown()

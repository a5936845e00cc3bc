"""The prefill worker: computes a prompt's KV cache with the same engine the decode workers use, streams each
layer to the decode worker's blocks as soon as the prompt's last chunk has written it (later layers still
computing), and hands over the first sampled token and the last hidden state. A tensor/expert-parallel decode replica
gets the same KV at every rank (`PrefillRequest.mirror_addresses`).

Layers are sent straight from the engine's pools (no copy here; `cuda_ipc` lets the decode side read them in
place), so the sequence's blocks are held past the end of its one-token generation, until the transfer has
completed or failed. `KVStreams` is that sending side on its own, so that each rank of a tensor/expert-parallel
prefill replica can run it (`cluster/prefill_ranks.py`).

Plain Python: `cluster/app.py` wraps it as the Ray Serve `PrefillServer` deployment.
"""

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from glmserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineStopped
from glmserve.engine.engine_args import EngineArgs
from glmserve.engine.llm_engine import LLMEngine
from glmserve.engine.remote import PrefillRequest, PrefillResult
from glmserve.kvtransfer.auth import ClusterSecret, resolve_secret
from glmserve.kvtransfer.errors import PeerLost, TransferFailed
from glmserve.kvtransfer.sender import KVSender, MirroredTransfer, OutgoingTransfer, open_mirrored
from glmserve.model.model_runner import StepInputs

log = logging.getLogger(__name__)


@dataclass
class _Outgoing:
    transfer: OutgoingTransfer | MirroredTransfer | None  # None: hold the blocks, send nothing
    prompt_len: int
    hidden: torch.Tensor | None = None
    held_blocks: list[int] | None = None  # the sequence's blocks, held for the transfer to read


class KVStreams:
    """The sending side of a prefill engine: hooks on `engine` stream each layer of the tracked prompts to their
    decode receivers as soon as the prompt's last chunk has written it, holding the prompt's blocks until the
    transfer has read them. A prompt tracked without a transfer (on the other ranks of a tensor/expert-parallel
    prefill replica, whose rank 0 sends) sends nothing but holds and frees the same blocks, so that the ranks' block
    managers, and with them their schedules, stay alike."""

    def __init__(self, engine: LLMEngine, transport: str = "tcp", secret: ClusterSecret | str | None = None):
        """`secret`: the cluster's KV transfer secret (default: `GLMSERVE_KV_SECRET`, see `kvtransfer.auth`)."""
        self.engine = engine
        self.transport = transport
        self.secret = resolve_secret(secret)
        self.layout, self.latent, self.index_keys = engine.transfer_layout()
        self._senders: dict[str, KVSender] = {}
        self._senders_lock = threading.Lock()
        self._outgoing: dict[str, _Outgoing] = {}  # engine request id (prefill requests are n=1) -> transfer
        engine.runner.layer_hook = self._on_layer
        engine.hidden_hook = self._on_hidden

    def _sender(self, address: str) -> KVSender:
        """The session to a receiver, connected on first use and again once the old one is gone (the receiver
        closes idle sessions, and a restarted decode replica knows none)."""
        with self._senders_lock:
            for gone in [a for a, s in self._senders.items() if not s.alive]:  # e.g. a decode replica that died:
                self._senders.pop(gone).close()  # its threads, socket and buffers go with it
            sender = self._senders.get(address)
            if sender is None:
                pools = (self.latent, self.index_keys)
                sender = KVSender.connect(address, self.layout, self.transport, pools=pools, secret=self.secret)
                self._senders[address] = sender
            return sender

    # ---- engine-thread hooks ----
    def _on_layer(self, layer: int, step: StepInputs) -> None:
        """A layer's KV was written: send it for every transfer whose prompt is now complete in that layer."""
        if layer >= self.layout.num_layers or not self._outgoing:
            return
        if layer == 0:
            # Leases are renewed only on progress; a prompt still queued or in its early chunks shows it here.
            for out in list(self._outgoing.values()):
                if out.transfer is not None:
                    with contextlib.suppress(TransferFailed):  # the decode side gave up; prefill() notices at the end
                        out.transfer.keepalive()
        for chunk in step.chunks:
            out = self._outgoing.get(chunk.request_id)
            if out is None or chunk.start_pos + len(chunk.token_ids) != out.prompt_len:
                continue  # not ours, or not the prompt's last chunk yet
            if out.held_blocks is None:
                # the sender reads these blocks in its own thread (or the receiver reads them in place): they must
                # outlive the sequence, which finishes with this step
                out.held_blocks = list(chunk.block_table)
                self.engine.block_manager.acquire(out.held_blocks)
                if out.transfer is not None:
                    with contextlib.suppress(TransferFailed):
                        out.transfer.read_from_pools(out.held_blocks)
            if out.transfer is not None:
                with contextlib.suppress(TransferFailed):  # the decode side gave up: nothing more is sent
                    out.transfer.send_layer(layer)

    def _on_hidden(self, request_id: str, hidden: torch.Tensor) -> None:
        out = self._outgoing.get(request_id)
        if out is not None and out.transfer is not None:
            out.hidden = hidden.detach().clone()

    # ---- requests ----
    def open(self, request: PrefillRequest) -> OutgoingTransfer | MirroredTransfer:
        """The request's transfer, at the decode worker's receiver and at each mirror (the other ranks of a parallel
        decode replica), with the capability the decode worker drew for it; blocks while it connects. A session the
        receiver dropped since its last use is replaced once."""
        addresses = (request.receiver_address, *request.mirror_addresses)
        try:
            return open_mirrored([self._sender(a) for a in addresses], request.request_id, request.capability)
        except PeerLost:
            return open_mirrored([self._sender(a) for a in addresses], request.request_id, request.capability)

    def track(self, request_id: str, prompt_len: int, transfer: OutgoingTransfer | MirroredTransfer | None) -> None:
        """Stream the prompt's KV into `transfer` as the engine computes it (before the engine's next step)."""
        self._outgoing[request_id] = _Outgoing(transfer, prompt_len)

    def complete(self, request_id: str, token: int, logprob: float, top: list[tuple[int, float]]) -> Future:
        """Hand over the first token and the last hidden state; resolves once the decode side has everything."""
        out = self._outgoing[request_id]
        return out.transfer.complete(token, logprob, top, out.hidden)

    def release(self, request_id: str) -> None:
        """On the engine thread: stop tracking the request and free the blocks held for its transfer."""
        out = self._outgoing.pop(request_id, None)
        if out is not None and out.held_blocks is not None:
            self.engine.block_manager.free(out.held_blocks)

    def stats(self) -> dict[str, float]:
        sent = [s.stats for s in self._senders.values()]
        return {
            "kv_transfer_bytes": sum(s.bytes_sent for s in sent),
            "kv_transfer_seconds": sum(s.send_seconds for s in sent),
            "kv_transfer_failures": sum(s.transfers_failed for s in sent),
        }

    def close(self) -> None:
        for sender in self._senders.values():
            sender.close()


def prefill_stats(stats: dict[str, float]) -> dict[str, float]:
    """A prefill replica's routing and metrics counters, from its engine's and its KVStreams' counters."""
    return {"role": "prefill", **{name: stats[name] for name in _PREFILL_STATS}}


_PREFILL_STATS = (
    "num_requests_running",
    "num_requests_waiting",
    "kv_cache_usage",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "kv_transfer_bytes",
    "kv_transfer_seconds",
    "kv_transfer_failures",
)


class PrefillWorker:
    """One engine in this process. The engine-side steps of a prefill (`_open`, `_track`, `_complete`, `_abort`,
    `_release`) are methods, so that `cluster.prefill_ranks.ParallelPrefillWorker` can run them on rank actors."""

    def __init__(self, engine_args: EngineArgs, transport: str = "tcp", secret: ClusterSecret | str | None = None):
        self.engine = LLMEngine(engine_args)
        self.streams = KVStreams(self.engine, transport, secret)
        self.layout = self.streams.layout
        self.async_engine = AsyncEngine(self.engine)

    async def _open(self, request: PrefillRequest) -> OutgoingTransfer | MirroredTransfer | None:
        return await asyncio.to_thread(self.streams.open, request)

    def _track(self, request_id: str, prompt_len: int, transfer: OutgoingTransfer | MirroredTransfer | None) -> None:
        self.streams.track(request_id, prompt_len, transfer)

    async def _complete(self, request_id: str, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        await asyncio.wrap_future(self.streams.complete(request_id, token, logprob, top))

    def _abort(self, request_id: str, transfer: OutgoingTransfer | MirroredTransfer | None, reason: str) -> None:
        transfer.abort(reason)

    def _release(self, request_id: str) -> None:
        self.streams.release(request_id)

    # ---- requests ----
    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        t0 = time.perf_counter()
        rid, prompt = request.request_id, request.prompt_token_ids
        transfer = await self._open(request)
        params = request.params.model_copy(
            update={
                "max_tokens": 1,
                "min_tokens": min(request.params.min_tokens, 1),
                "n": 1,
                "stop": [],
                "include_stop_str_in_output": False,
            }
        )

        def add() -> None:  # on the engine thread; tracked before the step that computes the prompt
            self.engine.add_request(rid, prompt, params)
            self._track(rid, len(prompt), transfer)

        last = None
        try:
            async for out in self.async_engine.generate(rid, add):
                last = out
            final = last.outputs[0]
            token = final.token_ids[0]
            entry = final.logprobs[0] if final.logprobs else {}
            top = sorted(((t, lp.logprob) for t, lp in entry.items() if t != token), key=lambda x: -x[1])
            logprob = entry[token].logprob if token in entry else 0.0
            await self._complete(rid, token, logprob, top)
        except BaseException as e:
            self._abort(rid, transfer, f"prefill failed: {e!r}")
            raise
        finally:
            with contextlib.suppress(EngineDeadError, EngineStopped):  # an ended engine holds nothing any more
                await self.async_engine.submit(lambda: self._release(rid))
        return PrefillResult(
            request_id=rid,
            first_token=token,
            num_cached_tokens=last.num_cached_tokens,
            seconds=time.perf_counter() - t0,
        )

    def stats(self) -> dict[str, float]:
        return prefill_stats({**self.engine.stats(), **self.streams.stats()})

    def shutdown(self) -> None:
        self.async_engine.shutdown()
        self.streams.close()

"""The prefill worker: computes a prompt's KV cache with the same engine the decode workers use, streams each
layer to the decode worker's blocks as soon as the prompt's last chunk has written it (later layers still
computing), and hands over the first sampled token and the last hidden state. A tensor/expert-parallel decode replica
gets the same KV at every rank (`PrefillRequest.mirror_addresses`).

Layers are sent straight from the engine's pools (no copy here; `cuda_ipc` lets the decode side read them in
place), so the sequence's blocks are held past the end of its one-token generation, until the transfer has
completed or failed.

Plain Python: `cluster/app.py` wraps it as the Ray Serve `PrefillServer` deployment.
"""

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import torch

from glmserve.decode.async_engine import AsyncEngine
from glmserve.decode.engine import LLMEngine
from glmserve.decode.engine_args import EngineArgs
from glmserve.kvtransfer.errors import TransferFailed
from glmserve.kvtransfer.layout import KVLayout
from glmserve.kvtransfer.sender import KVSender, MirroredTransfer, OutgoingTransfer, open_mirrored
from glmserve.model.model_runner import StepInputs

from .request import PrefillRequest, PrefillResult

log = logging.getLogger(__name__)


def transfer_layout(engine: LLMEngine) -> tuple[KVLayout, list[torch.Tensor], dict[int, torch.Tensor]]:
    """The layout both sides of a transfer agree on, and the pools it covers. The MTP layer's KV travels only
    when speculation is on (otherwise nobody computes it)."""
    cache = engine.cache
    layers = engine.config.num_hidden_layers + (1 if engine.drafter is not None else 0)
    latent = cache.latent[:layers]
    index_keys = {layer: pool for layer, pool in cache.index_keys.items() if layer < layers}
    layout = KVLayout(
        layers,
        cache.spec.block_size,
        cache.spec.latent_dim,
        cache.spec.index_dim,
        tuple(sorted(index_keys)),
        cache.spec.dtype,
    )
    return layout, latent, index_keys


@dataclass
class _Outgoing:
    transfer: OutgoingTransfer | MirroredTransfer
    prompt_len: int
    hidden: torch.Tensor | None = None
    held_blocks: list[int] | None = None  # the sequence's blocks, held for the transfer to read


class PrefillWorker:
    def __init__(self, engine_args: EngineArgs, transport: str = "tcp"):
        self.engine = LLMEngine(engine_args)
        self.async_engine = AsyncEngine(self.engine)
        self.transport = transport
        self.layout, self.latent, self.index_keys = transfer_layout(self.engine)
        self._senders: dict[str, KVSender] = {}
        self._senders_lock = threading.Lock()
        self._outgoing: dict[str, _Outgoing] = {}  # engine sequence id -> transfer
        self.engine.runner.layer_hook = self._on_layer
        self.engine.hidden_hook = self._on_hidden

    def _sender(self, address: str) -> KVSender:
        with self._senders_lock:
            sender = self._senders.get(address)
            if sender is None:
                sender = KVSender.connect(address, self.layout, self.transport, pools=(self.latent, self.index_keys))
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
                with contextlib.suppress(TransferFailed):
                    out.transfer.read_from_pools(out.held_blocks)
            with contextlib.suppress(TransferFailed):  # the decode side gave up: nothing more is sent
                out.transfer.send_layer(layer)

    def _on_hidden(self, request_id: str, hidden: torch.Tensor) -> None:
        out = self._outgoing.get(f"{request_id}#0")
        if out is not None:
            out.hidden = hidden.detach().clone()

    def _open_transfer(self, request: PrefillRequest) -> OutgoingTransfer | MirroredTransfer:
        """At the decode worker's receiver, and at each mirror (the other ranks of a parallel decode replica)."""
        senders = [self._sender(address) for address in (request.receiver_address, *request.mirror_addresses)]
        return open_mirrored(senders, request.request_id)

    # ---- requests ----
    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        t0 = time.perf_counter()
        transfer = await asyncio.to_thread(self._open_transfer, request)
        seq_id = f"{request.request_id}#0"
        self._outgoing[seq_id] = _Outgoing(transfer, len(request.prompt_token_ids))
        params = request.params.model_copy(
            update={
                "max_tokens": 1,
                "min_tokens": min(request.params.min_tokens, 1),
                "n": 1,
                "stop": [],
                "include_stop_str_in_output": False,
            }
        )
        engine = self.engine
        add = lambda: engine.add_request(request.request_id, request.prompt_token_ids, params)  # noqa: E731
        last = None
        try:
            async for out in self.async_engine.generate(request.request_id, add):
                last = out
            final = last.outputs[0]
            token = final.token_ids[0]
            entry = final.logprobs[0] if final.logprobs else {}
            top = sorted(((t, lp.logprob) for t, lp in entry.items() if t != token), key=lambda x: -x[1])
            logprob = entry[token].logprob if token in entry else 0.0
            await asyncio.wrap_future(transfer.complete(token, logprob, top, self._outgoing[seq_id].hidden))
        except BaseException as e:
            transfer.abort(f"prefill failed: {e!r}")
            raise
        finally:
            out = self._outgoing.pop(seq_id, None)
            if out is not None and out.held_blocks is not None:
                await self.async_engine.submit(lambda: self.engine.block_manager.free(out.held_blocks))
        return PrefillResult(
            request_id=request.request_id,
            first_token=token,
            num_cached_tokens=last.num_cached_tokens,
            seconds=time.perf_counter() - t0,
        )

    def stats(self) -> dict[str, float]:
        engine = self.engine
        sent = [s.stats for s in self._senders.values()]
        return {
            "role": "prefill",
            "num_requests_running": len(engine.scheduler.running),
            "num_requests_waiting": len(engine.scheduler.waiting),
            "kv_cache_usage": engine.block_manager.usage,
            "prefix_cache_queries": engine.block_manager.prefix_queries,
            "prefix_cache_hits": engine.block_manager.prefix_hits,
            "kv_transfer_bytes": sum(s.bytes_sent for s in sent),
            "kv_transfer_seconds": sum(s.send_seconds for s in sent),
            "kv_transfer_failures": sum(s.transfers_failed for s in sent),
        }

    def shutdown(self) -> None:
        self.async_engine.shutdown()
        for sender in self._senders.values():
            sender.close()

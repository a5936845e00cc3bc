"""The decode worker: runs an engine, prefills short prompts itself, and (when prefill workers exist) hands long
uncached prompts to one of them, receiving their KV cache over the transfer service before decoding.

Decode is the orchestrator: it reserves the blocks, registers a transfer (with a lease) at its KV receiver (at every
rank's, for a tensor/expert-parallel replica), asks a prefill worker to fill them, and decodes once every layer has
landed. A failed transfer (lease expired, prefill worker died, aborted, a corrupt or invalid transfer) frees the
blocks and, by policy, recomputes the prompt here or fails the request.

Ids and credentials: every request gets an engine id of its own (random), whatever the caller named it: the
caller's `request_id` is a label, echoed back in the outputs, never a key (two requests under one label are two
requests). A remote prefill's transfer is named by that engine id and guarded by a capability drawn here and given
only to the prefill worker asked to fill it; the receiver needs the cluster secret from every peer.

Plain Python: `cluster/app.py` wraps it as the Ray Serve `DecodeServer` deployment.
"""

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

from glmserve.engine.async_engine import AsyncEngine
from glmserve.engine.block_manager import block_hash
from glmserve.engine.engine_args import EngineArgs
from glmserve.engine.llm_engine import LLMEngine
from glmserve.engine.outputs import Logprob, RequestOutput
from glmserve.engine.protocol import Engine
from glmserve.engine.remote import PrefillRequest, RemotePrefill, RemotePrefillFailed
from glmserve.engine.request import EngineRequest
from glmserve.kvtransfer.auth import ClusterSecret, new_capability
from glmserve.kvtransfer.completion import Completion
from glmserve.kvtransfer.errors import FailureKind, TransferFailed
from glmserve.kvtransfer.limits import CompletionCheck
from glmserve.kvtransfer.receiver import KVReceiver

from .kv_destination import KVDestination, LocalReceiver

log = logging.getLogger(__name__)

PrefillCall = Callable[[PrefillRequest], Awaitable[object]]


class DecodeWorker:
    def __init__(
        self,
        engine_args: EngineArgs,
        prefill: PrefillCall | None = None,
        local_prefill_threshold: int = 256,
        lease_s: float = 30.0,
        timeout_s: float = 600.0,
        on_failure: Literal["recompute", "fail"] = "recompute",
        host: str = "127.0.0.1",
        engine: Engine | None = None,
        receiver: KVDestination | None = None,
        transport: str = "tcp",
        secret: ClusterSecret | str | None = None,
    ):
        """`engine`: one already built from `engine_args` (a ParallelEngine); default: an LLMEngine here.
        `receiver`: where remote prefills land (a ParallelEngine's rank receivers); default: a KVReceiver on `host`
        over this engine's pools, when there is a `prefill`, accepting only `transport` and peers with the cluster
        `secret` (default: `GLMSERVE_KV_SECRET`, see `kvtransfer.auth`)."""
        self.engine = engine or LLMEngine(engine_args)
        self.async_engine = AsyncEngine(self.engine)
        self.prefill = prefill
        self.threshold = local_prefill_threshold
        self.lease_s = lease_s
        self.timeout_s = timeout_s
        self.on_failure = on_failure
        self.receiver = receiver
        config = self.engine.config
        self.completion_check = CompletionCheck(config.vocab_size, config.hidden_size)
        if prefill is not None and receiver is None:
            layout, latent, index_keys = self.engine.transfer_layout()
            kv = KVReceiver(
                layout,
                latent,
                index_keys,
                host=host,
                transports=(transport,),
                secret=secret,
                completion_check=self.completion_check,
            )
            self.receiver = LocalReceiver(kv)
        self.remote_prefills = self.local_fallbacks = 0

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; they carry `request.request_id`, the engine knows the request by an id of
        its own."""
        engine = self.engine
        threshold = self.threshold if self.prefill is not None else None
        rid = secrets.token_hex(12)
        label = request.request_id

        def add() -> RemotePrefill | None:
            return engine.add_request(rid, request.prompt_token_ids, request.params, threshold)

        async def remote(plan: RemotePrefill | None) -> AsyncIterator[RequestOutput]:
            if plan is not None:
                out = await self._remote_prefill(plan, request)
                if out is not None:
                    yield out

        async for out in self.async_engine.generate(rid, add, remote):
            out.request_id = label
            yield out

    async def _remote_prefill(self, plan: RemotePrefill, request: EngineRequest) -> RequestOutput | None:
        """Fill the reserved blocks from a prefill worker. Returns the first output, or None when the prompt was
        sent back to be prefilled here."""
        rid = plan.request_id
        self.remote_prefills += 1
        capability = new_capability()
        try:
            arrived = await self.receiver.register(plan, self.lease_s, capability)
        except TransferFailed as e:  # a rank of a parallel replica could not take it
            return await self._fall_back(rid, e)
        arrived.add_done_callback(_ignore_result)  # if we stop waiting (cancelled), its failure is still seen
        ids = request.prompt_token_ids
        receiver_address, *mirrors = self.receiver.addresses
        response = self.prefill(
            PrefillRequest(
                request_id=rid,
                capability=capability,
                prompt_token_ids=ids,
                params=request.params,
                receiver_address=receiver_address,
                mirror_addresses=mirrors,
                affinity_key=block_hash(None, ids[:64]) if len(ids) >= 64 else None,
            )
        )
        call = asyncio.ensure_future(response)
        call.add_done_callback(_ignore_result)  # its failure is read in _wait_for_kv, if at all: never "unretrieved"
        try:
            await self._wait_for_kv(rid, arrived, call)
            completion: Completion = await arrived
            problem = self.completion_check.problem(completion)  # the receiver checked; a parallel one's ranks too
            if problem is not None:
                raise TransferFailed(f"bad completion: {problem}", FailureKind.INVALID)
        except TransferFailed as e:
            return await self._fall_back(rid, e)
        except BaseException:
            # the client left (cancelled): no row may land in these blocks once the engine frees them, and the
            # prefill worker need not finish (a Serve DeploymentResponse cancels the call at the prefill replica)
            self.receiver.abort(rid, "the request was cancelled")
            call.cancel()
            cancel = getattr(response, "cancel", None)
            if callable(cancel):
                cancel()
            raise
        entry = self._logprob_entry(completion, request)
        engine = self.engine  # complete_remote ends the request there when that one token finishes it
        return await self.async_engine.submit(lambda: engine.complete_remote(rid, completion.first_token, entry))

    async def _wait_for_kv(self, rid: str, arrived: asyncio.Future, call: asyncio.Future) -> None:
        """Until the KV has landed, the transfer failed, or it must be given up: the prefill call failed (no need
        to wait for its lease to lapse), or `timeout_s` passed (a prefill worker that is alive, so it renews its
        lease, but stuck)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        pending = {arrived, call}
        while not arrived.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.receiver.abort(rid, f"no KV cache after {self.timeout_s:g} s")
                return
            done, _ = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if call in done:
                pending.discard(call)
                if call.exception() is not None and not arrived.done():
                    self.receiver.abort(rid, f"prefill call failed: {call.exception()!r}")
                    return

    async def _fall_back(self, rid: str, error: TransferFailed) -> None:
        log.warning("remote prefill of %s failed (%s); %s", rid, error, self.on_failure)
        recompute = self.on_failure == "recompute"
        engine = self.engine
        await self.async_engine.submit(lambda: engine.fail_remote(rid, recompute))
        if not recompute:
            raise RemotePrefillFailed(f"the prompt's KV cache did not arrive: {error}") from error
        self.local_fallbacks += 1
        return None

    def _logprob_entry(self, completion: Completion, request: EngineRequest) -> dict[int, Logprob] | None:
        k = request.params.logprobs
        if k is None:
            return None
        decode = self.engine.tokenizer.decode
        entry = {completion.first_token: Logprob(completion.logprob, None, decode([completion.first_token]))}
        for rank, (token, lp) in enumerate(completion.top_logprobs[:k]):
            entry.setdefault(token, Logprob(lp, rank + 1, decode([token])))
        return entry

    def stats(self) -> dict[str, float]:
        """Cheap counters for metrics and routing; read without locking (ints and floats, torn reads harmless)."""
        received = self.receiver.stats if self.receiver else None
        return {
            "role": "decode",
            **self.engine.stats(),
            "kv_transfer_bytes": received.bytes_received if received else 0,
            "kv_transfer_seconds": received.transfer_seconds if received else 0.0,
            "kv_transfer_failures": received.transfers_failed if received else 0,
        }

    async def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once no request holds blocks (tests use it to check that nothing leaked)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.engine.idle:
                return True
            await asyncio.sleep(0.05)
        return False

    def shutdown(self) -> None:
        self.async_engine.shutdown()
        if self.receiver is not None:
            self.receiver.close()


def _ignore_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it as never seen

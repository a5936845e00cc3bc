"""The decode worker: runs an engine, prefills short prompts itself, and (when prefill workers exist) hands long
uncached prompts to one of them, receiving their KV cache over the transfer service before decoding.

Plain Python: `cluster/app.py` wraps it as the Ray Serve `DecodeServer` deployment.
"""

import asyncio
import logging
from collections.abc import AsyncIterator

from .async_engine import AsyncEngine
from .engine import LLMEngine
from .engine_args import EngineArgs
from .outputs import RequestOutput
from .request import EngineRequest

log = logging.getLogger(__name__)


class DecodeWorker:
    def __init__(self, engine_args: EngineArgs):
        self.engine = LLMEngine(engine_args)
        self.async_engine = AsyncEngine(self.engine)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        engine = self.engine
        add = lambda: engine.add_request(request.request_id, request.prompt_token_ids, request.params)  # noqa: E731
        async for out in self.async_engine.generate(request.request_id, add):
            yield out

    def stats(self) -> dict[str, float]:
        """Cheap counters for metrics and routing; read without locking (ints and floats, torn reads harmless)."""
        engine = self.engine
        blocks = engine.block_manager
        return {
            "role": "decode",
            "num_requests_running": len(engine.scheduler.running),
            "num_requests_waiting": len(engine.scheduler.waiting),
            "kv_cache_usage": blocks.usage,
            "prefix_cache_queries": blocks.prefix_queries,
            "prefix_cache_hits": blocks.prefix_hits,
            "num_preemptions": engine.scheduler.num_preemptions,
            "spec_decode_num_draft_tokens": sum(engine.policy.drafted),
            "spec_decode_num_accepted_tokens": sum(engine.policy.accepted),
            **{f"spec_decode_accepted_pos{i}": n for i, n in enumerate(engine.policy.accepted)},
            **{f"spec_decode_drafted_pos{i}": n for i, n in enumerate(engine.policy.drafted)},
        }

    async def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once no request holds blocks (tests use it to check that nothing leaked)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if (
                not self.engine.scheduler.has_work
                and self.engine.block_manager.num_free_blocks == self.engine.block_manager.num_blocks
            ):
                return True
            await asyncio.sleep(0.05)
        return False

    def shutdown(self) -> None:
        self.async_engine.shutdown()

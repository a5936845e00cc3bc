"""The decode worker's remote prefill, in process (no Ray): a prefill worker fills the reserved blocks over the
tcp transport, output equals the offline engine's, and a transfer that stalls ends by its lease in a local
recompute (or a clear failure) with no block left allocated. (A dead prefill worker is tested through Ray in
test_disaggregation.py; its lease and connection loss in test_kvtransfer*.py.)"""

import asyncio

import pytest
import torch
from engine_fixtures import generate_tokens

from glmserve import LLM, SamplingParams
from glmserve.decode.server import DecodeWorker
from glmserve.engine.engine_args import EngineArgs
from glmserve.engine.remote import PrefillRequest, RemotePrefillFailed
from glmserve.kvtransfer.sender import KVSender
from glmserve.prefill.worker import PrefillWorker

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
KV_BUDGET = 256 << 20  # each engine its own budget: several share one GPU when the tests run there


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 8000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("k", [0, 2])
def test_remote_prefill_equals_offline(k):
    prompts = [_prompt(n, seed=n) for n in (40, 130, 300)]
    want = [
        o.outputs[0].token_ids
        for o in LLM(num_speculative_tokens=k, kv_cache_memory_bytes=KV_BUDGET).generate(
            [{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False
        )
    ]

    async def run():
        args = EngineArgs(num_speculative_tokens=k, kv_cache_memory_bytes=KV_BUDGET)
        prefill = PrefillWorker(args)
        decode = DecodeWorker(args, prefill=prefill.prefill, local_prefill_threshold=100)
        try:
            got = [await generate_tokens(decode, f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
            assert await decode.wait_idle()
            blocks = prefill.engine.block_manager  # the blocks held for the transfers (read in place) are back
            assert blocks.num_free_blocks == blocks.num_blocks
            return got, decode.remote_prefills, decode.receiver.stats
        finally:
            decode.shutdown()
            prefill.shutdown()

    got, remote, stats = asyncio.run(run())
    assert got == want
    assert remote == 2 and stats.transfers_completed == 2  # the 40-token prompt stayed local


def _stalling_prefill(decode_layout_source: PrefillWorker):
    """A prefill worker that opens the transfer, sends one layer, then hangs while its sender still renews the lease
    (a stuck process, not a dead one)."""

    async def prefill(request: PrefillRequest):
        sender = KVSender.connect(request.receiver_address, decode_layout_source.layout)
        transfer = sender.open_transfer(request.request_id, request.capability)
        transfer.send_layer(
            0,
            torch.zeros(transfer.num_tokens, decode_layout_source.layout.latent_dim),
            torch.zeros(transfer.num_tokens, decode_layout_source.layout.index_dim),
        )
        await asyncio.sleep(3600)

    return prefill


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_stalled_transfer_is_given_up(policy):
    prompt = _prompt(300, seed=7)
    llm = LLM(kv_cache_memory_bytes=KV_BUDGET)
    want = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids

    async def run():
        args = EngineArgs(kv_cache_memory_bytes=KV_BUDGET)
        layout_source = PrefillWorker(args)
        decode = DecodeWorker(
            args,
            prefill=_stalling_prefill(layout_source),
            local_prefill_threshold=100,
            lease_s=1.0,
            timeout_s=2.0,
            on_failure=policy,
        )
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            try:
                result = await asyncio.wait_for(generate_tokens(decode, "stalled", prompt, GREEDY), timeout=20)
            except RemotePrefillFailed as e:
                result = e
            elapsed = loop.time() - t0
            assert await decode.wait_idle()
            return result, elapsed, decode.receiver.stats
        finally:
            decode.shutdown()
            layout_source.shutdown()

    result, elapsed, stats = asyncio.run(run())
    assert elapsed < 10, "the transfer timeout (2 s) should end the wait long before the test's timeout"
    assert stats.transfers_failed == 1
    if policy == "recompute":
        assert result == want
    else:
        assert isinstance(result, RemotePrefillFailed) and "did not arrive" in str(result)

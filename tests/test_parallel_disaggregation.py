"""Disaggregated serving to a tensor-parallel decode replica (CPU, gloo, tcp, one local Ray for the module): each
decode rank runs its own KV receiver and the prefill worker sends the prompt's KV to all of them. Greedy output equals
the single-process engine's for prompts above and below the local-prefill threshold, every rank ends with no block
held, and a prefill that fails midway (transfer aborted, call raising) ends in a local recompute, or a clear failure
under the fail policy, on every rank. A Serve app (1 prefill replica + a TP=2 decode replica) answers over HTTP."""

import asyncio

import httpx
import pytest
import torch
from engine_fixtures import generate_tokens, random_prompts
from ray import serve
from ray_fixtures import assert_ranks_agree_and_idle, local_ray
from server_process import free_port

from glmserve import LLM
from glmserve.cluster.app import build_app
from glmserve.cluster.parallel_engine import ParallelEngine
from glmserve.cluster.serving_config import RoleConfig, ServingConfig
from glmserve.decode.server import DecodeWorker
from glmserve.engine.engine_args import EngineArgs
from glmserve.engine.remote import PrefillRequest, RemotePrefillFailed
from glmserve.engine.sampling_params import SamplingParams
from glmserve.kvtransfer.sender import KVSender, open_mirrored
from glmserve.model.default_checkpoint import default_checkpoint
from glmserve.model.tokenizer import Tokenizer
from glmserve.prefill.worker import PrefillWorker

pytestmark = pytest.mark.slow

ENGINE = {"num_speculative_tokens": 2, "adaptive_speculation": False}  # the MTP layer's KV travels too
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
THRESHOLD = 64
PROMPTS = random_prompts([20, 150, 300], 8000, seed=5)  # below, above (past index_topk: sparse), above
# uncached on the decode ranks (a cached prefix would make them short enough to prefill locally)
FAILING = dict(zip(["recompute", "fail"], random_prompts([200, 200], 8000, seed=6), strict=True))


@pytest.fixture(scope="module")
def cluster():
    yield from local_ray()


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    """Greedy token ids by the single-process engine: PROMPTS by index, and the prompt whose prefill fails."""
    prompts = [*PROMPTS, FAILING["recompute"]]
    outputs = LLM(**ENGINE).generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return {name: o.outputs[0].token_ids for name, o in zip([0, 1, 2, "recompute"], outputs, strict=True)}


@pytest.fixture(scope="module")
def tp2(cluster):
    engine = ParallelEngine(EngineArgs(**ENGINE, tensor_parallel_size=2))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def prefill_worker():
    worker = PrefillWorker(EngineArgs(**ENGINE))
    yield worker
    worker.shutdown()


def _decode_worker(engine: ParallelEngine, prefill, **options) -> DecodeWorker:
    return DecodeWorker(
        EngineArgs(**ENGINE, tensor_parallel_size=2),
        prefill=prefill,
        local_prefill_threshold=THRESHOLD,
        engine=engine,
        receiver=engine.open_receivers("127.0.0.1"),
        **options,
    )


def test_remote_prefill_to_every_rank_equals_one_process(tp2, prefill_worker, reference):
    decode = _decode_worker(tp2, prefill_worker.prefill)

    async def run() -> list[list[int]]:
        got = [await generate_tokens(decode, f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
        assert await decode.wait_idle()
        return got

    try:
        assert asyncio.run(asyncio.wait_for(run(), timeout=120)) == [reference[i] for i in range(len(PROMPTS))]
        assert decode.remote_prefills == 2 and decode.local_fallbacks == 0  # the 20-token prompt stayed local
        stats = decode.receiver.stats
        assert stats.transfers_completed == 2 and stats.transfers_failed == 0 and stats.bytes_received > 0
    finally:
        decode.shutdown()
    assert_ranks_agree_and_idle(tp2)
    blocks = prefill_worker.engine.block_manager  # the blocks held while the ranks read them are back
    assert blocks.num_free_blocks == blocks.num_blocks


def _prefill_that_gives_up(layout_source: PrefillWorker):
    """Opens the transfer at every rank, sends one layer, aborts it and raises (a prefill worker failing midway)."""

    async def prefill(request: PrefillRequest):
        layout = layout_source.layout
        addresses = [request.receiver_address, *request.mirror_addresses]
        assert len(addresses) == 2, "the KV must go to both ranks"
        senders = [KVSender.connect(address, layout) for address in addresses]
        try:
            transfer = open_mirrored(senders, request.request_id, request.capability)
            rows = torch.zeros(transfer.transfers[0].num_tokens, layout.latent_dim)
            transfer.send_layer(0, rows, torch.zeros(rows.shape[0], layout.index_dim))
            transfer.abort("the prefill worker gave up")
            raise RuntimeError("prefill failed midway")
        finally:
            for sender in senders:
                sender.close()

    return prefill


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_failed_prefill_recomputes_or_fails_on_every_rank(tp2, prefill_worker, reference, policy):
    decode = _decode_worker(tp2, _prefill_that_gives_up(prefill_worker), on_failure=policy)

    async def run() -> list[int] | RemotePrefillFailed:
        try:
            result = await generate_tokens(decode, f"failing-{policy}", FAILING[policy], GREEDY)
        except RemotePrefillFailed as e:
            result = e
        assert await decode.wait_idle()
        return result

    try:
        result = asyncio.run(asyncio.wait_for(run(), timeout=120))
        assert decode.receiver.stats.transfers_failed == 1
    finally:
        decode.shutdown()
    if policy == "recompute":
        assert result == reference["recompute"] and decode.local_fallbacks == 1
    else:
        assert isinstance(result, RemotePrefillFailed) and "did not arrive" in str(result)
    assert_ranks_agree_and_idle(tp2)


def test_serve_app_with_a_prefill_replica_and_a_tp2_decode_replica(cluster, reference):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServingConfig(
        engine=EngineArgs(**ENGINE, tensor_parallel_size=2),
        prefill=RoleConfig(replicas=1),
        local_prefill_threshold=THRESHOLD,
    )
    serve.run(build_app(config), name="disagg_tp2", route_prefix="/disagg_tp2")
    try:
        tokenizer = Tokenizer.from_pretrained(default_checkpoint())
        for i, prompt in enumerate(PROMPTS):
            want = reference[i]
            body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "logprobs": 1}
            r = httpx.post(f"http://127.0.0.1:{port}/disagg_tp2/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == len(want)
            tokens = r.json()["choices"][0]["logprobs"]["tokens"]
            assert tokens == [tokenizer.decode([t]) for t in want]
        handle = serve.get_app_handle("disagg_tp2")
        assert handle.wait_idle.remote().result()
        assert handle.record_routing_stats.remote().result()["kv_transfer_bytes"] > 0
    finally:
        serve.delete("disagg_tp2")

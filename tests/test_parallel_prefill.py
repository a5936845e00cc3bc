"""A tensor-parallel prefill replica (CPU, gloo, tcp, one local Ray for the module): two `PrefillRank` actors run
every prefill step in lockstep and rank 0 sends the KV. Fed to a single-process decode worker and to a TP=2 decode
replica, greedy output equals the single-process engine's for prompts above the local-prefill threshold, and no rank
of either side holds a block afterwards. A prefill rank killed mid-prefill ends the prefill with a clear error, and
the decode side recomputes the prompt, without a hang. A Serve app with a TP=2 prefill replica (`prefill_engine`)
answers over HTTP with the single-process output."""

import argparse
import asyncio

import httpx
import pytest
import ray
from engine_fixtures import generate_tokens, random_prompts
from ray import serve
from ray_fixtures import assert_ranks_agree_and_idle, local_ray
from server_process import free_port

from glmserve import LLM
from glmserve.cluster.app import build_app
from glmserve.cluster.parallel_engine import ParallelEngine
from glmserve.cluster.prefill_ranks import ParallelPrefillWorker
from glmserve.cluster.serve_command import add_serve_args, config_from_args
from glmserve.cluster.serving_config import PrefillEngine, RoleConfig, ServingConfig
from glmserve.decode.server import DecodeWorker
from glmserve.engine.async_engine import EngineDeadError
from glmserve.engine.engine_args import EngineArgs
from glmserve.engine.sampling_params import SamplingParams
from glmserve.model.default_checkpoint import default_checkpoint
from glmserve.model.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

ENGINE = {"num_speculative_tokens": 2, "adaptive_speculation": False}  # the MTP layer's KV travels too
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
THRESHOLD = 64
PROMPTS = random_prompts([150, 300], 8000, seed=7)  # above the threshold (300: past index_topk, sparse)
KILLED = random_prompts([200], 8000, seed=8)[0]


@pytest.fixture(scope="module")
def cluster():
    yield from local_ray()


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    outputs = LLM(**ENGINE).generate([{"prompt_token_ids": p} for p in [*PROMPTS, KILLED]], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def prefill_tp2(cluster):
    worker = ParallelPrefillWorker(EngineArgs(**ENGINE, tensor_parallel_size=2))
    yield worker
    worker.shutdown()


def _generate(decode: DecodeWorker, prompts: list[list[int]], tag: str) -> list[list[int]]:
    async def run() -> list[list[int]]:
        got = [await generate_tokens(decode, f"{tag}{i}", p, GREEDY) for i, p in enumerate(prompts)]
        assert await decode.wait_idle()
        return got

    try:
        return asyncio.run(asyncio.wait_for(run(), timeout=120))
    finally:
        decode.shutdown()


def test_tp2_prefill_to_one_process_decode_equals_one_process(prefill_tp2, reference):
    decode = DecodeWorker(EngineArgs(**ENGINE), prefill=prefill_tp2.prefill, local_prefill_threshold=THRESHOLD)
    assert _generate(decode, PROMPTS, "one") == reference[: len(PROMPTS)]
    assert decode.remote_prefills == 2 and decode.local_fallbacks == 0
    assert decode.receiver.stats.transfers_completed == 2
    assert decode.engine.idle
    assert_ranks_agree_and_idle(prefill_tp2.engine)  # the blocks held for the transfers are free on every rank
    assert prefill_tp2.stats()["kv_transfer_bytes"] > 0


def test_tp2_prefill_to_tp2_decode_equals_one_process(prefill_tp2, reference):
    engine = ParallelEngine(EngineArgs(**ENGINE, tensor_parallel_size=2))
    try:
        decode = DecodeWorker(
            EngineArgs(**ENGINE, tensor_parallel_size=2),
            prefill=prefill_tp2.prefill,
            local_prefill_threshold=THRESHOLD,
            engine=engine,
            receiver=engine.open_receivers("127.0.0.1"),
        )
        assert _generate(decode, PROMPTS, "two") == reference[: len(PROMPTS)]
        assert decode.remote_prefills == 2 and decode.local_fallbacks == 0
        assert_ranks_agree_and_idle(engine)
    finally:
        engine.shutdown()
    assert_ranks_agree_and_idle(prefill_tp2.engine)


def test_killed_prefill_rank_fails_the_prefill_and_decode_recomputes(cluster, reference):
    worker = ParallelPrefillWorker(EngineArgs(**ENGINE, tensor_parallel_size=2), timeout_s=60)
    errors: list[BaseException] = []

    async def prefill_losing_a_rank(request):
        task = asyncio.ensure_future(worker.prefill(request))
        await asyncio.sleep(0)  # the prefill has started
        ray.kill(worker.engine.group.ranks[1])
        try:
            return await task
        except BaseException as e:
            errors.append(e)
            raise

    decode = DecodeWorker(EngineArgs(**ENGINE), prefill=prefill_losing_a_rank, local_prefill_threshold=THRESHOLD)
    try:
        assert _generate(decode, [KILLED], "killed") == reference[len(PROMPTS) :]
    finally:
        worker.shutdown()
    assert decode.local_fallbacks == 1 and decode.engine.idle
    assert len(errors) == 1 and "rank 1 failed" in str(errors[0]), errors
    with pytest.raises(EngineDeadError):
        worker.async_engine.check_alive()


def test_prefill_split_is_its_own_and_one_process_by_default():
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    config = config_from_args(parser.parse_args(["--tensor-parallel-size", "2", "--prefill-replicas", "1"]))
    assert config.prefill_engine_args.tensor_parallel_size == 1 and config.engine.tensor_parallel_size == 2
    flags = ["--prefill-tensor-parallel-size", "2", "--prefill-expert-parallel-size", "2"]
    split = config_from_args(parser.parse_args(flags)).prefill_engine_args
    assert (split.tensor_parallel_size, split.expert_parallel_size) == (2, 2)


def test_serve_app_with_a_tp2_prefill_replica(cluster, reference):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServingConfig(
        engine=EngineArgs(**ENGINE),
        prefill=RoleConfig(replicas=1),
        prefill_engine=PrefillEngine(tensor_parallel_size=2),
        local_prefill_threshold=THRESHOLD,
    )
    serve.run(build_app(config), name="prefill_tp2", route_prefix="/prefill_tp2")
    try:
        tokenizer = Tokenizer.from_pretrained(default_checkpoint())
        body = {"prompt": PROMPTS[0], "max_tokens": GREEDY.max_tokens, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"http://127.0.0.1:{port}/prefill_tp2/v1/completions", json={**body, "logprobs": 1}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in reference[0]]
        handle = serve.get_app_handle("prefill_tp2")
        assert handle.wait_idle.remote().result()
        assert handle.record_routing_stats.remote().result()["kv_transfer_bytes"] > 0
    finally:
        serve.delete("prefill_tp2")

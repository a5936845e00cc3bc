"""A decode replica over tensor/expert-parallel rank actors (CPU, gloo, one local Ray for the module): the lockstep
driver generates what one process does, every rank produces the same outputs (unseeded sampling included), no
rank keeps blocks after requests finish or abort, a dead rank fails pending and new requests instead of hanging
them, and a Serve app with a TP=2 DecodeServer answers the official openai client."""

import argparse
import asyncio

import openai
import pytest
import ray
from engine_fixtures import random_prompts
from ray import serve
from ray_fixtures import assert_ranks_agree_and_idle, local_ray
from server_process import free_port

from glmserve.api.errors import ServiceUnavailableError
from glmserve.api.openai_server import OpenAIServer
from glmserve.cluster.app import build_app
from glmserve.cluster.parallel_engine import ParallelEngine
from glmserve.cluster.serve_command import add_serve_args, config_from_args
from glmserve.cluster.serving_config import RoleConfig, ServingConfig
from glmserve.decode.server import DecodeWorker
from glmserve.engine.async_engine import EngineDeadError
from glmserve.engine.engine_args import EngineArgs
from glmserve.engine.llm_engine import LLMEngine
from glmserve.engine.request import EngineRequest
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.validation import InvalidRequest
from glmserve.model.default_checkpoint import default_checkpoint
from glmserve.model.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

ENGINE = {"num_speculative_tokens": 2, "adaptive_speculation": False}  # MTP drafting runs its own collectives
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True)
UNSEEDED = SamplingParams(temperature=1.0, n=2, max_tokens=12, ignore_eos=True)
PROMPTS = random_prompts([5, 70, 150], 8000, seed=12)  # 150 > index_topk: sparse attention on every rank
REPRODUCIBLE = {"greedy0": (PROMPTS[0], GREEDY), "seeded1": (PROMPTS[1], SEEDED), "greedy2": (PROMPTS[2], GREEDY)}


def _generate(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[tuple]]:
    """Run requests to completion on an LLMEngine or a ParallelEngine: {id: [(token ids, text) per output]}."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done = {}
    while len(done) < len(requests):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [(o.token_ids, o.text) for o in out.outputs]
    return done


@pytest.fixture(scope="module")
def cluster():
    yield from local_ray()


@pytest.fixture(scope="module")
def reference() -> dict[str, list[tuple]]:
    return _generate(LLMEngine(EngineArgs(**ENGINE)), REPRODUCIBLE)


@pytest.fixture(
    scope="module",
    params=[{"tensor_parallel_size": 2}, {"tensor_parallel_size": 2, "expert_parallel_size": 2}],
    ids=["tp2", "tp2_ep2"],
)
def parallel_engine(cluster, request):
    engine = ParallelEngine(EngineArgs(**ENGINE, **request.param))
    yield engine
    engine.shutdown()


def test_lockstep_replica_generates_what_one_process_does(parallel_engine, reference):
    got = _generate(parallel_engine, REPRODUCIBLE | {"unseeded": (PROMPTS[1], UNSEEDED)})
    assert {rid: got[rid] for rid in REPRODUCIBLE} == reference
    # unseeded requests carry the driver's seed to every rank: both samples came out the same everywhere
    assert [len(tokens) for tokens, _ in got["unseeded"]] == [12, 12]
    assert_ranks_agree_and_idle(parallel_engine)


def test_abort_frees_blocks_on_every_rank(parallel_engine):
    long = SamplingParams(temperature=0.7, max_tokens=500, ignore_eos=True)
    parallel_engine.add_request("running", PROMPTS[2], long)
    for _ in range(3):
        parallel_engine.step()
    parallel_engine.add_request("queued", PROMPTS[1], long)
    with pytest.raises(InvalidRequest, match="already running"):
        parallel_engine.add_request("running", PROMPTS[0], long)
    with pytest.raises(InvalidRequest, match="prompt token ids"):
        parallel_engine.add_request("bad", [10**6], long)
    parallel_engine.abort("running")
    parallel_engine.abort("queued")  # aborted in the same step that adds it
    while parallel_engine.has_work:
        parallel_engine.step()
    assert parallel_engine.idle and parallel_engine.stats()["num_requests_running"] == 0
    assert_ranks_agree_and_idle(parallel_engine)


def test_dead_rank_fails_pending_and_new_requests(cluster):
    args = EngineArgs(tensor_parallel_size=2)
    engine = ParallelEngine(args, timeout_s=60)
    worker = DecodeWorker(args, engine=engine)

    async def scenario() -> None:
        params = SamplingParams(max_tokens=10_000, ignore_eos=True)
        stream = worker.generate(EngineRequest(request_id="pending", prompt_token_ids=PROMPTS[0], params=params))
        await anext(stream)
        ray.kill(engine.group.ranks[1])
        with pytest.raises(EngineDeadError, match="rank 1 failed"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError, match="rank 1 failed"):
            await anext(worker.generate(EngineRequest(request_id="new", prompt_token_ids=PROMPTS[0], params=params)))
        with pytest.raises(EngineDeadError):
            worker.async_engine.check_alive()

    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    finally:
        worker.shutdown()
        engine.shutdown()


def test_serve_flags_reach_the_engine():
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(["--tensor-parallel-size", "2", "--expert-parallel-size", "2", "--prefill-replicas", "0"])
    config = config_from_args(args)
    assert (config.engine.tensor_parallel_size, config.engine.expert_parallel_size) == (2, 2)
    disaggregated = config_from_args(parser.parse_args(["--tensor-parallel-size", "2", "--prefill-replicas", "1"]))
    assert disaggregated.has_prefill and disaggregated.engine.tensor_parallel_size == 2


def test_a_dead_engine_is_a_503_for_clients():
    class DeadWorker:
        async def generate(self, request: EngineRequest):
            raise EngineDeadError("engine loop died: RankFailed('rank 1 failed in step')")
            yield

    tokenizer = Tokenizer.from_pretrained(default_checkpoint())
    server = OpenAIServer(DeadWorker(), tokenizer, "glm5-tiny", max_model_len=512)
    with pytest.raises(ServiceUnavailableError, match="rank 1 failed"):
        asyncio.run(server.completions(b'{"prompt": "x", "max_tokens": 2}'))


@pytest.fixture(scope="module")
def tp2_app(cluster):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServingConfig(engine=EngineArgs(**ENGINE, tensor_parallel_size=2), prefill=RoleConfig(replicas=0))
    serve.run(build_app(config), name="tp2", route_prefix="/tp2")
    yield f"http://127.0.0.1:{port}/tp2"
    serve.delete("tp2")


def test_openai_client_against_a_tp2_decode_server(tp2_app, reference):
    client = openai.OpenAI(base_url=f"{tp2_app}/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.completions.create(
        model="glm5-tiny", prompt=PROMPTS[2], max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == reference["greedy2"][0][1]
    assert r.usage.completion_tokens == 12
    seeded = {"model": "glm5-tiny", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0.8, "top_p": 0.9}
    streamed = client.completions.create(**seeded, seed=3, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reference["seeded1"][0][1]
    chat = client.chat.completions.create(
        model="glm5-tiny", messages=[{"role": "user", "content": "Write a sort"}], max_tokens=8
    )
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert serve.get_app_handle("tp2").wait_idle.remote().result()

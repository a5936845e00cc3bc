"""The engine's greedy output equals repeated full forwards of the reference model, in every scheduling
situation, and every block returns to the pool afterwards."""

import pytest
from engine_fixtures import GreedyReference, make_engine_checkpoint, random_prompts

from glmserve import LLM, SamplingParams
from glmserve.engine.validation import InvalidRequest

NEW_TOKENS = 12
LENGTHS = [1, 5, 16, 17, 40, 63, 64, 65, 150]  # index_topk is 16: dense, boundary and sparse contexts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_engine_checkpoint(tmp_path_factory.mktemp("engine"), index_topk=16)


@pytest.fixture(scope="module")
def prompts():
    shared = random_prompts([130], 160, seed=9)[0]
    tails = random_prompts([3, 70], 160, seed=10)
    return random_prompts(LENGTHS, 160) + [shared + tails[0], shared + tails[1]]


@pytest.fixture(scope="module")
def expected(checkpoint, prompts):
    ref = GreedyReference(checkpoint)
    return [ref.continue_(p, NEW_TOKENS) for p in prompts]


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)


def _assert_no_leaks(llm: LLM) -> None:
    blocks = llm.engine.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks, "blocks still allocated after all requests ended"
    assert not llm.engine.scheduler.has_work


def _check(outputs, expected):
    for out, (tokens, logprobs) in zip(outputs, expected, strict=True):
        got = out.outputs[0]
        assert got.token_ids == tokens
        assert got.finish_reason == "length"
        for entry, token, lp in zip(got.logprobs, tokens, logprobs, strict=True):
            assert abs(entry[token].logprob - lp) <= 1e-4


@pytest.mark.parametrize(
    "engine_args",
    [
        pytest.param(dict(max_num_seqs=1), id="one_at_a_time"),
        pytest.param(dict(max_num_seqs=64), id="all_at_once"),
        pytest.param(dict(max_num_batched_tokens=24), id="chunk_budget_below_prompt"),
        pytest.param(dict(num_gpu_blocks_override=5, max_num_batched_tokens=96), id="preemption_tiny_budget"),
        pytest.param(dict(enable_prefix_caching=False), id="no_prefix_cache"),
    ],
)
def test_greedy_equals_reference(checkpoint, prompts, expected, engine_args):
    llm = LLM(str(checkpoint), **engine_args)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    _check(outputs, expected)
    if "num_gpu_blocks_override" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0, "the tiny budget should force preemption"
    _assert_no_leaks(llm)


def test_prefix_cache_hits_are_exact_and_reported(checkpoint, prompts, expected):
    llm = LLM(str(checkpoint))
    first = llm.generate([{"prompt_token_ids": prompts[-2]}], GREEDY, use_tqdm=False)[0]
    second = llm.generate([{"prompt_token_ids": prompts[-1]}], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 128  # two full 64-token blocks of the 130-token shared prefix
    again = llm.generate([{"prompt_token_ids": prompts[-1]}], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 192  # now the first three blocks of the whole prompt
    _check([first, second, again], [expected[-2], expected[-1], expected[-1]])
    _assert_no_leaks(llm)


def test_abort_midway(checkpoint, prompts, expected):
    llm = LLM(str(checkpoint), max_num_batched_tokens=32)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    finished = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        steps += 1
        if steps == 3:
            engine.abort("4")  # mid-prefill (chunked)
        if steps == 6:
            engine.abort("0")  # mid-decode
    assert "4" not in finished and "0" not in finished
    kept = [i for i in range(len(prompts)) if i not in (0, 4)]
    _check([finished[str(i)] for i in kept], [expected[i] for i in kept])
    _assert_no_leaks(llm)


def test_streaming_deltas_add_up(checkpoint, prompts, expected):
    llm = LLM(str(checkpoint))
    got: dict[str, list[int]] = {}
    for out in llm.generate_stream([{"prompt_token_ids": p} for p in prompts[:4]], GREEDY):
        for d in out.deltas:
            got.setdefault(out.request_id, []).extend(d.token_ids)
    assert [got[k] for k in sorted(got, key=int)] == [e[0] for e in expected[:4]]


def test_seeded_sampling_reproducible_across_batches(checkpoint, prompts):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=1234, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    alone = LLM(str(checkpoint)).generate([{"prompt_token_ids": prompts[3]}], seeded, use_tqdm=False)
    mixed = LLM(str(checkpoint), max_num_batched_tokens=40).generate(
        [{"prompt_token_ids": p} for p in prompts[:6]], [other, other, other, seeded, other, other], use_tqdm=False
    )
    assert alone[0].outputs[0].token_ids == mixed[3].outputs[0].token_ids


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ([], SamplingParams(), "prompt"),
        (list(range(5000)), SamplingParams(), "prompt"),
        ([1, 2, 3], SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
        ([1, 999], SamplingParams(), "prompt"),
    ],
)
def test_bad_input_is_refused_and_engine_keeps_serving(checkpoint, prompts, expected, prompt, params, field):
    llm = LLM(str(checkpoint), max_model_len=1024)
    llm.engine.add_request("ok", prompts[2], GREEDY)
    with pytest.raises(InvalidRequest) as err:
        llm.engine.add_request("bad", prompt, params)
    assert err.value.param == field
    out = None
    while llm.engine.has_unfinished_requests():
        out = next((o for o in llm.engine.step() if o.finished), out)
    assert out.outputs[0].token_ids == expected[2][0]
    _assert_no_leaks(llm)


def test_max_tokens_must_be_positive():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)

"""MTP speculative decoding is lossless: greedy output with K drafts equals greedy output without, across batch
compositions; verification preserves the target distribution."""

import pytest
import torch
from engine_fixtures import random_prompts
from scripted_model import make_scripted_checkpoint

from glmserve import LLM, SamplingParams
from glmserve.engine.sampler import draw
from glmserve.engine.spec.graphs import SpecDecodeGraphs
from glmserve.engine.spec.verify import verify_drafts
from glmserve.model.cuda_graphs import DecodeGraphs

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [
        o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ]


def _no_leaks(llm: LLM) -> None:
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.fixture(scope="module")
def prompts():
    return random_prompts([3, 30, 64, 129, 200], 8000, seed=4)


@pytest.fixture(scope="module")
def baseline(prompts):
    return _tokens(LLM(), prompts)  # the embedded glm5-tiny (it has an MTP layer)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_with_mtp_equals_without(prompts, baseline, k):
    llm = LLM(num_speculative_tokens=k)
    assert _tokens(llm, prompts) == baseline
    _no_leaks(llm)
    assert llm.engine.spec.policy.drafted[0] > 0, "speculation never ran"


def test_mixed_batches_and_request_caps(prompts, baseline):
    llm = LLM(num_speculative_tokens=3, max_num_batched_tokens=48)
    params = [GREEDY.model_copy(update={"num_speculative_tokens": c}) for c in (0, 1, 3, None, 2)]
    assert _tokens(llm, prompts, params) == baseline
    _no_leaks(llm)


def test_accepted_drafts_stop_exactly(tmp_path_factory):
    """On a scripted model the MTP drafts are always right: several tokens land per step, and the stop token and
    max_tokens still end the output exactly where they would without speculation."""
    path = make_scripted_checkpoint(tmp_path_factory.mktemp("scripted"))
    plain, spec = LLM(str(path)), LLM(str(path), num_speculative_tokens=4)
    prompt = "[gMASK]<sop><|user|>hi<|assistant|><think>"
    for params in (
        SamplingParams(temperature=0, max_tokens=64),
        SamplingParams(temperature=0, max_tokens=7),
        SamplingParams(temperature=0, max_tokens=64, stop=["tool."]),
    ):
        a = plain.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        b = spec.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
    seqs_stats = spec.engine.spec.policy
    assert seqs_stats.accepted[0] > 0 and seqs_stats.accepted[3] > 0, "drafts should be accepted several at once"
    _no_leaks(spec)


@pytest.mark.slow
def test_verification_preserves_the_target_distribution():
    """Chi-square: tokens emitted by verify_drafts follow the target distribution, first and second position."""
    gen = torch.Generator().manual_seed(0)
    vocab, n = 5, 20000
    target = torch.softmax(torch.randn(3, vocab, generator=gen) * 1.5, -1)
    draft = torch.softmax(torch.randn(2, vocab, generator=gen) * 1.5, -1)
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)
    seconds = 0
    for _ in range(n):
        drafts = [int(draw(draft[0], gen)), int(draw(draft[1], gen))]
        out = verify_drafts(target, drafts, draft, gen, greedy=False)
        first[out[0]] += 1
        if len(out) > 1:  # position 2 is only emitted when draft 1 was accepted; then it follows target[1]
            second[out[1]] += 1
            seconds += 1
    for counts, p, total in ((first, target[0], n), (second, target[1], seconds)):
        expected = p * total
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 18.5, f"chi-square {chi2:.1f} with 4 degrees of freedom (p < 0.001)"


@pytest.mark.slow
def test_drafting_beside_prefill_chunks_with_shared_topk():
    """Sequences drafting (context beyond index_topk, so the MTP passes reuse top-k picks) in the same steps as
    other sequences' prefill chunks: picks must follow their own sequences."""
    prompts = random_prompts([300, 20, 330, 150, 140, 260, 90, 400], 8000, seed=8)
    want = _tokens(LLM(), prompts)
    llm = LLM(num_speculative_tokens=4, adaptive_speculation=False, max_num_batched_tokens=160)
    assert llm.engine.spec.drafter.share_topk
    assert _tokens(llm, prompts) == want
    _no_leaks(llm)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.slow
def test_speculative_step_graphs_equal_plain_decoding(prompts, baseline, k):
    """The whole-step path CUDA graphs capture (verify, accept, catch-up and drafts on the device), run eagerly on
    its static inputs: the same tokens as plain decoding, with contexts crossing index_topk (dense then sparse
    buckets), per-request draft caps (uneven draft counts in one step) and a request with a penalty in the batch
    (which takes the eager path for its steps)."""
    llm = LLM(num_speculative_tokens=k, adaptive_speculation=False, max_num_seqs=8)
    engine = llm.engine
    engine.runner.graphs = DecodeGraphs(engine.runner, 8, capture=False)
    engine.spec.graphs = SpecDecodeGraphs(engine.runner, engine.spec.drafter, 8, k, capture=False)
    topk = engine.config.index_topk
    assert _tokens(llm, prompts[:3], GREEDY) == baseline[:3]  # contexts <= index_topk: dense buckets
    assert {key[3] for key in engine.spec.graphs.graphs} == {topk}
    assert _tokens(llm, prompts) == baseline
    assert max(key[3] for key in engine.spec.graphs.graphs) > topk, "no sparse bucket"
    assert engine.spec.policy.accepted[0] > 0
    _no_leaks(llm)
    capped = [GREEDY.model_copy(update={"num_speculative_tokens": c}) for c in (0, 1, None, 2, 0)]
    assert _tokens(llm, prompts, capped) == baseline  # sequences with fewer drafts ride along padded
    _no_leaks(llm)
    # prompt chunks beside decoding sequences (a 48-token budget): drafting waits for the next pure decode step
    chunked = LLM(num_speculative_tokens=k, adaptive_speculation=False, max_num_seqs=8, max_num_batched_tokens=48)
    chunked.engine.runner.graphs = DecodeGraphs(chunked.engine.runner, 8, capture=False)
    chunked.engine.spec.graphs = SpecDecodeGraphs(
        chunked.engine.runner, chunked.engine.spec.drafter, 8, k, capture=False
    )
    assert _tokens(chunked, prompts) == baseline
    _no_leaks(chunked)
    # min_tokens masks stop tokens: a step whose outputs are still short of it takes the eager path, counting outputs
    # without the drafts under verification. The stop tokens are what the model emits just before min_tokens.
    plain = LLM()
    for min_tokens in (10, 14):
        for prompt, base in zip(prompts, baseline, strict=True):
            stops = sorted(set(base[min_tokens - 4 : min_tokens]) - set(base[: min_tokens - 4]))
            params = GREEDY.model_copy(update={"stop_token_ids": stops, "min_tokens": min_tokens})
            assert _tokens(llm, [prompt], params) == _tokens(plain, [prompt], params)
    _no_leaks(llm)
    penalized = GREEDY.model_copy(update={"repetition_penalty": 1.3})
    want = _tokens(LLM(), prompts[:2], [GREEDY, penalized])
    assert _tokens(llm, prompts[:2], [GREEDY, penalized]) == want
    _no_leaks(llm)


def test_policy_times_decode_steps_only(prompts):
    """A step that ends every prompt has every sequence ready, as a decode step does, but its time is a prefill's:
    it must not be taken for the cost of speculating."""
    llm = LLM(num_speculative_tokens=3)
    _tokens(llm, prompts, GREEDY.model_copy(update={"max_tokens": 1}))
    assert not llm.engine.spec.policy.samples
    _tokens(llm, prompts[:2], GREEDY)
    assert llm.engine.spec.policy.samples


@pytest.mark.parametrize("step_graphs", [False, True], ids=["eager", "step_graphs"])
@pytest.mark.slow
def test_drafts_stop_at_max_model_len(step_graphs):
    """Near the end of the context drafts must not reach past max_model_len: at the model's full context their
    blocks would lie beyond the runner's block tables."""
    prompt = random_prompts([4086], 8000, seed=9)  # glm5-tiny's context is 4096
    params = GREEDY.model_copy(update={"max_tokens": 100})
    want = _tokens(LLM(), prompt, params)
    llm = LLM(num_speculative_tokens=4, adaptive_speculation=False)
    if step_graphs:
        engine = llm.engine
        engine.runner.graphs = DecodeGraphs(engine.runner, 8, capture=False)
        engine.spec.graphs = SpecDecodeGraphs(engine.runner, engine.spec.drafter, 8, 4, capture=False)
    got = _tokens(llm, prompt, params)
    assert got == want and len(got[0]) == 10
    _no_leaks(llm)

"""Sampling parameters, the batched sampler and the stop checker, each against a straightforward per-row reference."""

import math
import random

import pytest
import torch
from pydantic import ValidationError

from glmserve.engine.detokenizer import IncrementalDetokenizer
from glmserve.engine.sampler import Sampler, SamplingBatch, draw, draw_skip
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.stop_checker import StopChecker
from glmserve.model.default_checkpoint import PACKAGED
from glmserve.model.tokenizer import Tokenizer

VOCAB = 64
EOS = (3, 5)
NEG_INF = float("-inf")
sampler = Sampler()


def make_batch(params, prompts=None, outputs=None, generators=None, eos=EOS) -> SamplingBatch:
    n = len(params)
    shared = torch.Generator().manual_seed(0)
    return SamplingBatch(
        params=list(params),
        prompt_token_ids=prompts if prompts is not None else [[] for _ in range(n)],
        output_token_ids=outputs if outputs is not None else [[] for _ in range(n)],
        generators=generators if generators is not None else [shared] * n,
        eos_token_ids=eos,
    )


# ---- a per-row reference, written the plain way ----


def ref_processed(row: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int], eos) -> torch.Tensor:
    row = row.double().clone()
    if len(output) < p.min_tokens:
        for t in list(() if p.ignore_eos else eos) + p.stop_token_ids:
            row[t] = NEG_INF
    for t in set(prompt) | set(output):
        if p.repetition_penalty != 1.0:
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    if p.is_greedy:
        return row
    row = row / p.temperature
    if p.min_p > 0:
        probs = row.softmax(-1)
        for t in range(len(row)):
            if probs[t] < p.min_p * probs.max():
                row[t] = NEG_INF
    if p.top_k > 0:
        kth = sorted(row.tolist(), reverse=True)[p.top_k - 1]
        row[row < kth] = NEG_INF
    if p.top_p < 1:
        probs = row.softmax(-1)
        mass = 0.0
        for t in sorted(range(len(row)), key=lambda t: -probs[t].item()):
            if mass >= p.top_p:
                row[t] = NEG_INF
            mass += probs[t].item()
    return row


def random_tokens(gen: random.Random, n: int) -> list[int]:
    return [gen.randrange(VOCAB) for _ in range(n)]


MIXED = [
    SamplingParams(),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(min_p=0.1, top_p=0.9, top_k=20),
    SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
    SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5, temperature=0.5, min_p=0.05),
    SamplingParams(temperature=0, repetition_penalty=1.5),
    SamplingParams(top_k=1, temperature=2.0),
    SamplingParams(min_tokens=4, stop_token_ids=[7, 9], presence_penalty=-1.0),
    SamplingParams(min_tokens=4, ignore_eos=True, stop_token_ids=[11], top_k=-1),
]


def mixed_batch(seed: int):
    gen = random.Random(seed)
    prompts = [random_tokens(gen, gen.randrange(0, 30)) for _ in MIXED]
    outputs = [random_tokens(gen, gen.randrange(0, 8)) for _ in MIXED]
    logits = torch.randn(len(MIXED), VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    return logits, make_batch(MIXED, prompts, outputs)


# ---- SamplingParams ----


def test_params_defaults_follow_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0, 0, 1.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == (None, [], [], False)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.num_speculative_tokens) == (16, 0, None, None)
    assert p.skip_special_tokens and not p.include_stop_str_in_output
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=None, stop_token_ids=None).stop_token_ids == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"min_tokens": 17}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [4, -1]}, "stop_token_ids"),
        ({"num_speculative_tokens": -1}, "num_speculative_tokens"),
        ({"n": 0}, "n"),
        ({"best_of": 2}, "best_of"),
    ],
)
def test_params_errors_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as info:
        SamplingParams(**kwargs)
    assert info.value.errors()[0]["loc"] == (field,)


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(top_k=1).is_greedy
    assert not SamplingParams(temperature=0.01, top_k=2).is_greedy


# ---- processors ----


@pytest.mark.parametrize("seed", range(5))
def test_processed_logits_match_per_row_reference(seed):
    logits, batch = mixed_batch(seed)
    got = sampler.processed_logits(logits, batch)
    for i, p in enumerate(batch.params):
        want = ref_processed(logits[i], p, batch.prompt_token_ids[i], batch.output_token_ids[i], EOS).float()
        if p.is_greedy:  # only the argmax matters
            assert got[i].argmax() == want.argmax()
            continue
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), f"row {i}: different tokens masked"
        finite = ~torch.isinf(want)
        torch.testing.assert_close(got[i][finite], want[finite], rtol=1e-5, atol=1e-5)


def test_penalties_accept_tensors_and_count_repeats():
    p = SamplingParams(frequency_penalty=1.0, repetition_penalty=2.0)
    logits = torch.full((1, VOCAB), 2.0)
    as_lists = sampler.processed_logits(logits, make_batch([p], [[1, 2]], [[2, 2, 2, 4]]))
    as_tensors = sampler.processed_logits(logits, make_batch([p], [torch.tensor([1, 2])], [torch.tensor([2, 2, 2, 4])]))
    assert torch.equal(as_lists, as_tensors)
    assert as_lists[0, 1].item() == 1.0  # prompt only: repetition, no frequency
    assert as_lists[0, 2].item() == 1.0 - 3.0  # both, and counted three times
    assert as_lists[0, 4].item() == 1.0 - 1.0
    assert as_lists[0, 0].item() == 2.0


def test_masks_keep_the_right_sets():
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB) * 2
    params = [SamplingParams(top_k=7), SamplingParams(top_p=0.6), SamplingParams(min_p=0.2)]
    kept = ~torch.isinf(sampler.processed_logits(logits, make_batch(params)))
    # top_k: exactly the 7 largest
    assert set(kept[0].nonzero().flatten().tolist()) == set(logits[0].topk(7).indices.tolist())
    # top_p: the most likely tokens, reaching 0.6 only with the least likely of them
    probs = logits[1].softmax(-1)
    kept_probs = probs[kept[1]]
    assert kept_probs.min() >= probs[~kept[1]].max()
    assert kept_probs.sum() >= 0.6 > kept_probs.sum() - kept_probs.min()
    # min_p: exactly the tokens with p >= 0.2 * p_max
    probs = logits[2].softmax(-1)
    assert torch.equal(kept[2], probs >= 0.2 * probs.max())


def test_min_tokens_masks_stop_ids_until_reached():
    params = [
        SamplingParams(min_tokens=3, stop_token_ids=[8]),
        SamplingParams(min_tokens=3, stop_token_ids=[8]),
        SamplingParams(min_tokens=3, stop_token_ids=[8], ignore_eos=True),
    ]
    logits = torch.zeros(3, VOCAB)
    batch = make_batch(params, outputs=[[1, 2], [1, 2, 4], [1]])
    masked = torch.isinf(sampler.processed_logits(logits, batch))
    assert masked[0].nonzero().flatten().tolist() == [3, 5, 8]
    assert not masked[1].any()  # three outputs exist: stopping is allowed again
    assert masked[2].nonzero().flatten().tolist() == [8]  # ignore_eos: eos never stops, no need to mask it
    # and the sampler never picks them, even when they are by far the most likely
    logits[:, [3, 5, 8]] = 50.0
    for _ in range(20):
        assert sampler.sample(logits, batch)[0].item() not in (3, 5, 8)


# ---- sampling ----


def test_greedy_is_exact_argmax_and_draws_nothing():
    logits, batch = mixed_batch(7)
    batch.params = [SamplingParams(temperature=0)] * 5 + [SamplingParams(top_k=1, temperature=3.0)] * 5
    generator = batch.generators[0]
    state = generator.get_state()
    assert torch.equal(sampler.sample(logits, batch), logits.argmax(-1))
    assert torch.equal(generator.get_state(), state)
    probs = sampler.probs(logits, batch)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float())


def test_probs_are_the_softmax_of_processed_logits():
    logits, batch = mixed_batch(3)
    probs = sampler.probs(logits, batch)
    processed = sampler.processed_logits(logits, batch)
    for i, p in enumerate(batch.params):
        if p.is_greedy:
            assert probs[i].max() == 1.0 and probs[i].argmax() == processed[i].argmax()
        else:
            torch.testing.assert_close(probs[i], processed[i].softmax(-1))


def run_request(order: list[str], steps: int) -> dict[str, list[int]]:
    """Several requests decoded together for `steps` steps; each row's logits depend only on its own history."""
    params = {
        "seeded_a": SamplingParams(seed=11, top_p=0.9),
        "seeded_b": SamplingParams(seed=12, temperature=0.8, repetition_penalty=1.2),
        "unseeded": SamplingParams(top_k=10),
        "greedy": SamplingParams(temperature=0),
        "other": SamplingParams(min_p=0.05, presence_penalty=0.5),
    }
    names = sorted(params)
    default = torch.Generator().manual_seed(99)
    own = {name: torch.Generator().manual_seed(p.seed) for name, p in params.items() if p.seed is not None}
    outputs: dict[str, list[int]] = {name: [] for name in order}
    for step in range(steps):
        logits = torch.stack(
            [torch.randn(VOCAB, generator=torch.Generator().manual_seed(1000 * names.index(n) + step)) for n in order]
        )
        batch = make_batch(
            [params[n] for n in order],
            prompts=[[1, 2, 3]] * len(order),
            outputs=[outputs[n] for n in order],
            generators=[own.get(n, default) for n in order],
        )
        for n, token in zip(order, sampler.sample(logits, batch).tolist(), strict=True):
            outputs[n].append(token)
    return outputs


def test_seeded_requests_reproduce_in_any_batch():
    alone_a = run_request(["seeded_a"], 12)["seeded_a"]
    alone_b = run_request(["seeded_b"], 12)["seeded_b"]
    for order in (
        ["seeded_a", "unseeded", "seeded_b", "greedy", "other"],
        ["other", "seeded_b", "greedy", "unseeded", "seeded_a"],
        ["unseeded", "seeded_a", "seeded_b"],
    ):
        got = run_request(order, 12)
        assert got["seeded_a"] == alone_a
        assert got["seeded_b"] == alone_b
    assert len(set(alone_a)) > 1  # it really sampled


def test_draw_skip_replaces_a_draw_made_elsewhere():
    probs = torch.randn(VOCAB).softmax(-1)
    here = torch.Generator().manual_seed(5)
    sampler.sample(torch.randn(1, VOCAB), make_batch([SamplingParams(seed=5)], generators=[here]))
    elsewhere = torch.Generator().manual_seed(5)
    draw_skip(elsewhere, VOCAB)
    assert all(draw(probs, here).item() == draw(probs, elsewhere).item() for _ in range(10))


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    support = probs > 0
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


# 99.9% quantiles of the chi-square distribution, by degrees of freedom
CHI2_999 = {3: 16.27, 4: 18.47, 7: 24.32}


@pytest.mark.parametrize(
    "params", [SamplingParams(), SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.8, min_p=0.05)]
)
def test_sampling_follows_the_final_distribution(params):
    """20k draws of one row from a vocabulary of 8 (one batch of identical rows sharing a generator, plus a seeded
    row drawn step by step) against the processed distribution."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.2, 1.5])
    rows = 20_000
    batch = SamplingBatch([params] * rows, [[]] * rows, [[]] * rows, [torch.Generator().manual_seed(3)] * rows)
    tokens = sampler.sample(logits.expand(rows, -1), batch)
    target = sampler.probs(logits[None], make_batch([params]))[0]
    if params.temperature == 1.0 and params.top_k == 0 and params.top_p == 1.0:
        torch.testing.assert_close(target, logits.softmax(-1))
    counts = torch.bincount(tokens, minlength=8).float()
    assert counts[target == 0].sum() == 0, "a masked token was sampled"
    assert chi_square(counts, target) < CHI2_999[int((target > 0).sum()) - 1]

    seeded = make_batch([params.model_copy(update={"seed": 4})], generators=[torch.Generator().manual_seed(4)])
    step_by_step = [sampler.sample(logits[None], seeded).item() for _ in range(2000)]
    counts = torch.bincount(torch.tensor(step_by_step), minlength=8).float()
    assert counts[target == 0].sum() == 0
    assert chi_square(counts, target) < CHI2_999[int((target > 0).sum()) - 1]


def test_logprobs_come_from_raw_logits():
    logits, batch = mixed_batch(2)
    tokens = sampler.sample(logits, batch)
    out = sampler.logprobs(logits, tokens, 4)
    for i in range(len(tokens)):
        raw = [math.log(x) for x in logits[i].double().softmax(-1).tolist()]
        token = tokens[i].item()
        assert out.logprobs[i].item() == pytest.approx(raw[token], abs=1e-5)
        assert out.ranks[i].item() == 1 + sum(x > raw[token] for x in raw)
        best = sorted(range(VOCAB), key=lambda t: -raw[t])[:4]
        assert out.top_ids[i].tolist() == best
        assert out.top_logprobs[i].tolist() == pytest.approx([raw[t] for t in best], abs=1e-5)
    assert sampler.logprobs(logits, tokens, 0).top_ids.shape == (len(tokens), 0)


# ---- stop checker ----


def checker(max_model_len=1000, prompt_len=10, **kwargs) -> StopChecker:
    return StopChecker(SamplingParams(**kwargs), list(EOS), max_model_len, prompt_len)


def feed(stop: StopChecker, deltas: list[str]) -> tuple[list[str], str | None, int]:
    """Streams one token per delta (token id 100 + i); returns the emitted pieces, the finish reason and the number
    of tokens consumed."""
    emitted = []
    for i, delta in enumerate(deltas):
        decision = stop.check(100 + i, delta)
        emitted.append(decision.text)
        assert len(stop.pending) <= max((len(s) for s in stop.params.stop), default=1) - 1
        if decision.finish_reason:
            return emitted, decision.finish_reason, i + 1
    return emitted, None, len(deltas)


def test_stop_string_split_across_deltas_is_cut_and_never_streamed():
    emitted, reason, used = feed(
        checker(stop=["</answer>"], max_tokens=50), ["The ans", "wer is 4", "2</an", "swe", "r>!"]
    )
    assert (reason, used) == ("stop", 5)
    assert "".join(emitted) == "The answer is 42"
    assert "<" not in "".join(emitted[:3])  # "2</an" arrived, but only "2" could be shown then
    assert emitted[2] == "2"

    emitted, reason, _ = feed(checker(stop=["</answer>"], include_stop_str_in_output=True), ["4", "2</an", "swer> x"])
    assert "".join(emitted) == "42</answer>" and reason == "stop"


def test_text_that_cannot_start_a_stop_string_is_not_held():
    stop = checker(stop=["STOP", "END"])
    assert stop.check(101, "abc S").text == "abc "  # "S" may begin STOP
    assert stop.check(102, "x").text == "Sx"
    assert stop.check(103, "EN").text == ""
    assert stop.flush() == "EN"


@pytest.mark.parametrize("seed", range(300))
def test_stop_strings_against_reference(seed):
    """Random texts over a small alphabet, random deltas and stop strings: the output is the text up to the first
    stop string completed (the earliest-starting one if a delta completes several)."""
    gen = random.Random(seed)
    text = "".join(gen.choice("abc") for _ in range(gen.randrange(1, 40)))
    stops = ["".join(gen.choice("abc") for _ in range(gen.randrange(1, 5))) for _ in range(gen.randrange(1, 3))]
    cuts = sorted(gen.sample(range(1, len(text)), k=min(len(text) - 1, gen.randrange(0, 10))))
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    include = gen.random() < 0.3
    stop = checker(stop=stops, include_stop_str_in_output=include, max_tokens=100)
    emitted, reason, used = feed(stop, deltas)
    seen = ""
    for i, delta in enumerate(deltas):
        seen += delta
        hits = [(seen.find(s), s) for s in stops if s in seen]
        if hits:
            at, s = min(hits)
            assert (reason, used) == ("stop", i + 1)
            assert "".join(emitted) == seen[: at + len(s) if include else at]
            return
    assert reason is None
    assert "".join(emitted) + stop.flush() == text


def test_stop_and_eos_tokens():
    stop = checker(stop_token_ids=[42])
    assert stop.check(1, "hi").text == "hi"
    decision = stop.check(42, "<stop>")
    assert (decision.finish_reason, decision.stop_reason, decision.text) == ("stop", 42, "")
    decision = checker(include_stop_str_in_output=True, stop_token_ids=[42]).check(42, "<stop>")
    assert decision.text == "<stop>"
    assert checker().check(EOS[1], "").finish_reason == "stop"
    assert checker(ignore_eos=True).check(EOS[0], "").finish_reason is None
    early = checker(min_tokens=2, stop_token_ids=[42], stop=["x"])
    assert early.check(EOS[0], "").finish_reason is None  # below min_tokens nothing stops
    assert early.check(42, "").finish_reason == "stop"


def test_length_stops_at_max_tokens_or_the_model_length():
    stop = checker(max_tokens=3, stop=["zz"])
    assert [stop.check(100 + i, "z" if i == 2 else "a").finish_reason for i in range(3)] == [None, None, "length"]
    short = checker(max_tokens=50, max_model_len=14, prompt_len=10)
    assert [short.check(100 + i, "a").finish_reason for i in range(4)] == [None, None, None, "length"]


@pytest.mark.parametrize("seed", range(20))
def test_multi_token_arrivals_respect_max_tokens_exactly(seed):
    gen = random.Random(seed)
    max_tokens = gen.randrange(1, 30)
    stop = checker(max_tokens=max_tokens)
    detokenized: list[int] = []
    kept, text = 0, ""
    while True:
        offered = [gen.randrange(100, 200) for _ in range(gen.randrange(1, 6))]
        decision = stop.check_tokens(offered, lambda ids: detokenized.extend(ids) or "t")
        kept += decision.num_tokens
        text += decision.text
        if decision.finish_reason:
            break
        assert decision.num_tokens == len(offered)
    assert decision.finish_reason == "length"
    assert kept == len(detokenized) == len(text) == max_tokens


def test_multi_token_arrival_drops_tokens_after_a_stop():
    stop = checker(stop_token_ids=[7], stop=["!!"])
    detokenized: list[int] = []

    def detokenize(ids):
        detokenized.extend(ids)
        return "".join("!" if t == 9 else "a" for t in ids)

    decision = stop.check_tokens([1, 2, 7, 4], detokenize)
    assert (decision.num_tokens, decision.finish_reason, decision.text) == (3, "stop", "aa")
    assert detokenized == [1, 2, 7]
    detokenized.clear()
    decision = checker(stop=["!!"]).check_tokens([1, 9, 9, 4, 5], detokenize)
    assert (decision.num_tokens, decision.stop_reason, decision.text) == (3, "!!", "a")
    assert detokenized == [1, 9, 9]


def test_stop_token_ids_are_checked_against_the_vocabulary():
    with pytest.raises(ValueError, match="stop_token_ids"):
        StopChecker(SamplingParams(stop_token_ids=[3, 8192]), [], 100, 1, vocab_size=8192)
    StopChecker(SamplingParams(stop_token_ids=[8191]), [], 100, 1, vocab_size=8192)


def test_with_the_real_incremental_detokenizer():
    tokenizer = Tokenizer.from_pretrained(PACKAGED)
    text = "def main():\n    return parse(args)  # done\nprint(main())\n"
    ids = tokenizer.encode(text)
    stop = StopChecker(SamplingParams(stop=["# done"], max_tokens=500), tokenizer.eos_token_ids, 1000, 1)
    detok = IncrementalDetokenizer(tokenizer)
    out, kept = "", 0
    for start in range(0, len(ids), 3):
        decision = stop.check_tokens(ids[start : start + 3], detok.add)
        out += decision.text
        kept += decision.num_tokens
        if decision.finish_reason:
            break
    assert decision.stop_reason == "# done"
    assert out == text[: text.index("# done")]
    # the token that completed the stop string is the last one kept
    assert "# done" in tokenizer.decode(ids[:kept]) and "# done" not in tokenizer.decode(ids[: kept - 1])

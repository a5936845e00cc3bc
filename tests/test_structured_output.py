"""Structured output in the engine: grammars compiled by llguidance, a matcher per sequence, the token bitmask applied
in the sampler (greedy and seeded sampling obey it, eos only where the grammar can end), drafts of MTP speculative
decoding checked against it, and the first token of a remote prefill. Engine runs use the embedded glm5-tiny."""

import json
import re

import pytest
import torch
from jsonschema import Draft202012Validator, FormatChecker
from structured_schemas import SCHEMAS

from glmserve import LLM, SamplingParams
from glmserve.engine.grammar import GrammarCompiler, closed_objects, llguidance_grammar
from glmserve.engine.sampler import Sampler, SamplingBatch, allowed_tokens
from glmserve.engine.spec.verify import verify_drafts
from glmserve.engine.structured_outputs import StructuredOutputParams
from glmserve.engine.validation import InvalidRequest
from glmserve.model.default_checkpoint import default_checkpoint
from glmserve.model.tokenizer import Tokenizer

EOS = 8175  # glm5-tiny's <|endoftext|> (eos ids: 8175, 8179, 8181)
THINK_END = 8183  # the added token </think>


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(default_checkpoint())


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer)


def _allowed(compiler: GrammarCompiler, matcher, after=()) -> set[int]:
    row = torch.zeros(compiler.words, dtype=torch.int32)
    matcher.fill(row, after)
    return set(allowed_tokens(row[None], compiler.vocab_size, torch.device("cpu"))[0].nonzero().flatten().tolist())


def _walk(tokenizer, compiler, spec: StructuredOutputParams, text: str, ids: list[int] | None = None):
    """Feed a text's tokens to a fresh matcher, each checked against the mask first; returns the matcher."""
    matcher = compiler.compile(spec).matcher()
    for token in ids if ids is not None else tokenizer.encode(text):
        assert token in _allowed(compiler, matcher), tokenizer.decode([token])
        assert matcher.accept(token)
    return matcher


# ---- the bitmask ----
def test_bitmask_unpacks_bit_t_of_word_t_over_32():
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    bitmask[0, 0] = 1 << 5
    bitmask[0, 2] = -(2**31)  # bit 31 of word 2: token 95
    bitmask[1] = -1
    allowed = allowed_tokens(bitmask, 90, torch.device("cpu"))
    assert allowed.shape == (2, 90)
    assert allowed[0].nonzero().flatten().tolist() == [5]  # token 95 lies beyond the vocabulary
    assert bool(allowed[1].all())


def _batch(params: list[SamplingParams], bitmask: torch.Tensor, seed: int = 0) -> SamplingBatch:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(params))]
    return SamplingBatch(params, [[1]] * len(params), [[]] * len(params), generators, (EOS,), bitmask)


def test_greedy_and_seeded_sampling_draw_only_allowed_tokens():
    vocab = 64
    torch.manual_seed(0)
    logits = torch.randn(3, vocab) * 5
    bitmask = torch.zeros(3, 2, dtype=torch.int32)
    allowed = [{3, 40}, {7}, {1, 2, 33, 63}]
    for row, tokens in enumerate(allowed):
        for t in tokens:
            bitmask[row, t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)
    sampler = Sampler()
    greedy = sampler.sample(logits, _batch([SamplingParams(temperature=0)] * 3, bitmask))
    for row, tokens in enumerate(allowed):
        assert int(greedy[row]) == max(tokens, key=lambda t: float(logits[row, t]))  # the best allowed, not the best
    hot = [SamplingParams(temperature=1.5, top_k=50, seed=1)] * 3
    seen = [set() for _ in allowed]
    for seed in range(40):
        for row, token in enumerate(sampler.sample(logits, _batch(hot, bitmask, seed)).tolist()):
            seen[row].add(token)
    assert all(s <= a for s, a in zip(seen, allowed, strict=True)) and seen[2] != {max(allowed[2])}
    probs = sampler.probs(logits, _batch(hot, bitmask))
    masked = ~allowed_tokens(bitmask, vocab, torch.device("cpu"))
    assert float(probs[masked].abs().max()) == 0.0 and torch.allclose(probs.sum(-1), torch.ones(3))


def test_eos_only_where_the_grammar_can_end_and_min_tokens_does_not_block_it(tokenizer, compiler):
    matcher = _walk(tokenizer, compiler, StructuredOutputParams(choice=["yes", "yesterday"]), "yes")
    after_yes = _allowed(compiler, matcher)
    assert EOS in after_yes and after_yes - set(tokenizer.eos_token_ids)  # may end, or go on to "yesterday"
    assert not matcher.is_stopped
    fresh = compiler.compile(StructuredOutputParams(choice=["yes", "yesterday"])).matcher()
    assert EOS not in _allowed(compiler, fresh)
    # the grammar, not min_tokens, decides where the output may end: eos stays allowed below min_tokens
    bitmask = torch.zeros(1, compiler.words, dtype=torch.int32)
    matcher.fill(bitmask[0])
    logits = torch.zeros(1, compiler.vocab_size)
    logits[0, EOS] = 10.0
    params = SamplingParams(
        temperature=0, max_tokens=64, min_tokens=50, structured_outputs=StructuredOutputParams(choice=["a"])
    )
    assert int(Sampler().sample(logits, _batch([params], bitmask))[0]) == EOS
    assert matcher.accept(EOS) and matcher.is_stopped


def test_fill_after_drafts_rolls_back_and_marks_unreachable_rows(tokenizer, compiler):
    spec = StructuredOutputParams(json={"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    matcher = compiler.compile(spec).matcher()
    start = _allowed(compiler, matcher)
    drafts = tokenizer.encode('{"a": 1')
    later = _allowed(compiler, matcher, drafts)
    assert later != start and _allowed(compiler, matcher) == start  # rolled back
    assert len(_allowed(compiler, matcher, tokenizer.encode("oops"))) == compiler.vocab_size  # unreachable: all ones
    for token in drafts:
        assert matcher.accept(token)
    assert _allowed(compiler, matcher) == later


def test_a_draft_the_grammar_rules_out_is_never_accepted(monkeypatch):
    """Speculative sampling takes a draft with chance min(1, p/q): p = 0 (masked by the grammar) must reject it
    even when the uniform draw is exactly 0."""
    target = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    draft_probs = torch.tensor([[1.0, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda n, generator=None: torch.zeros(n))  # u = 0
    tokens = verify_drafts(target, [0], draft_probs, torch.Generator().manual_seed(0), greedy=False)
    assert tokens == [1]  # the draft (token 0, p = 0) rejected, the residual gives token 1


# ---- specs and compiling ----
def test_spec_needs_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputParams(json="{nope")
    assert StructuredOutputParams(json='{"type": "integer"}').json_schema == {"type": "integer"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"json": {"type": "objekt"}}, "objekt"),
        ({"json": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}, "not"),  # not enforceable
        ({"json": {"$ref": "#/$defs/missing"}}, "missing"),
        ({"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "minimum"),
        ({"regex": "(("}, "regex"),
        ({"grammar": "start: undefined_rule"}, "undefined_rule"),
        ({"grammar": "root ::= (("}, "GBNF"),
    ],
)
def test_what_cannot_be_compiled_is_an_invalid_request(compiler, spec, message):
    with pytest.raises(InvalidRequest) as caught:
        compiler.compile(StructuredOutputParams(**spec))
    assert caught.value.param == "structured_outputs" and message in str(caught.value)


def test_lenient_drops_what_it_cannot_enforce(compiler):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "not": {"const": 3}}}}
    compiler.compile(StructuredOutputParams(json=schema, strict=False))


def test_compiles_once_per_spec(compiler):
    spec = StructuredOutputParams(regex="[0-9]{4}")
    assert compiler.compile(spec) is compiler.compile(StructuredOutputParams(regex="[0-9]{4}"))


def test_closed_objects_keeps_declared_schemas_valid():
    schema = {
        "type": "object",
        "properties": {"properties": {"type": "object", "properties": {"x": {}}}, "free": {"type": "object"}},
        "$defs": {"p": {"properties": {"y": {}}, "additionalProperties": True}},
        "anyOf": [{"properties": {"z": {}}}],
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False  # a property named "properties"
    assert "additionalProperties" not in closed["properties"]["free"]  # no declared properties: stays free
    assert closed["$defs"]["p"]["additionalProperties"] is True and closed["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is not changed


def test_special_tokens_are_never_text_but_glm_tags_are(tokenizer, compiler):
    matcher = _walk(tokenizer, compiler, StructuredOutputParams(json={"type": "string"}), '"a')
    allowed = _allowed(compiler, matcher)
    assert not allowed & {8176, 8179, 8180}  # [gMASK], <|user|>, <|assistant|>: not inside a JSON string
    assert {THINK_END, 8184} <= allowed  # </think> and <tool_call> are text (as the detokenizer shows them)


def test_reasoning_is_free_until_think_end_then_the_grammar_holds(tokenizer, compiler):
    spec = StructuredOutputParams(choice=["ok"], reasoning_end="</think>")
    assert '"name": "body"' in llguidance_grammar(spec)
    reasoning = tokenizer.encode("Let me think: <b> </thin")
    matcher = _walk(tokenizer, compiler, spec, "", reasoning)
    assert not set(tokenizer.eos_token_ids) & _allowed(compiler, matcher)  # no end inside the reasoning
    assert matcher.accept(THINK_END)
    assert all("ok".startswith(tokenizer.decode([t])) for t in _allowed(compiler, matcher))
    # the text spelling of </think> ends the reasoning too
    spelled = tokenizer.encode("so ") + tokenizer.encode("</") + tokenizer.encode("think") + tokenizer.encode(">")
    matcher = _walk(tokenizer, compiler, spec, "", spelled + tokenizer.encode("ok"))
    assert matcher.is_stopped


# ---- the engine ----
def _validate(schema: dict, text: str) -> None:
    Draft202012Validator(schema, format_checker=FormatChecker()).validate(json.loads(text))


def _prompts(names):
    return [f"# {name.replace('_', ' ')} as JSON\ndata = " for name in names]


@pytest.fixture(scope="module")
def llm():
    return LLM()


@pytest.fixture(scope="module")
def llm_mtp():
    return LLM(num_speculative_tokens=2, adaptive_speculation=False)


def _run_suite(llm: LLM, temperature: float) -> list:
    names = list(SCHEMAS)
    params = [
        SamplingParams(
            temperature=temperature, seed=i, max_tokens=64, structured_outputs=StructuredOutputParams(json=SCHEMAS[n])
        )
        for i, n in enumerate(names)
    ]
    outputs = llm.generate(_prompts(names), params, use_tqdm=False)
    for name, out in zip(names, outputs, strict=True):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (name, completion.text)
        _validate(SCHEMAS[name], completion.text)
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_every_schema_of_the_suite_validates_with_and_without_mtp(llm, llm_mtp, temperature):
    assert len(SCHEMAS) >= 30
    plain = _run_suite(llm, temperature)
    spec = _run_suite(llm_mtp, temperature)
    assert sum(o.outputs[0].spec.num_draft_tokens for o in spec) > 0  # drafts were verified under the grammars
    if temperature == 0:  # greedy with MTP is exact under a grammar too
        assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert llm.engine.idle and llm_mtp.engine.idle


def test_regex_choice_and_grammar_outputs(llm):
    specs = [
        StructuredOutputParams(regex="[a-z]{2,6}@[a-z]{2,5}\\.(com|org)"),
        StructuredOutputParams(choice=["alpha", "beta", "gamma"]),
        StructuredOutputParams(grammar='start: "(" NUM ("," NUM){1,3} ")"\nNUM: /[0-9]{1,2}/'),
        StructuredOutputParams(grammar='root ::= "x" [0-9] [0-9]'),  # GBNF
        StructuredOutputParams(json_object=True),
    ]
    outputs = llm.generate(
        ["contact = ", "mode = ", "point = ", "id = ", "config = "],
        [SamplingParams(temperature=0, max_tokens=40, structured_outputs=s) for s in specs],
        use_tqdm=False,
    )
    texts = [o.outputs[0].text for o in outputs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outputs), texts
    assert re.fullmatch(r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)", texts[0])
    assert texts[1] in ("alpha", "beta", "gamma")
    assert re.fullmatch(r"\([0-9]{1,2}(,[0-9]{1,2}){1,3}\)", texts[2])
    assert re.fullmatch(r"x[0-9]{2}", texts[3])
    assert isinstance(json.loads(texts[4]), dict)


def test_n_sequences_each_follow_the_grammar_and_stop_strings_still_cut(llm):
    schema = SCHEMAS["array_of_objects"]
    out = llm.generate(
        "items = ",
        SamplingParams(
            n=3, temperature=1.0, seed=5, max_tokens=64, structured_outputs=StructuredOutputParams(json=schema)
        ),
        use_tqdm=False,
    )[0]
    for completion in out.outputs:
        _validate(schema, completion.text)
    cut = llm.generate(
        "items = ",
        SamplingParams(
            temperature=0, max_tokens=64, stop=['"qty"'], structured_outputs=StructuredOutputParams(json=schema)
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == '"qty"' and cut.text.startswith('{"items": [{')


def test_bad_spec_is_refused_and_the_engine_keeps_serving(llm):
    with pytest.raises(InvalidRequest) as caught:
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputParams(json={"type": "objekt"})))
    assert caught.value.param == "structured_outputs"
    assert llm.engine.idle
    assert llm.generate("x", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_remote_prefill_first_token_obeys_the_grammar(llm):
    """Disaggregated: the prefill worker's engine samples the first token under the request's grammar (the params
    travel with the request) and the decode engine's matcher takes it up from there."""
    schema = SCHEMAS["flat"]
    params = SamplingParams(temperature=0, max_tokens=48, structured_outputs=StructuredOutputParams(json=schema))
    prompt = llm.get_tokenizer().encode("# flat as JSON\ndata = ")
    prefill = LLM()  # another engine, as a prefill worker runs it
    first = prefill.generate({"prompt_token_ids": prompt}, params.model_copy(update={"max_tokens": 1}), use_tqdm=False)
    token = first[0].outputs[0].token_ids[0]
    assert prefill.get_tokenizer().decode([token]).startswith("{")
    decode = llm.engine
    plan = decode.add_request("remote-1", prompt, params, remote_prefill_min_tokens=1)
    assert plan is not None
    out = decode.complete_remote("remote-1", token, None)
    text = out.deltas[0].text
    while not out.finished:
        for out in decode.step():
            text += out.deltas[0].text if out.deltas else ""
    # the KV was never filled (no transfer here), so the words differ; the grammar holds all the same
    _validate(schema, text)
    assert decode.idle


def test_a_first_token_that_breaks_the_grammar_ends_the_request(llm):
    params = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputParams(choice=["yes"]))
    decode = llm.engine
    prompt = llm.get_tokenizer().encode("answer: ")
    decode.add_request("remote-2", prompt, params, remote_prefill_min_tokens=1)
    out = decode.complete_remote("remote-2", llm.get_tokenizer().encode("no")[0], None)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert decode.idle

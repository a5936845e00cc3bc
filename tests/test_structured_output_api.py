"""Structured output and forced tools through the API: the request fields mapped into the engine's grammar
(`response_format`, `structured_outputs`, `guided_*`, `tool_choice`, `parallel_tool_calls`, thinking), GLM tool-call
grammars, offline runs of forced tool calls on the embedded glm5-tiny, and the official `openai` client against
`glmserve serve`."""

import json

import openai
import pytest
from jsonschema import Draft202012Validator, FormatChecker
from structured_schemas import SCHEMAS

from glmserve import LLM, SamplingParams
from glmserve.api.request_models import ChatCompletionRequest, CompletionRequest
from glmserve.api.tool_grammar import ToolGrammarError, no_tool_call_grammar, tool_call_grammar
from glmserve.api.tool_parser import parse_tool_calls
from glmserve.engine.grammar import GrammarCompiler
from glmserve.engine.structured_outputs import StructuredOutputParams
from glmserve.model.default_checkpoint import default_checkpoint
from glmserve.model.tokenizer import Tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "minLength": 1, "maxLength": 30},
                "filters": {
                    "type": "object",
                    "properties": {"site": {"type": "string", "maxLength": 15}, "year": {"type": "integer"}},
                },
                "tags": {"type": "array", "items": {"enum": ["news", "blog"]}, "maxItems": 2},
            },
            "required": ["query"],
        },
    },
}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters at all
TOOLS = [WEATHER, SEARCH, PING]
PARAMETERS = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in TOOLS}
NO_THINKING = {"thinking": {"type": "disabled"}}


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def _valid(schema: dict, value) -> None:
    Draft202012Validator(schema, format_checker=FormatChecker()).validate(value)


# ---- mapping requests into grammars ----
def test_response_format_maps_into_the_grammar_after_the_reasoning():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    spec, param = _chat(response_format=fmt).structured_output()
    assert (spec.json_schema, spec.strict, spec.reasoning_end, param) == (schema, True, "</think>", "response_format")
    spec, _ = _chat(response_format=fmt, **NO_THINKING).structured_output()
    assert spec.reasoning_end is None
    loose = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": False}}
    assert _chat(response_format=loose).structured_output()[0].strict is False
    spec, _ = _chat(response_format={"type": "json_object"}).structured_output()
    assert spec.json_object
    assert _chat(response_format={"type": "text"}).structured_output() == (None, None)
    assert _chat().structured_output() == (None, None)


@pytest.mark.parametrize(
    ("fields", "kind", "param"),
    [
        ({"guided_json": {"type": "integer"}}, "json", "guided_json"),
        ({"guided_json": '{"type": "integer"}'}, "json", "guided_json"),
        ({"guided_regex": "[0-9]+"}, "regex", "guided_regex"),
        ({"guided_choice": ["a", "b"]}, "choice", "guided_choice"),
        ({"guided_grammar": 'start: "x"'}, "grammar", "guided_grammar"),
        ({"structured_outputs": {"choice": ["a"]}}, "choice", "structured_outputs"),
        ({"structured_outputs": {"json": {"type": "object"}, "disable_any_whitespace": False}}, "json", None),
    ],
)
def test_vllm_fields_on_both_endpoints(fields, kind, param):
    for request in (CompletionRequest.model_validate({"prompt": "x", **fields}), _chat(**fields, **NO_THINKING)):
        spec, named = request.structured_output()
        assert spec.kind == kind and named == (param or "structured_outputs")
        assert request.sampling_params(16)["structured_outputs"] == spec


def test_forced_and_forbidden_tool_calls_map_into_grammars():
    spec, param = _chat(tools=TOOLS, tool_choice="required").structured_output()
    assert param == "tool_choice" and spec.grammar.startswith("start: call+") and spec.reasoning_end == "</think>"
    named = {"type": "function", "function": {"name": "search"}}
    spec, _ = _chat(tools=TOOLS, tool_choice=named, parallel_tool_calls=False, **NO_THINKING).structured_output()
    assert spec.grammar.startswith("start: call\n") and "<tool_call>get_weather" not in spec.grammar
    assert spec.reasoning_end is None
    spec, _ = _chat(tools=TOOLS, tool_choice="none").structured_output()
    assert spec.grammar == no_tool_call_grammar()
    assert _chat(tools=TOOLS).structured_output() == (None, None)  # auto: the model chooses


def test_a_tool_schema_a_raw_string_cannot_follow_is_refused_when_forced():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"properties": {"u": {"type": "string"}}}}}
    tool["function"]["parameters"]["properties"]["u"]["format"] = "uri"
    with pytest.raises(ValueError, match="format 'uri'"):
        _chat(tools=[tool], tool_choice="required")
    _chat(tools=[tool])  # not forced: no grammar, accepted
    with pytest.raises(ToolGrammarError):
        tool_call_grammar([tool])


# ---- the tool-call grammar itself ----
@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(default_checkpoint())


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer)


def _accepts(compiler, tokenizer, grammar: str, text: str) -> bool:
    import torch

    matcher = compiler.compile(StructuredOutputParams(grammar=grammar)).matcher()
    row = torch.zeros(compiler.words, dtype=torch.int32)
    for token in tokenizer.encode(text):
        matcher.fill(row)
        if not (int(row[token // 32]) >> (token % 32)) & 1:
            return False
        matcher.accept(token)
    return matcher.is_stopped or bool(row.any())


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
         "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>", True),
        ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>", False),  # days
        ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>P</arg_value>"
         "<arg_key>days</arg_key><arg_value>9</arg_value></tool_call>", False),  # maximum 7
        ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>P</arg_value>"
         "<arg_key>unit</arg_key><arg_value>kelvin</arg_value>", False),  # enum
        ('<tool_call>search<arg_key>query</arg_key><arg_value>a <b> "c"</arg_value><arg_key>filters</arg_key>'
         '<arg_value>{"site": "x.org", "year": 2020}</arg_value></tool_call>', True),
        ("<tool_call>search<arg_key>query</arg_key><arg_value></arg_value></tool_call>", False),  # minLength
        ('<tool_call>ping<arg_key>anything</arg_key><arg_value>[1, "a"]</arg_value></tool_call>', True),
        ("<tool_call>lookup</tool_call>", False),  # not a tool
        ("Sure! <tool_call>ping</tool_call>", False),  # a forced call comes first
    ],
)  # fmt: skip
def test_tool_call_grammar_holds_calls_to_the_schemas(compiler, tokenizer, text, ok):
    assert _accepts(compiler, tokenizer, tool_call_grammar(TOOLS, parallel=False), text) is ok
    if ok:
        _, calls = parse_tool_calls(text, TOOLS)
        (call,) = calls
        _valid(PARAMETERS[call.name], json.loads(call.arguments))


def test_parallel_calls_and_the_forbidding_grammar(compiler, tokenizer):
    two = "<tool_call>ping</tool_call><tool_call>ping</tool_call>"
    assert _accepts(compiler, tokenizer, tool_call_grammar(TOOLS, ["ping"], parallel=True), two)
    assert not _accepts(compiler, tokenizer, tool_call_grammar(TOOLS, ["ping"], parallel=False), two)
    assert _accepts(compiler, tokenizer, no_tool_call_grammar(), "Plain text, even <tool_response> tags.")
    assert not _accepts(compiler, tokenizer, no_tool_call_grammar(), "Now: <tool_call>ping</tool_call>")


# ---- offline: forced tool calls on the embedded model ----
PROMPTS = [
    "What is the weather in Paris?", "Search the news about Rust.", "Is the server up?", "Weather in Tokyo for 3 days",
    "Find blog posts on sorting", "Check the latency", "How cold is Oslo?", "Look up python 3.13 release",
    "Forecast for Lima, fahrenheit", "ping it", "search: gpu prices 2024", "rain in London tomorrow?",
    "Find docs on asyncio", "weather Berlin", "news about llamas", "Ping the host", "Sunny in Rome?",
    "query the web for ray serve", "What's the temperature in Cairo", "status check",
]  # fmt: skip


@pytest.fixture(scope="module")
def llm():
    return LLM()


def _render(tokenizer: Tokenizer, prompt: str, tools) -> str:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tools=tools, enable_thinking=False)


def _forced(llm: LLM, names: list[str] | None, parallel: bool) -> list:
    tokenizer = llm.get_tokenizer()
    spec = StructuredOutputParams(grammar=tool_call_grammar(TOOLS, names, parallel))
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=128, structured_outputs=spec)
    return llm.generate([_render(tokenizer, p, TOOLS) for p in PROMPTS], params, use_tqdm=False)


@pytest.mark.slow
@pytest.mark.parametrize(("names", "parallel"), [(None, False), (["search"], True)])
def test_forced_tool_calls_on_20_prompts_parse_and_validate(llm, names, parallel):
    for out in _forced(llm, names, parallel):
        completion = out.outputs[0]
        content, calls = parse_tool_calls(completion.text, TOOLS)
        assert calls, completion.text
        if parallel:  # the grammar lets a call follow a call: the tiny model may go on until max_tokens, when the
            # unfinished last call is left as content; every finished one holds to its schema
            unfinished = content.startswith("<tool_call>") or "<tool_call>".startswith(content)
            assert completion.finish_reason == "stop" or unfinished, completion.text
        else:
            assert completion.finish_reason == "stop" and not content and len(calls) == 1, completion.text
        for call in calls:
            assert names is None or call.name in names
            _valid(PARAMETERS[call.name], json.loads(call.arguments))


@pytest.mark.slow
def test_tool_choice_none_on_20_prompts_never_calls(llm):
    tokenizer = llm.get_tokenizer()
    spec = StructuredOutputParams(grammar=no_tool_call_grammar())
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=32, structured_outputs=spec)
    # the tools stay in this prompt, so the model is tempted: the grammar alone keeps the call out
    outs = llm.generate([_render(tokenizer, p, TOOLS) for p in PROMPTS], params, use_tqdm=False)
    for out in outs:
        assert "<tool_call>" not in out.outputs[0].text


# ---- the official client against the real server ----
@pytest.fixture(scope="module")
def client():
    from server_process import running_server

    with running_server() as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


E2E_SCHEMAS = ["flat", "nested", "array_bounds", "any_of_objects", "string_pattern", "string_enum"]


@pytest.mark.slow
def test_openai_client_end_to_end(client):
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Describe a user as JSON."}]
    for i, name in enumerate(E2E_SCHEMAS):
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
        thinking = {"thinking": {"type": "disabled"}} if i % 2 else {}  # with thinking on, after </think>
        common = {"model": model, "messages": messages, "response_format": fmt, "max_tokens": 200, "seed": i}
        r = client.chat.completions.create(**common, temperature=0, extra_body=thinking)
        choice = r.choices[0]
        if choice.finish_reason == "length":  # thinking on: the tiny model may reason past max_tokens
            assert not thinking and not choice.message.content
        else:
            _valid(SCHEMAS[name], json.loads(choice.message.content))
        chunks = list(client.chat.completions.create(**common, temperature=0.7, stream=True, extra_body=NO_THINKING))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "stop"
        _valid(SCHEMAS[name], json.loads(text))

    tools_prompt = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = [("required", None), ({"type": "function", "function": {"name": "search"}}, "search")]
    for choice_, name in forced:
        for parallel in (False, True):
            r = client.chat.completions.create(
                model=model, messages=tools_prompt, tools=TOOLS, tool_choice=choice_, parallel_tool_calls=parallel,
                max_tokens=120, temperature=0.8, seed=2, extra_body=NO_THINKING,
            )  # fmt: skip
            choice = r.choices[0]
            assert choice.message.tool_calls
            # one call, or calls back to back: the tiny model may go on calling until max_tokens
            assert choice.finish_reason == "tool_calls" or (parallel and choice.finish_reason == "length")
            assert parallel or len(choice.message.tool_calls) == 1
            for call in choice.message.tool_calls:
                assert name is None or call.function.name == name
                _valid(PARAMETERS[call.function.name], json.loads(call.function.arguments))
    chunks = list(
        client.chat.completions.create(
            model=model, messages=tools_prompt, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            max_tokens=120, stream=True, extra_body={"tool_stream": True, **NO_THINKING},
        )
    )  # fmt: skip
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    name = next(d.function.name for d in deltas if d.function.name)
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    _valid(PARAMETERS[name], json.loads(arguments))
    r = client.chat.completions.create(
        model=model, messages=tools_prompt, tools=TOOLS, tool_choice="none", max_tokens=40, temperature=1.0
    )
    assert not r.choices[0].message.tool_calls and "<tool_call>" not in (r.choices[0].message.content or "")

    r = client.completions.create(
        model=model, prompt="answer = ", max_tokens=20, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert r.choices[0].text in ("yes", "no")
    r = client.completions.create(
        model=model, prompt="point = ", max_tokens=40,
        extra_body={"structured_outputs": {"json": SCHEMAS["any_of_objects"]}},
    )  # fmt: skip
    _valid(SCHEMAS["any_of_objects"], json.loads(r.choices[0].text))

    bad = [
        ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "x"}}}},
         "response_format"),
        ("chat", {"response_format": {"type": "json_schema",
                                      "json_schema": {"name": "b", "schema": {"not": {"type": "string"}}}}},
         "response_format"),
        ("completions", {"guided_regex": "(("}, "guided_regex"),
        ("completions", {"structured_outputs": {"grammar": "start: nope"}}, "structured_outputs"),
    ]  # fmt: skip
    for endpoint, fields, param in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            if endpoint == "chat":
                response_format = fields["response_format"]
                client.chat.completions.create(model=model, messages=messages, response_format=response_format)
            else:
                client.completions.create(model=model, prompt="x", extra_body=fields)
        assert caught.value.status_code == 400 and caught.value.param == param, caught.value.body
    assert client.completions.create(model=model, prompt="x", max_tokens=2).choices  # still serving

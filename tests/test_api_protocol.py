"""Request validation and translation, response shapes (checked with the official `openai` types), errors, SSE."""

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from glmserve.api.errors import (
    APIError,
    AuthenticationError,
    ModelNotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    from_validation_error,
)
from glmserve.api.request_models import ChatCompletionRequest, CompletionRequest
from glmserve.api.response_models import (
    MIN_LOGPROB,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ModelCard,
    ModelList,
    TopLogprob,
    Usage,
)
from glmserve.api.response_models import ToolCall as ResponseToolCall
from glmserve.api.sse import SSE_DONE, sse_event
from glmserve.engine import SamplingParams

openai = pytest.importorskip("openai")

CHECKPOINT = Path(__file__).resolve().parents[1] / "model" / "checkpoints" / "glm5-tiny"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


FUNC = {"name": "f", "arguments": "{}"}
FMT = {"type": "string", "format": "hostname"}  # a format a raw string tool argument cannot be held to


def chat_body(**fields) -> dict:
    return {"model": "glm-5", "messages": [{"role": "user", "content": "Hi"}], **fields}


def chat_error_param(body: dict) -> str | None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate_json(json.dumps(body))
    return from_validation_error(caught.value).param


# --- requests: accepted input


def test_full_chat_request_parses_every_field():
    body = chat_body(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "Need the tool.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        max_completion_tokens=64,
        temperature=0.7,
        top_p=0.9,
        n=2,
        stop=["\n\n", "END"],
        seed=7,
        logprobs=True,
        top_logprobs=5,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        stream=True,
        stream_options={"include_usage": True},
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
        user="u1",
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        min_tokens=2,
        ignore_eos=False,
        stop_token_ids=[154820],
        skip_special_tokens=False,
        thinking={"type": "enabled", "clear_thinking": False},
        reasoning_effort="high",
        do_sample=True,
        tool_stream=True,
        request_id="req-1",
        user_id="user-1",
    )
    request = ChatCompletionRequest.model_validate_json(json.dumps(body))
    assert request.include_usage and request.tool_stream and request.parses_tool_calls
    assert request.response_format.json_schema.schema_ == {"type": "object"}
    assert (request.request_id, request.user_id, request.user) == ("req-1", "user-1", "u1")

    kwargs = request.template_kwargs()
    assert kwargs["enable_thinking"] is True and kwargs["clear_thinking"] is False
    assert kwargs["reasoning_effort"] == "high" and kwargs["add_generation_prompt"] is True
    assert kwargs["tools"] == [WEATHER_TOOL]
    messages = kwargs["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "user", "content": "Weather in Paris?"}
    assert messages[2]["reasoning_content"] == "Need the tool."
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "days": 2}

    params = request.sampling_params(default_max_tokens=1000)
    # response_format next to tool_choice "auto": the output is either tool calls or the JSON, after the reasoning
    structured = params.pop("structured_outputs")
    assert structured.reasoning_end == "</think>" and structured.grammar.startswith("start: (call+) | json_")
    assert params == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.1,
        "seed": 7,
        "stop": ["\n\n", "END"],
        "stop_token_ids": [154820],
        "max_tokens": 64,
        "min_tokens": 2,
        "ignore_eos": False,
        "logprobs": 5,
        "skip_special_tokens": False,
        "n": 2,
    }


def test_unknown_fields_are_ignored():
    body = chat_body(store=True, metadata={"a": "b"}, parallel_tool_calls=False, some_future_field=[1])
    request = ChatCompletionRequest.model_validate(body)
    assert not hasattr(request, "some_future_field")
    assert request.messages[0].content == "Hi"


def test_null_means_unset():
    body = chat_body(n=None, stream=None, logprobs=None, stop=None, min_tokens=None, thinking={"type": None})
    body["messages"].append({"role": "assistant", "content": None, "tool_calls": None})
    request = ChatCompletionRequest.model_validate_json(json.dumps(body))
    assert (request.n, request.stream, request.logprobs, request.stop, request.min_tokens) == (1, False, False, None, 0)
    assert request.thinking_enabled and request.messages[1].template_message() == {"role": "assistant", "content": ""}
    assert chat_error_param({"model": "m", "messages": None}) == "messages"
    assert chat_error_param(chat_body(messages=[{"role": None, "content": "x"}])) == "messages.0.role"


def test_sampling_defaults_and_greedy():
    request = ChatCompletionRequest.model_validate(chat_body())
    params = request.sampling_params(default_max_tokens=123)
    assert params["max_tokens"] == 123 and params["temperature"] == 1.0 and params["top_k"] == -1
    assert params["logprobs"] is None and params["stop"] == [] and params["n"] == 1
    # the checkpoint's generation defaults fill what the request leaves out, and only that
    generation_config = {"temperature": 0.6, "top_p": 0.95, "max_length": 99}
    params = ChatCompletionRequest.model_validate(chat_body(top_p=0.5)).sampling_params(10, generation_config)
    assert (params["temperature"], params["top_p"]) == (0.6, 0.5) and "max_length" not in params
    # do_sample=false is greedy whatever the temperature; temperature 0 stays 0
    greedy = ChatCompletionRequest.model_validate(chat_body(do_sample=False, temperature=0.9))
    assert greedy.sampling_params(10)["temperature"] == 0.0
    zero = ChatCompletionRequest.model_validate(chat_body(temperature=0))
    assert zero.sampling_params(10, {"temperature": 1})["temperature"] == 0.0
    # top_k 0 means "no cut", written as vLLM's -1
    assert ChatCompletionRequest.model_validate(chat_body(top_k=0)).sampling_params(10)["top_k"] == -1
    # max_completion_tokens wins over max_tokens; a single stop string becomes a list
    request = ChatCompletionRequest.model_validate(chat_body(max_tokens=5, max_completion_tokens=9, stop="###"))
    assert request.sampling_params(10)["max_tokens"] == 9 and request.sampling_params(10)["stop"] == ["###"]
    # chat logprobs: true alone means the sampled token's logprob only
    assert ChatCompletionRequest.model_validate(chat_body(logprobs=True)).sampling_params(10)["logprobs"] == 0


@pytest.mark.parametrize(
    ("fields", "enable", "clear", "effort"),
    [
        ({}, True, True, "max"),
        ({"thinking": {"type": "disabled"}}, False, True, "max"),
        ({"thinking": {"type": "enabled", "clear_thinking": False}}, True, False, "max"),
        ({"chat_template_kwargs": {"enable_thinking": False, "clear_thinking": False}}, False, False, "max"),
        ({"chat_template_kwargs": {"reasoning_effort": "high", "unknown": 1}}, True, True, "high"),
        # Z.AI's own fields win over vLLM's chat_template_kwargs
        ({"thinking": {"type": "enabled"}, "chat_template_kwargs": {"enable_thinking": False}}, True, True, "max"),
        ({"reasoning_effort": "max", "chat_template_kwargs": {"reasoning_effort": "high"}}, True, True, "max"),
    ],
)
def test_thinking_options(fields, enable, clear, effort):
    request = ChatCompletionRequest.model_validate(chat_body(**fields))
    kwargs = request.template_kwargs()
    assert (kwargs["enable_thinking"], kwargs["clear_thinking"], kwargs["reasoning_effort"]) == (enable, clear, effort)
    assert request.thinking_enabled is enable


def test_tool_choice_none_hides_tools():
    request = ChatCompletionRequest.model_validate(chat_body(tools=[WEATHER_TOOL], tool_choice="none"))
    assert not request.parses_tool_calls and request.template_kwargs()["tools"] is None
    named = {"type": "function", "function": {"name": "get_weather"}}
    request = ChatCompletionRequest.model_validate(chat_body(tools=[WEATHER_TOOL], tool_choice=named))
    assert request.parses_tool_calls and request.tool_choice.function.name == "get_weather"


def test_template_kwargs_render_with_the_checkpoint_template():
    """The kwargs drive the real GLM template: generation prompt opens or closes <think>, tools and history show."""
    chat_template = pytest.importorskip("glmserve.model.chat_template")
    if not (CHECKPOINT / "chat_template.jinja").is_file():
        pytest.skip("no chat template in the embedded checkpoint")
    template = chat_template.ChatTemplate.from_pretrained(CHECKPOINT)
    body = chat_body(
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "tool_calls": [{"id": "c", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}],
            },
            {"role": "tool", "content": "rain"},
        ],
        tools=[WEATHER_TOOL],
    )
    prompt = template.render(**ChatCompletionRequest.model_validate(body).template_kwargs())
    assert prompt.endswith("<|assistant|><think>")
    assert '"name": "get_weather"' in prompt
    assert "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>" in prompt
    body["thinking"] = {"type": "disabled"}
    prompt = template.render(**ChatCompletionRequest.model_validate(body).template_kwargs())
    assert prompt.endswith("<|assistant|></think>")


def test_completion_request_prompts():
    assert CompletionRequest.model_validate({"prompt": "abc"}).prompts() == ["abc"]
    assert CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompts() == ["a", "b"]
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompts() == [[1, 2, 3]]
    assert CompletionRequest.model_validate({"prompt": [[1], [2, 3]]}).prompts() == [[1], [2, 3]]
    request = CompletionRequest.model_validate({"prompt": "x", "logprobs": 3, "echo": True, "max_tokens": 4})
    params = request.sampling_params(default_max_tokens=100)
    assert request.echo and params["logprobs"] == 3 and params["max_tokens"] == 4


# --- requests: rejected input names the field


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 5.0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
        ({"seed": "1"}, "seed"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": [{"function": FUNC}]}]},
            "messages.0.tool_calls",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
            "messages.0.tool_calls.0.function.arguments",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]},
            "messages.0.tool_calls.0.function.arguments",
        ),
        ({"tools": [{"type": "custom", "custom": {}}]}, "tools.0.type"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools.0.function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools.0.function.parameters",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),  # forced, but with no tools to call
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"u": FMT}}}}]}
            | {"tool_choice": "required"},
            "tool_choice",
        ),  # a raw string value cannot be held to this format
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_json": {}, "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"thinking": {"type": "maybe"}}, "thinking.type"),
        ({"thinking": {"clear_thinking": "no"}}, "thinking.clear_thinking"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"do_sample": "false"}, "do_sample"),
        ({"tool_stream": 1}, "tool_stream"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
    ],
)
def test_chat_validation_error_names_the_field(fields, param):
    assert chat_error_param(chat_body(**fields)) == param


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_min_tokens_above_the_limit_names_min_tokens(limit):
    """Checked once, by SamplingParams (offline users get the same check), on the parameters the request maps to."""
    request = ChatCompletionRequest.model_validate_json(json.dumps(chat_body(**{limit: 3, "min_tokens": 5})))
    with pytest.raises(ValidationError) as caught:
        SamplingParams(**request.sampling_params(default_max_tokens=16))
    assert from_validation_error(caught.value).param == "min_tokens"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [[1, -2]]}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [True, False]}, "prompt"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "suffix": "end"}, "suffix"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "echo": "x"}, "echo"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_completion_validation_error_names_the_field(body, param):
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate_json(json.dumps(body))
    assert from_validation_error(caught.value).param == param


def test_validation_error_body():
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(chat_body(max_tokens=0, temperature=3))
    error = from_validation_error(caught.value)
    assert error.status_code == 400
    body = error.body()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "max_tokens"
    assert "max_tokens" in body["error"]["message"] and "temperature" in body["error"]["message"]
    assert "Value error" not in from_validation_error([{"loc": ("body", "n"), "msg": "Value error, bad"}]).message
    # FastAPI's RequestValidationError.errors() prefixes locations with "body"
    fastapi_style = [{"loc": ("body", "messages", 0, "role"), "msg": "Input should be 'user'", "type": "x"}]
    assert from_validation_error(fastapi_style).param == "messages.0.role"


def test_invalid_json_is_a_400_without_param():
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate_json(b'{"messages": [')
    error = from_validation_error(caught.value)
    assert error.status_code == 400 and error.param is None and "JSON" in error.message


# --- errors


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (AuthenticationError("bad key"), 401, None),
        (ModelNotFoundError("gpt-9"), 404, None),
        (RateLimitError("slow down", retry_after=2.2), 429, "3"),
        (ServiceUnavailableError("overloaded", retry_after=0.1), 503, "1"),
        (APIError("worker died"), 500, None),
    ],
)
def test_api_errors(error, status, retry_after):
    assert error.status_code == status
    assert error.headers.get("Retry-After") == retry_after
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    if status == 404:
        assert body["param"] == "model" and body["code"] == "model_not_found" and "gpt-9" in body["message"]


# --- responses, checked with the openai package's own types


def test_chat_completion_matches_openai_types():
    token = ChatTokenLogprob(
        token="Hi",
        logprob=-0.25,
        bytes=list(b"Hi"),
        top_logprobs=[TopLogprob(token="Hi", logprob=-0.25, bytes=list(b"Hi")), TopLogprob(token="Yo", logprob=-1.5)],
    )
    response = ChatCompletion(
        model="glm-5",
        choices=[
            ChatChoice(
                index=0,
                message=ChatResponseMessage(
                    content="Hi",
                    reasoning_content="think",
                    tool_calls=[
                        ResponseToolCall(
                            id="call_1", function=FunctionCall(name="get_weather", arguments='{"city": "Oslo"}')
                        )
                    ],
                ),
                logprobs=ChatLogprobs(content=[token]),
                finish_reason="tool_calls",
            )
        ],
        usage=Usage.from_counts(prompt_tokens=10, completion_tokens=5, cached_tokens=8, reasoning_tokens=1),
    )
    theirs = openai.types.chat.ChatCompletion.model_validate_json(response.model_dump_json())
    assert theirs.id.startswith("chatcmpl-") and theirs.object == "chat.completion"
    choice = theirs.choices[0]
    assert choice.message.content == "Hi" and choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].function.arguments == '{"city": "Oslo"}'
    assert choice.message.reasoning_content == "think"  # kept as an extra field by the SDK
    assert choice.logprobs.content[0].top_logprobs[1].token == "Yo"
    assert bytes(choice.logprobs.content[0].bytes) == b"Hi"
    usage = theirs.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 5, 15)
    assert usage.prompt_tokens_details.cached_tokens == 8
    assert usage.completion_tokens_details.reasoning_tokens == 1


def test_chat_chunks_match_openai_types_and_omit_empty_delta_fields():
    first = ChatCompletionChunk(
        id="chatcmpl-1",
        model="glm-5",
        choices=[ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", reasoning_content="hm"))],
    )
    call = ChatCompletionChunk(
        id="chatcmpl-1",
        model="glm-5",
        choices=[
            ChatChunkChoice(
                index=0,
                delta=ChatDelta(
                    tool_calls=[
                        DeltaToolCall(index=0, id="call_1", type="function", function=DeltaFunctionCall(name="f")),
                        DeltaToolCall(index=0, function=DeltaFunctionCall(arguments='{"a": 1}')),
                    ]
                ),
            )
        ],
    )
    last = ChatCompletionChunk(
        id="chatcmpl-1",
        model="glm-5",
        choices=[ChatChunkChoice(index=0, delta=ChatDelta(), finish_reason="tool_calls")],
        usage=Usage.from_counts(3, 4, cached_tokens=2),
    )
    raw = [json.loads(chunk.model_dump_json()) for chunk in (first, call, last)]
    assert raw[0]["choices"][0]["delta"] == {"role": "assistant", "reasoning_content": "hm"}
    assert raw[1]["choices"][0]["delta"]["tool_calls"][1] == {"index": 0, "function": {"arguments": '{"a": 1}'}}
    assert raw[2]["choices"][0]["delta"] == {} and raw[2]["choices"][0]["finish_reason"] == "tool_calls"
    assert raw[0]["choices"][0]["finish_reason"] is None  # present, as null, like OpenAI's stream
    theirs = [openai.types.chat.ChatCompletionChunk.model_validate(r) for r in raw]
    assert theirs[1].choices[0].delta.tool_calls[0].function.name == "f"
    assert theirs[2].usage.prompt_tokens_details.cached_tokens == 2 and theirs[2].usage.total_tokens == 7


def test_completion_matches_openai_types():
    logprobs = CompletionLogprobs(
        tokens=["Hel", "lo"],
        token_logprobs=[-0.5, -math.inf],
        top_logprobs=[{"Hel": -0.5, "He": -1.0}, {"lo": -math.inf}],
        text_offset=[0, 3],
    )
    response = Completion(
        model="glm-5",
        choices=[CompletionChoice(index=0, text="Hello", logprobs=logprobs, finish_reason="length")],
        usage=Usage.from_counts(2, 2),
    )
    theirs = openai.types.Completion.model_validate_json(response.model_dump_json())
    assert theirs.id.startswith("cmpl-") and theirs.choices[0].text == "Hello"
    assert theirs.choices[0].logprobs.text_offset == [0, 3]
    # -inf has no JSON spelling: it is reported as the floor, not as null
    assert theirs.choices[0].logprobs.token_logprobs == [-0.5, MIN_LOGPROB]
    assert theirs.choices[0].logprobs.top_logprobs[1] == {"lo": MIN_LOGPROB}
    chunk = CompletionChunk(
        id="cmpl-1", model="glm-5", choices=[CompletionChunkChoice(index=0, text="!", finish_reason="stop")]
    )
    assert openai.types.Completion.model_validate_json(chunk.model_dump_json()).choices[0].finish_reason == "stop"


def test_model_list_matches_openai_types():
    listing = ModelList(data=[ModelCard(id="glm-5", root="/ckpt", max_model_len=4096)])
    raw = json.loads(listing.model_dump_json())
    assert raw["object"] == "list"
    model = openai.types.Model.model_validate(raw["data"][0])
    assert model.id == "glm-5" and model.object == "model" and model.owned_by == "glmserve"


# --- SSE


def test_sse_events_round_trip():
    chunk = ChatCompletionChunk(
        id="chatcmpl-1", model="glm-5", choices=[ChatChunkChoice(index=0, delta=ChatDelta(content="a\n\nb é"))]
    )
    stream = sse_event(chunk) + sse_event(ServiceUnavailableError("busy", retry_after=1).body()) + SSE_DONE
    events = stream.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(event.startswith("data: ") and "\n" not in event for event in events[:-1])
    assert openai.types.chat.ChatCompletionChunk.model_validate(payloads[0]).choices[0].delta.content == "a\n\nb é"
    assert payloads[1]["error"]["type"] == "service_unavailable_error"

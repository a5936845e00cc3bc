"""The OpenAI API end to end: the official `openai` client against `glmserve serve` (Ray Serve, real workers)
serving a scripted checkpoint whose greedy output is known in advance."""

import json
import re
import time

import httpx
import openai
import pytest
from scripted_model import make_scripted_checkpoint
from server_process import running_server

pytestmark = pytest.mark.slow

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0, "max_tokens": 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_scripted_checkpoint(tmp_path_factory.mktemp("scripted"))
    with running_server("--model", str(model), "--served-model-name", "glm5-scripted") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["glm5-scripted"]


def test_chat_reasoning_and_tool_call(client):
    r = client.chat.completions.create(model="glm5-scripted", messages=MESSAGES, tools=TOOLS, **GREEDY)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "I should call the forecast tool."
    assert not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": 'Paris, "FR"'}
    assert r.usage.completion_tokens > 10 and r.usage.prompt_tokens > 10


def test_chat_stream_tool_stream_fragments_match(client):
    full = client.chat.completions.create(model="glm5-scripted", messages=MESSAGES, tools=TOOLS, **GREEDY)
    stream = client.chat.completions.create(
        model="glm5-scripted",
        messages=MESSAGES,
        tools=TOOLS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"tool_stream": True},
        **GREEDY,
    )
    reasoning, arguments, names, finish, usage, fragments = "", {}, {}, None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            delta = c.delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for tc in delta.tool_calls or ():
                if tc.function and tc.function.name:
                    names[tc.index] = tc.function.name
                if tc.function and tc.function.arguments:
                    arguments[tc.index] = arguments.get(tc.index, "") + tc.function.arguments
                    fragments += 1
            finish = c.finish_reason or finish
    assert reasoning == full.choices[0].message.reasoning_content
    assert names == {0: "get_weather"} and finish == "tool_calls"
    assert fragments > 1, "tool_stream should send the arguments in pieces"
    assert arguments[0] == full.choices[0].message.tool_calls[0].function.arguments
    assert json.loads(arguments[0]) == {"city": 'Paris, "FR"'}
    assert usage.completion_tokens == full.usage.completion_tokens


def test_thinking_disabled_has_no_reasoning(client):
    r = client.chat.completions.create(
        model="glm5-scripted", messages=MESSAGES, tools=TOOLS, extra_body={"thinking": {"type": "disabled"}}, **GREEDY
    )
    assert r.choices[0].message.reasoning_content is None
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_completions_stream_and_not(client):
    r = client.completions.create(model="glm5-scripted", prompt="Once", **GREEDY)
    assert r.choices[0].text == " upon a time lived my python"
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="glm5-scripted", prompt="Once", stream=True, **GREEDY)
        if c.choices
    )
    assert streamed == r.choices[0].text


def test_cached_tokens_on_repeated_prefix(client):
    prefix = "def handler(event, context):\n    return {'status': 200}\n" * 12  # > 128 tokens
    first = client.completions.create(model="glm5-scripted", prompt=prefix + "Once", **GREEDY)
    second = client.completions.create(model="glm5-scripted", prompt=prefix + "# x\nOnce", **GREEDY)
    assert first.usage.prompt_tokens > 128
    assert second.usage.prompt_tokens_details.cached_tokens >= 128
    assert second.usage.prompt_tokens_details.cached_tokens % 64 == 0


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (json.dumps({"model": "gpt-4", "messages": MESSAGES}).encode(), 404, "model"),
        (json.dumps({"messages": MESSAGES, "max_tokens": "ten"}).encode(), 400, "max_tokens"),
        (json.dumps({"messages": MESSAGES, "max_tokens": -5}).encode(), 400, "max_tokens"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "messages.0.role"),
        (json.dumps({"messages": [{"role": "user", "content": "x " * 5000}]}).encode(), 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors_and_server_keeps_serving(server, client, body, status, param):
    r = httpx.post(f"{server}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    assert client.completions.create(model="glm5-scripted", prompt="Once", **GREEDY).choices[0].text


def _metric(server: str, name: str) -> float:
    text = httpx.get(f"{server}/metrics").text
    values = [
        float(m.group(1)) for m in re.finditer(rf"^glmserve:{name}\{{[^}}]*role=\"decode\"[^}}]*\}} (\S+)$", text, re.M)
    ]
    return sum(values)


def test_client_disconnect_aborts_and_frees_blocks(server, client):
    stream = client.completions.create(
        model="glm5-scripted", prompt="hello", max_tokens=3000, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if _metric(server, "num_requests_running") == 0 and _metric(server, "kv_cache_usage_perc") == 0:
            break
        time.sleep(0.5)
    assert _metric(server, "num_requests_running") == 0
    assert _metric(server, "kv_cache_usage_perc") == 0


def test_metrics_exported(server, client):
    client.completions.create(model="glm5-scripted", prompt="Once", **GREEDY)
    text = httpx.get(f"{server}/metrics").text
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prefix_cache_hits",
    ):
        assert f"glmserve:{name}" in text

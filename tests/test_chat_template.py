"""Our renderer against transformers' `apply_chat_template(..., tokenize=False)`, byte for byte."""

import copy
import json
from pathlib import Path

import pytest

from glmserve.model.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from glmserve.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CHECKPOINT = Path(__file__).resolve().parents[1] / "model" / "checkpoints" / "glm5-tiny"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo actuelle d'une ville — 天气",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "units": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "filters": {"type": "object"}}},
    },
}
CALL_ARGS = {"city": "Zürich", "days": 3, "flags": [1, "two", None], "opts": {"unit": "°C", "ok": True}}


def tool_call(name: str, arguments, call_id: str = "call_0") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_history(arguments) -> list[dict]:
    return [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call("get_weather", arguments)]},
        {"role": "tool", "tool_call_id": "call_0", "content": '{"temp": 21, "sky": "晴"}'},
    ]


# (case id, messages, tools, keyword arguments)
CASES = [
    ("single_user", [{"role": "user", "content": "Hello!"}], None, {}),
    (
        "system_multi_turn",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello. How can I help?"},
            {"role": "user", "content": "  Tell me a joke.\n"},
        ],
        None,
        {},
    ),
    (
        "reasoning_history_cleared",
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Add two and two.\n"},
            {"role": "user", "content": "And 3+3?"},
        ],
        None,
        {},
    ),
    (
        "reasoning_history_kept",
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Add two and two."},
            {"role": "user", "content": "And 3+3?"},
        ],
        None,
        {"clear_thinking": False},
    ),
    (
        "reasoning_inline_in_content_last_turn",
        [
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "<think>\nBecause.\n</think>\n\nThat is why."},
        ],
        None,
        {"add_generation_prompt": False},
    ),
    (
        "reasoning_alias_field",
        [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A", "reasoning": "thought under the 'reasoning' key"},
            {"role": "user", "content": "Q2"},
        ],
        None,
        {"clear_thinking": False},
    ),
    (
        "tools_with_call_and_result",
        tool_history(CALL_ARGS) + [{"role": "assistant", "content": "It is 21 °C and sunny."}],
        [WEATHER, SEARCH],
        {"add_generation_prompt": False},
    ),
    (
        "consecutive_tool_results",
        [
            {"role": "user", "content": "Weather in Paris and Rome, then search."},
            {
                "role": "assistant",
                "content": "Checking both.",
                "reasoning_content": "Two cities, two calls.",
                "tool_calls": [
                    tool_call("get_weather", {"city": "Paris"}, "a"),
                    tool_call("get_weather", {"city": "Rome", "days": 2}, "b"),
                    {"name": "search", "arguments": {"query": "news", "filters": {"lang": "it"}}},
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": "18"},
            {"role": "tool", "tool_call_id": "b", "content": "25"},
            {"role": "tool", "tool_call_id": "c", "content": "[]"},
        ],
        [WEATHER, SEARCH],
        {},
    ),
    ("thinking_disabled", [{"role": "user", "content": "Quick answer please."}], None, {"enable_thinking": False}),
    (
        "reasoning_effort",
        [{"role": "system", "content": "Think hard."}, {"role": "user", "content": "Prove it."}],
        [SEARCH],
        {"reasoning_effort": "high", "enable_thinking": True},
    ),
    (
        "content_parts_and_list_tool_content",
        [
            {"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "", "tool_calls": [tool_call("search", {"query": "x"})]},
            {"role": "tool", "content": [{"output": "result A"}, "result B"]},
        ],
        [SEARCH],
        {},
    ),
    (
        "no_generation_prompt",
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey 👋"}],
        None,
        {"add_generation_prompt": False},
    ),
]


@pytest.fixture(scope="module")
def reference_template(shared_dir) -> str:
    path = shared_dir / "data" / "glm5" / "chat_template.jinja"
    if not path.exists():
        pytest.fail(f"the reference template is missing at {path}", pytrace=False)
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(CHECKPOINT)


def hf_render(hf_tokenizer, messages, tools, kwargs, chat_template=None) -> str:
    return hf_tokenizer.apply_chat_template(
        copy.deepcopy(messages), tools=tools, chat_template=chat_template, tokenize=False, **kwargs
    )


def with_string_arguments(messages: list[dict]) -> list[dict]:
    """The same messages with tool-call arguments as JSON strings, as the OpenAI wire format sends them."""
    messages = copy.deepcopy(messages)
    for message in messages:
        for call in message.get("tool_calls", []):
            holder = call.get("function", call)
            holder["arguments"] = json.dumps(holder["arguments"], ensure_ascii=False)
    return messages


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_transformers(case, reference_template, hf_tokenizer, tokenizer):
    _, messages, tools, kwargs = case
    kwargs = {"add_generation_prompt": True, **kwargs}
    expected = hf_render(hf_tokenizer, messages, tools, kwargs, chat_template=reference_template)
    ours = ChatTemplate(reference_template, tokenizer.special_tokens_map)
    assert ours.render(copy.deepcopy(messages), tools=tools, **kwargs) == expected
    # transformers fails on string arguments ('str object' has no attribute 'items'); we parse them as vLLM does
    assert ours.render(with_string_arguments(messages), tools=tools, **kwargs) == expected


@pytest.mark.parametrize("case", CASES[::3], ids=[c[0] for c in CASES[::3]])
def test_checkpoint_template_matches_transformers(case, hf_tokenizer, tokenizer):
    """The checkpoint's own chat_template.jinja, as both libraries load it from the directory."""
    _, messages, tools, kwargs = case
    assert tokenizer.apply_chat_template(copy.deepcopy(messages), tools=tools, **kwargs) == hf_render(
        hf_tokenizer, messages, tools, {"add_generation_prompt": True, **kwargs}
    )


def test_checkpoint_template_is_the_reference(reference_template):
    assert (CHECKPOINT / "chat_template.jinja").read_text(encoding="utf-8") == reference_template


def test_rendered_prompt_tokenizes_to_specials(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    ids = tokenizer.encode(prompt)
    names = ["[gMASK]", "<sop>", "<|user|>"]
    assert ids[:3] == [tokenizer.token_to_id(t) for t in names]
    assert ids[-2:] == [tokenizer.token_to_id("<|assistant|>"), tokenizer.token_to_id("<think>")]


ENVIRONMENT_PROBE = (
    "{{ messages[0].content | tojson }}|{{ messages[0].content | tojson(ensure_ascii=True) }}|"
    "{{ tools | tojson(indent=2, sort_keys=True) }}|{{ strftime_now('%Y') }}|{{ eos_token }}|{{ pad_token }}|"
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
    "{% if m.role == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{{ m.role }}\n{% endfor %}"
    "  {% if true %}\n  trimmed{% endif %}\n{{ dict(a=1) | tojson }}{% generation %}<gen>{% endgeneration %}"
    "{{ extra_variable }}|{{ documents }}"
)


def test_environment_matches_transformers(hf_tokenizer, tokenizer):
    messages = [
        {"role": "system", "content": "<b>&'\"</b> é 中 🎉"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    kwargs = {"add_generation_prompt": False, "extra_variable": "xyz"}
    expected = hf_render(hf_tokenizer, messages, [SEARCH], kwargs, chat_template=ENVIRONMENT_PROBE)
    got = ChatTemplate(ENVIRONMENT_PROBE, tokenizer.special_tokens_map).render(messages, tools=[SEARCH], **kwargs)
    assert got == expected


def test_template_sandbox_and_errors(tokenizer):
    with pytest.raises(ChatTemplateError, match="boom"):
        ChatTemplate("{{ raise_exception('boom') }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}").render([])
    bad = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [tool_call("f", "{not json")]}]
    with pytest.raises(ChatTemplateError, match=r"messages\[1\]\.tool_calls\[0\]"):
        tokenizer.apply_chat_template(bad)
    with pytest.raises(ChatTemplateError, match="JSON object"):
        tokenizer.apply_chat_template([{"role": "assistant", "tool_calls": [tool_call("f", "[1, 2]")]}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% if %}")


def test_template_from_tokenizer_config(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "plain {{ messages | length }}"}))
    assert load_chat_template(tmp_path) == "plain {{ messages | length }}"
    config.write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]})
    )
    assert load_chat_template(tmp_path) == "d"
    (tmp_path / "chat_template.jinja").write_text("from file")
    assert load_chat_template(tmp_path) == "from file"  # the .jinja file wins, as in transformers
    assert load_chat_template(tmp_path / "missing") is None

"""Reasoning and tool-call parsers: hand-checked cases, then property tests (fixed seeds) that the streaming parsers,
fed the same text split at random points, agree exactly with the whole-text parsers."""

import json
import random
from pathlib import Path

import pytest

from glmserve.api.reasoning_parser import ReasoningStreamParser, split_reasoning
from glmserve.api.tool_parser import ToolCallStreamParser, parse_tool_calls

CHECKPOINT = Path(__file__).resolve().parents[1] / "model" / "checkpoints" / "glm5-tiny"


def random_pieces(text: str, rng: random.Random) -> list[str]:
    """`text` cut at random points (sometimes every character, sometimes not at all, empty pieces included)."""
    mode = rng.random()
    if mode < 0.15:
        return list(text)
    if mode < 0.2:
        return [text]
    cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(1, max(1, len(text) // 2))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


# --- reasoning


@pytest.mark.parametrize(
    ("text", "starts_in_reasoning", "expected"),
    [
        ("Let me think.</think>The answer is 4.", True, ("Let me think.", "The answer is 4.")),
        ("<think>Repeated open tag.</think>Done", True, ("Repeated open tag.", "Done")),
        ("</think>Nothing to think.", True, ("", "Nothing to think.")),
        ("Cut off mid-thought <", True, ("Cut off mid-thought <", "")),
        ("a</think>b</think>c", True, ("a", "b</think>c")),
        ("x <think> y", True, ("x <think> y", "")),
        ("Plain answer </think> <think>", False, (None, "Plain answer </think> <think>")),
        ("", True, ("", "")),
    ],
)
def test_split_reasoning(text, starts_in_reasoning, expected):
    assert split_reasoning(text, starts_in_reasoning) == expected


def stream_reasoning(pieces: list[str], starts_in_reasoning: bool) -> tuple[str, str]:
    parser = ReasoningStreamParser(starts_in_reasoning)
    outputs = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    return "".join(r for r, _ in outputs), "".join(c for _, c in outputs)


def test_reasoning_stream_matches_whole_text_on_random_splits():
    rng = random.Random(1234)
    atoms = ["<think>", "</think>", "<", "</", "think", ">", "</th", "<thi", "a", "b c", "\n", "é", "好", "/"]
    texts = [
        "Let me think.</think>The answer is 4.",
        "<think>Repeated.</think>Done",
        "<thi",
        "</thin",
        "<think></think>",
    ] + ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 25))) for _ in range(300)]
    for text in texts:
        for starts_in_reasoning in (True, False):
            reasoning, content = split_reasoning(text, starts_in_reasoning)
            for _ in range(8):
                streamed = stream_reasoning(random_pieces(text, rng), starts_in_reasoning)
                assert streamed == (reasoning or "", content), (text, starts_in_reasoning)


def test_reasoning_stream_holds_back_only_possible_tags():
    parser = ReasoningStreamParser(starts_in_reasoning=True)
    assert parser.feed("<thi") == ("", "")  # may be a repeated <think>
    assert parser.feed("nk>Step 1") == ("Step 1", "")
    assert parser.feed(" then </thi") == (" then ", "")
    assert parser.in_reasoning
    assert parser.feed("nk>Ans") == ("", "Ans")
    assert not parser.in_reasoning
    assert parser.feed("wer </think>") == ("", "wer </think>")  # content is never parsed again
    assert parser.finish() == ("", "")
    plain = ReasoningStreamParser(starts_in_reasoning=False)
    assert plain.feed("<think>x") == ("", "<think>x")


# --- tool calls: hand-checked cases

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "note": {"type": ["string", "null"]},
                "options": {"type": "object"},
            },
        },
    },
}


def calls_as_objects(calls) -> list[tuple[str, dict]]:
    return [(call.name, json.loads(call.arguments)) for call in calls]


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ("No tools needed.\n", "No tools needed.\n", []),
        (
            "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
            "",
            [("get_weather", {"city": "Paris"})],
        ),
        (
            "Checking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Saint-Étienne</arg_value>\n"
            "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n",
            "Checking.",
            [("get_weather", {"city": "Saint-Étienne", "days": 3})],
        ),
        (  # a string parameter keeps digits and JSON-looking text as text
            "<tool_call>get_weather<arg_key>city</arg_key><arg_value>123</arg_value>"
            '<arg_key>note</arg_key><arg_value>{"a": 1}</arg_value></tool_call>',
            "",
            [("get_weather", {"city": "123", "note": '{"a": 1}'})],
        ),
        (  # non-string values are JSON; a non-JSON value (or NaN) is passed on as text
            "<tool_call>get_weather<arg_key>days</arg_key><arg_value>three</arg_value>"
            '<arg_key>options</arg_key><arg_value>{"unit": "°C", "list": [1, null]}</arg_value>'
            "<arg_key>extra</arg_key><arg_value>NaN</arg_value><arg_key>flag</arg_key><arg_value>true</arg_value>"
            "</tool_call>",
            "",
            [
                (
                    "get_weather",
                    {"days": "three", "options": {"unit": "°C", "list": [1, None]}, "extra": "NaN", "flag": True},
                )
            ],
        ),
        (
            "<tool_call>ping</tool_call>\n\n<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value>"
            "</tool_call> and that is all",
            "and that is all",
            [("ping", {}), ("get_weather", {"city": "Oslo"})],
        ),
        (  # a value runs to </arg_value> whatever it contains; a key without a value is dropped
            "<tool_call>get_weather<arg_key>city</arg_key><arg_value>a</tool_call>b</arg_value>"
            "<arg_key>lost</arg_key></tool_call>",
            "",
            [("get_weather", {"city": "a</tool_call>b"})],
        ),
        (  # cut off inside a call: the raw text stays content
            "Sure. <tool_call>get_weather<arg_key>city</arg_key><arg_value>Par",
            "Sure.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Par",
            [],
        ),
    ],
)
def test_parse_tool_calls(text, content, calls):
    parsed_content, parsed_calls = parse_tool_calls(text, [WEATHER_TOOL])
    assert parsed_content == content
    assert calls_as_objects(parsed_calls) == calls
    for call in parsed_calls:
        assert call.arguments == json.dumps(json.loads(call.arguments), ensure_ascii=False)
        assert call.id.startswith("call_")
    assert len({call.id for call in parsed_calls}) == len(parsed_calls)


# --- tool calls: generated texts, whole vs streamed

# pieces of string values: escapes, tag look-alikes, non-ASCII (also outside the BMP)
STRING_ALPHABET = ['"', "\\", "\n", "\t", "<", ">", "/", "</arg_val", "<arg_", "</tool", "é", "好", "😀", "a", " ", "{"]
WORDS = ["Sure.", "Let me check", "the weather", "ok", "好的", "<b>", "a < b", "</tool", "<tool_cal"]


def random_json_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 2 else 5)
    if kind == 0:
        return rng.randint(-(10**12), 10**12)
    if kind == 1:
        return rng.uniform(-1e6, 1e6)
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return "".join(rng.choice(STRING_ALPHABET) for _ in range(rng.randint(0, 6)))
    if kind == 4:
        return rng.randint(0, 9)
    if kind == 5:
        return [random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}": random_json_value(rng, depth + 1) for i in range(rng.randint(0, 3))}


def random_tool_call(rng: random.Random, tools: dict[str, dict[str, str]]) -> tuple[str, str, dict]:
    """A call rendered as GLM's template writes it (raw text for string parameters, JSON otherwise), with random
    whitespace where the format allows it; returns (text, name, arguments)."""
    name = rng.choice(sorted(tools))
    arguments = {}
    for key, kind in tools[name].items():
        if rng.random() < 0.7:
            arguments[key] = (
                "".join(rng.choice(STRING_ALPHABET) for _ in range(rng.randint(0, 40)))
                if kind == "string"
                else random_json_value(rng)
            )
    if rng.random() < 0.3:  # a parameter the schema does not know: JSON, as for non-strings
        arguments["unlisted"] = random_json_value(rng)
        if isinstance(arguments["unlisted"], str):
            arguments["unlisted"] = [arguments["unlisted"]]

    def space() -> str:
        return rng.choice(["", "", "\n", " ", "\n\n"])

    text = "<tool_call>" + space() + name + space()
    for key, value in arguments.items():
        encoded = value if tools[name].get(key) == "string" else json.dumps(value, ensure_ascii=False)
        text += f"<arg_key>{key}</arg_key>{space()}<arg_value>{encoded}</arg_value>{space()}"
    return text + "</tool_call>", name, arguments


GENERATED_TOOLS = {
    "search": {"query": "string", "limit": "integer", "filters": "object"},
    "write_file": {"path": "string", "content": "string", "append": "boolean"},
    "noop": {},
}


def tools_schema(tools: dict[str, dict[str, str]]) -> list[dict]:
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "parameters": {"type": "object", "properties": {key: {"type": kind} for key, kind in params.items()}},
            },
        }
        for name, params in tools.items()
    ]


def random_output(rng: random.Random) -> tuple[str, str, list[tuple[str, dict]]]:
    """(text, expected content, expected calls): content words around calls; whitespace touching a call is not
    content, trailing whitespace after the last word is."""
    words = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 3)))  # noqa: E731
    text, content, calls = "", "", []
    for _ in range(rng.randint(0, 3)):
        piece = words()
        text += piece + rng.choice(["", "\n", " \n "])
        content += piece
        call_text, name, arguments = random_tool_call(rng, GENERATED_TOOLS)
        text += call_text + rng.choice(["", "\n", "\n\n"])
        calls.append((name, arguments))
    piece = words()
    tail = rng.choice(["", "\n"]) if piece else ""
    return text + piece + tail, content + piece + tail, calls


def stream_tool_calls(pieces: list[str], tools: list[dict], stream_arguments: bool):
    parser = ToolCallStreamParser(tools, stream_arguments)
    outputs = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    content = "".join(out.content for out in outputs)
    deltas = [delta for out in outputs for delta in out.tool_calls]
    return content, deltas, parser.tool_calls


def check_streamed_calls(deltas, parsed_calls, stream_arguments: bool) -> None:
    by_index: dict[int, list] = {}
    for delta in deltas:
        by_index.setdefault(delta.index, []).append(delta)
    assert sorted(by_index) == list(range(len(parsed_calls)))
    assert [d.index for d in deltas] == sorted(d.index for d in deltas)  # calls stream one after another
    for index, call in enumerate(parsed_calls):
        first, *rest = by_index[index]
        assert first.name == call.name and first.id.startswith("call_")
        assert all(d.id is None and d.name is None for d in rest)
        arguments = "".join(d.arguments for d in by_index[index])
        assert arguments == call.arguments  # exactly the non-streamed string
        if not stream_arguments:
            assert rest == []


def test_generated_outputs_parse_to_what_was_rendered():
    rng = random.Random(2024)
    tools = tools_schema(GENERATED_TOOLS)
    for _ in range(400):
        text, content, calls = random_output(rng)
        parsed_content, parsed_calls = parse_tool_calls(text, tools)
        assert parsed_content == content, text
        assert calls_as_objects(parsed_calls) == calls, text
        for call, (_, arguments) in zip(parsed_calls, calls, strict=True):
            assert call.arguments == json.dumps(arguments, ensure_ascii=False)


@pytest.mark.parametrize("stream_arguments", [True, False])
def test_tool_stream_matches_whole_text_on_random_splits(stream_arguments):
    rng = random.Random(7 + stream_arguments)
    tools = tools_schema(GENERATED_TOOLS)
    for _ in range(150):
        text, _, _ = random_output(rng)
        content, parsed_calls = parse_tool_calls(text, tools)
        for _ in range(6):
            streamed_content, deltas, finished = stream_tool_calls(random_pieces(text, rng), tools, stream_arguments)
            assert streamed_content == content, text
            check_streamed_calls(deltas, parsed_calls, stream_arguments)
            assert [(c.name, c.arguments) for c in finished] == [(c.name, c.arguments) for c in parsed_calls]


def test_truncated_call_when_streamed():
    text = "Sure. <tool_call>get_weather<arg_key>city</arg_key><arg_value>Par"
    content, _ = parse_tool_calls(text, [WEATHER_TOOL])
    rng = random.Random(5)
    for _ in range(30):
        pieces = random_pieces(text, rng)
        streamed_content, deltas, finished = stream_tool_calls(pieces, [WEATHER_TOOL], stream_arguments=False)
        assert (streamed_content, deltas, finished) == (content, [], [])
        # with tool_stream the call was already announced: it stays incomplete, nothing becomes content
        streamed_content, deltas, finished = stream_tool_calls(pieces, [WEATHER_TOOL], stream_arguments=True)
        assert streamed_content == "Sure." and finished == []
        assert deltas[0].name == "get_weather" and "".join(d.arguments for d in deltas) == '{"city": "Par'


def test_tool_stream_is_incremental():
    """Arguments of a string parameter flow while the value is still being generated; content is not held."""
    parser = ToolCallStreamParser([WEATHER_TOOL], stream_arguments=True)
    assert parser.feed("I'll look").content == "I'll look"
    assert parser.feed(" it up <tool").content == " it up"  # the space may precede a call: held
    out = parser.feed("_call>get_weather<arg_key>city</arg_key><arg_value>Rio")
    assert out.content == ""
    assert [(d.index, d.name, d.arguments) for d in out.tool_calls] == [(0, "get_weather", '{"city": "Rio')]
    assert parser.feed(' de "Jan').tool_calls[0].arguments == ' de \\"Jan'
    assert parser.feed("eiro</arg_val").tool_calls[0].arguments == "eiro"  # the partial end tag is held back
    assert parser.feed("ue><arg_key>days</arg_key><arg_value>1").tool_calls[0].arguments == '", "days": '
    assert parser.feed("4</arg_value></tool_call>").tool_calls[0].arguments == "14}"
    assert json.loads(parser.tool_calls[0].arguments) == {"city": 'Rio de "Janeiro', "days": 14}
    assert parser.finish().content == ""


def test_template_rendered_calls_parse_back():
    """The checkpoint's own template writes the calls; the parser must read back the same arguments."""
    chat_template = pytest.importorskip("glmserve.model.chat_template")
    if not (CHECKPOINT / "chat_template.jinja").is_file():
        pytest.skip("no chat template in the embedded checkpoint")
    template = chat_template.ChatTemplate.from_pretrained(CHECKPOINT)
    rng = random.Random(99)
    tools = tools_schema(GENERATED_TOOLS)
    for _ in range(50):
        calls = [random_tool_call(rng, GENERATED_TOOLS)[1:] for _ in range(rng.randint(1, 3))]
        history = [
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": name, "arguments": arguments}} for name, arguments in calls],
            },
        ]
        prompt = template.render(history, tools=tools, add_generation_prompt=False)
        generated = prompt[prompt.index("<tool_call>", prompt.index("<|assistant|>")) :]
        content, parsed = parse_tool_calls(generated, tools)
        assert content == "" and calls_as_objects(parsed) == calls


def test_reasoning_then_tools_pipeline():
    """How the server chains them: reasoning first, then tool calls in the content."""
    call = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Lima</arg_value></tool_call>"
    text = "Need weather.</think>Checking." + call
    reasoning, answer = split_reasoning(text, starts_in_reasoning=True)
    content, calls = parse_tool_calls(answer, [WEATHER_TOOL])
    rng = random.Random(3)
    for _ in range(50):
        thinking, tools = ReasoningStreamParser(True), ToolCallStreamParser([WEATHER_TOOL], stream_arguments=True)
        streamed_reasoning, streamed_content, arguments = "", "", ""
        for piece in [*random_pieces(text, rng), None]:
            r, c = thinking.feed(piece) if piece is not None else thinking.finish()
            out = tools.feed(c)
            if piece is None:
                extra = tools.finish()
                out.content += extra.content
                out.tool_calls += extra.tool_calls
            streamed_reasoning += r
            streamed_content += out.content
            arguments += "".join(d.arguments for d in out.tool_calls)
        assert (streamed_reasoning, streamed_content, arguments) == (reasoning, content, calls[0].arguments)

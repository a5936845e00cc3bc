"""Parse GLM tool calls out of generated text, whole or streamed.

GLM writes a call as (see the checkpoint's chat_template.jinja)

    <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>

possibly several, possibly with newlines between the parts. V is raw text when the tool's JSON schema types the
parameter as a string, and JSON otherwise (kept as the raw string when it is not valid JSON). A call's `arguments`
is the JSON object text `{"K": V, ...}` built pair by pair in the order generated, exactly as `json.dumps` of the
dict would write it; the streaming parser emits the same text in fragments, so the fragments of one call
concatenate to the non-streamed string.

Grammar shared by both parsers (they must agree on malformed text too):
- the name runs to the first `<arg_key>` or `</tool_call>` and is stripped of whitespace;
- anything between pairs that is not a tag is ignored; a key is stripped; a key not followed by `<arg_value>`
  (another `<arg_key>` or `</tool_call>` comes first) is dropped;
- a value runs to the next `</arg_value>`, whatever it contains;
- whitespace right before a `<tool_call>` and right after a `</tool_call>` is not content;
- a call the output ends inside (cut off by max_tokens) is returned as raw content text. A streaming parser
  with `stream_arguments` has already sent that call's first fragments, so there it is left incomplete.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .tag_scan import find_first_tag, partial_tag_length

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
ARG_KEY_START = "<arg_key>"
ARG_KEY_END = "</arg_key>"
ARG_VALUE_START = "<arg_value>"
ARG_VALUE_END = "</arg_value>"
_TAGS = (TOOL_CALL_START, TOOL_CALL_END, ARG_KEY_START, ARG_KEY_END, ARG_VALUE_START, ARG_VALUE_END)
_LONGEST_TAG = max(map(len, _TAGS))


@dataclass
class ToolCall:
    """One finished call: `arguments` is JSON object text, as OpenAI's `function.arguments`."""

    id: str
    name: str
    arguments: str


@dataclass
class ToolCallDelta:
    """A piece of `delta.tool_calls[i]`: the first for an index carries id and name, later ones only arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolParserOutput:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def string_parameters(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, set[str]]:
    """For each tool name (OpenAI tool dicts), the parameters whose schema type is string: their values are raw."""
    result: dict[str, set[str]] = {}
    for tool in tools or ():
        function = tool.get("function", tool)
        properties = (function.get("parameters") or {}).get("properties") or {}
        result[function["name"]] = {name for name, schema in properties.items() if _is_string_schema(schema)}
    return result


def _is_string_schema(schema: Any) -> bool:
    if not isinstance(schema, Mapping):
        return False
    types = schema.get("type")
    if isinstance(types, list):  # ["string", "null"] is still written raw by the template
        return [t for t in types if t != "null"] == ["string"]
    return types == "string"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN / Infinity: json.loads accepts them, JSON parsers do not


def encode_argument_value(raw: str, is_string: bool) -> str:
    """The JSON text of one argument value."""
    if not is_string:
        try:
            return json.dumps(json.loads(raw, parse_constant=_reject_constant), ensure_ascii=False)
        except ValueError:
            pass  # the model wrote a non-JSON value for a non-string parameter: pass it on as text
    return json.dumps(raw, ensure_ascii=False)


def _escape_string_chunk(raw: str) -> str:
    """JSON string escaping of a piece of a string value; escaping is per character, so pieces concatenate."""
    return json.dumps(raw, ensure_ascii=False)[1:-1]


def _encode_key(key: str, first: bool) -> str:
    return ("{" if first else ", ") + json.dumps(key, ensure_ascii=False) + ": "


def parse_tool_calls(text: str, tools: Sequence[Mapping[str, Any]] | None) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a finished output."""
    raw_params = string_parameters(tools)
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while True:
        start = text.find(TOOL_CALL_START, pos)
        segment = text[pos:] if start < 0 else text[pos:start]
        if calls:
            segment = segment.lstrip()
        if start < 0:
            content.append(segment)
            break
        content.append(segment.rstrip())
        call, end = _parse_call(text, start + len(TOOL_CALL_START), raw_params)
        if call is None:
            content.append(text[start:])
            break
        calls.append(call)
        pos = end
    return "".join(content), calls


def _parse_call(text: str, pos: int, raw_params: dict[str, set[str]]) -> tuple[ToolCall | None, int]:
    """The call whose body starts at `pos`, and the position after its `</tool_call>`; None if unterminated."""
    name_end, _ = find_first_tag(text, (ARG_KEY_START, TOOL_CALL_END), pos)
    if name_end < 0:
        return None, len(text)
    name = text[pos:name_end].strip()
    string_keys = raw_params.get(name, set())
    pairs: list[str] = []
    pos = name_end
    while True:
        tag_pos, tag = find_first_tag(text, (ARG_KEY_START, TOOL_CALL_END), pos)
        if tag_pos < 0:
            return None, len(text)
        if tag == TOOL_CALL_END:
            break
        key_start = tag_pos + len(ARG_KEY_START)
        key_end = text.find(ARG_KEY_END, key_start)
        if key_end < 0:
            return None, len(text)
        key = text[key_start:key_end].strip()
        pos = key_end + len(ARG_KEY_END)
        tag_pos, tag = find_first_tag(text, (ARG_VALUE_START, ARG_KEY_START, TOOL_CALL_END), pos)
        if tag_pos < 0:
            return None, len(text)
        if tag != ARG_VALUE_START:  # a key without a value
            pos = tag_pos
            continue
        value_start = tag_pos + len(ARG_VALUE_START)
        value_end = text.find(ARG_VALUE_END, value_start)
        if value_end < 0:
            return None, len(text)
        value = encode_argument_value(text[value_start:value_end], key in string_keys)
        pairs.append(_encode_key(key, first=not pairs) + value)
        pos = value_end + len(ARG_VALUE_END)
    arguments = "".join(pairs) + "}" if pairs else "{}"
    return ToolCall(new_tool_call_id(), name, arguments), tag_pos + len(TOOL_CALL_END)


class _State(enum.Enum):
    CONTENT = enum.auto()  # outside calls
    NAME = enum.auto()  # after <tool_call>, reading the name
    PAIRS = enum.auto()  # between pairs: waiting for <arg_key> or </tool_call>
    KEY = enum.auto()  # inside <arg_key>
    BEFORE_VALUE = enum.auto()  # after </arg_key>: waiting for <arg_value>
    VALUE = enum.auto()  # inside <arg_value>


@dataclass
class _OpenCall:
    index: int
    id: str
    name: str
    arguments: str = ""
    key: str = ""
    value_is_string: bool = False


class ToolCallStreamParser:
    """Feed content deltas (split anywhere); get content deltas and tool-call deltas back.

    stream_arguments=True (Z.AI `tool_stream`): a call's first delta carries index, id and name as soon as the name
    is complete; then argument fragments follow as they become known: `{"key": ` when a value starts, a string
    value's escaped text piece by piece, a non-string value whole when it ends, `}` at `</tool_call>`.
    stream_arguments=False: one delta per call, with its full arguments, when `</tool_call>` arrives.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None, stream_arguments: bool):
        self._raw_params = string_parameters(tools)
        self._stream_arguments = stream_arguments
        self._state = _State.CONTENT
        self._buffer = ""  # received, not yet consumed
        self._scan_from = 0  # no tag starts in the buffer before this (saves rescanning a growing buffer)
        self._call: _OpenCall | None = None
        self._call_text = ""  # raw text of the open call, returned as content if the output ends inside it
        self._pending_whitespace = ""  # content whitespace that is dropped if a <tool_call> follows
        self._after_call = False  # content whitespace here follows a </tool_call> and is dropped
        self.tool_calls: list[ToolCall] = []  # finished calls, for finish_reason and the final message

    def feed(self, delta: str) -> ToolParserOutput:
        out = ToolParserOutput()
        self._buffer += delta
        while self._step(out):
            pass
        return out

    def finish(self) -> ToolParserOutput:
        """Flush at the end of the output."""
        out = ToolParserOutput()
        if self._state is _State.CONTENT:
            self._emit_content(out, self._buffer, before_call=False)
            out.content += self._pending_whitespace
        elif not self._stream_arguments:
            out.content += self._call_text + self._buffer
        self._buffer, self._scan_from, self._pending_whitespace, self._call_text = "", 0, "", ""
        self._call, self._state = None, _State.CONTENT
        return out

    def _step(self, out: ToolParserOutput) -> bool:
        """Consume what the buffer allows in the current state; False when more text is needed."""
        match self._state:
            case _State.CONTENT:
                return self._step_content(out)
            case _State.NAME:
                return self._step_name(out)
            case _State.PAIRS:
                return self._step_pairs(out)
            case _State.KEY:
                return self._step_key()
            case _State.BEFORE_VALUE:
                return self._step_before_value(out)
            case _State.VALUE:
                return self._step_value(out)

    def _step_content(self, out: ToolParserOutput) -> bool:
        start = self._buffer.find(TOOL_CALL_START)
        if start < 0:
            keep = partial_tag_length(self._buffer, TOOL_CALL_START)
            self._emit_content(out, self._buffer[: len(self._buffer) - keep], before_call=False)
            self._buffer = self._buffer[len(self._buffer) - keep :]
            return False
        self._emit_content(out, self._buffer[:start], before_call=True)
        self._buffer = self._buffer[start:]
        self._call_text = ""
        self._take(len(TOOL_CALL_START))
        self._state = _State.NAME
        return True

    def _emit_content(self, out: ToolParserOutput, segment: str, before_call: bool) -> None:
        if self._after_call:
            segment = segment.lstrip()
            self._after_call = not segment
        text = self._pending_whitespace + segment
        kept = text.rstrip()
        out.content += kept
        self._pending_whitespace = "" if before_call else text[len(kept) :]

    def _step_name(self, out: ToolParserOutput) -> bool:
        end, _ = self._find((ARG_KEY_START, TOOL_CALL_END))
        if end < 0:
            return False
        name = self._take(end).strip()
        self._call = _OpenCall(index=len(self.tool_calls), id=new_tool_call_id(), name=name)
        if self._stream_arguments:
            out.tool_calls.append(ToolCallDelta(self._call.index, id=self._call.id, name=name))
        self._state = _State.PAIRS
        return True

    def _step_pairs(self, out: ToolParserOutput) -> bool:
        pos, tag = self._find((ARG_KEY_START, TOOL_CALL_END))
        if pos < 0:
            return False
        self._take(pos + len(tag))
        if tag == ARG_KEY_START:
            self._state = _State.KEY
            return True
        self._close_call(out)
        return True

    def _step_key(self) -> bool:
        end, _ = self._find((ARG_KEY_END,))
        if end < 0:
            return False
        self._call.key = self._take(end).strip()
        self._take(len(ARG_KEY_END))
        self._state = _State.BEFORE_VALUE
        return True

    def _step_before_value(self, out: ToolParserOutput) -> bool:
        pos, tag = self._find((ARG_VALUE_START, ARG_KEY_START, TOOL_CALL_END))
        if pos < 0:
            return False
        if tag != ARG_VALUE_START:  # a key without a value: dropped, the tag is handled between pairs
            self._take(pos)
            self._state = _State.PAIRS
            return True
        self._take(pos + len(tag))
        call = self._call
        call.value_is_string = call.key in self._raw_params.get(call.name, set())
        fragment = _encode_key(call.key, first=not call.arguments)
        self._emit_arguments(out, fragment + '"' if call.value_is_string else fragment)
        self._state = _State.VALUE
        return True

    def _step_value(self, out: ToolParserOutput) -> bool:
        call = self._call
        end, _ = self._find((ARG_VALUE_END,))
        if end < 0:
            if call.value_is_string:  # stream the value's text, holding back what may start </arg_value>
                ready = len(self._buffer) - partial_tag_length(self._buffer, ARG_VALUE_END)
                if ready:
                    self._emit_arguments(out, _escape_string_chunk(self._take(ready)))
            return False
        raw = self._take(end)
        self._take(len(ARG_VALUE_END))
        if call.value_is_string:
            self._emit_arguments(out, _escape_string_chunk(raw) + '"')
        else:
            self._emit_arguments(out, encode_argument_value(raw, is_string=False))
        self._state = _State.PAIRS
        return True

    def _close_call(self, out: ToolParserOutput) -> None:
        call = self._call
        self._emit_arguments(out, "}" if call.arguments else "{}")
        self.tool_calls.append(ToolCall(call.id, call.name, call.arguments))
        if not self._stream_arguments:
            out.tool_calls.append(ToolCallDelta(call.index, id=call.id, name=call.name, arguments=call.arguments))
        self._call, self._call_text = None, ""
        self._after_call = True
        self._state = _State.CONTENT

    def _emit_arguments(self, out: ToolParserOutput, fragment: str) -> None:
        call = self._call
        call.arguments += fragment
        if not self._stream_arguments:
            return
        last = out.tool_calls[-1] if out.tool_calls else None
        if last is not None and last.index == call.index:  # one delta per call and feed is enough
            last.arguments += fragment
        else:
            out.tool_calls.append(ToolCallDelta(call.index, arguments=fragment))

    def _find(self, tags: Sequence[str]) -> tuple[int, str]:
        pos, tag = find_first_tag(self._buffer, tags, self._scan_from)
        if pos < 0:
            self._scan_from = max(0, len(self._buffer) - _LONGEST_TAG + 1)
        return pos, tag

    def _take(self, n: int) -> str:
        """Consume n buffered characters of the open call."""
        taken, self._buffer = self._buffer[:n], self._buffer[n:]
        self._call_text += taken
        self._scan_from = 0
        return taken

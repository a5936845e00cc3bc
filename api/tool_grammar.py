"""Grammars (llguidance's Lark) over GLM-5's tool-call text, for a forced `tool_choice` and for `"none"`.

A call is written as the chat template and `tool_parser` read it:

    <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>

The grammar lets the model write only calls of the allowed functions, each with its declared parameters in the
declared order (the required ones always, the optional ones or not), each value following the parameter's schema:
a parameter typed as a string is written raw, as the template does (any text without `</arg_value>`, or its enum,
pattern, length or format); any other is JSON of its schema (compact, `json.dumps` separators), so the parsed
`arguments` always validate against the function's `parameters`. A function with no declared properties takes any
keys with JSON values. `parallel=False` allows exactly one call, else one or more, back to back as the template
writes them. A schema keyword a raw string cannot be held to is refused (`ToolGrammarError`), not ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from llguidance import regex_to_lark

from glmserve.engine.grammar import closed_objects

from .tool_parser import (
    ARG_KEY_END,
    ARG_KEY_START,
    ARG_VALUE_END,
    ARG_VALUE_START,
    TOOL_CALL_END,
    TOOL_CALL_START,
    _is_string_schema,
)

# JSON values inside a call: as the template's `tojson` writes them
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# raw string values end at the first </arg_value>, which they cannot contain
_NO_VALUE_END = r"~/(?s:.*)<\/arg_value>(?s:.*)/"
# string formats a raw value is held to (the JSON-schema formats tool definitions use most)
_FORMATS = {
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "time": r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?",
    "date-time": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]:"
    r"([0-5][0-9]|60)(\.[0-9]+)?(Z|z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+",
}
# keywords of a string parameter's schema that carry no constraint on a raw value
_ANNOTATIONS = {"type", "description", "title", "default", "examples", "$comment", "deprecated", "readOnly"}


class ToolGrammarError(ValueError):
    """A tool's parameter schema cannot be enforced on GLM's tool-call text."""


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a Lark string literal


class _Builder:
    def __init__(self) -> None:
        self.rules: list[str] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def add(self, rule: str) -> None:
        self.rules.append(rule)

    def json_value(self, schema: Mapping[str, Any], defs: Mapping[str, Any], strict: bool = True) -> str:
        rule = self.name("json")
        # objects that declare properties take no others, as for response_format (engine.structured_outputs)
        inline = closed_objects({**defs, **schema, "x-guidance": {**_JSON_OPTIONS, "lenient": not strict}})
        self.add(f"{rule}: %json {json.dumps(inline, ensure_ascii=False)}")
        return rule

    def raw_string(self, schema: Mapping[str, Any], where: str) -> str:
        """A rule for a raw string value and its closing `</arg_value>`: one terminal, end tag included (a value
        terminal that could still grow at `<` would not end at the tag)."""
        rule = self.name("str")
        unknown = set(schema) - _ANNOTATIONS - {"enum", "const", "pattern", "minLength", "maxLength", "format"}
        if unknown:
            raise ToolGrammarError(f"{where}: {', '.join(sorted(unknown))} cannot be enforced on a raw string value")
        end = f"/{regex_to_lark(ARG_VALUE_END)}/"
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else list(schema["enum"])
            if not values or not all(isinstance(v, str) for v in values):
                raise ToolGrammarError(f"{where}: a string parameter's enum must list strings")
            self.add(f"{rule.upper()}: ({' | '.join(_literal(v) for v in values)}) {end}")
            self.add(f"{rule}: {rule.upper()}")
            return rule
        parts = []
        if "pattern" in schema:
            parts.append(_search_regex(schema["pattern"], where))
        if "format" in schema:
            regex = _FORMATS.get(schema["format"])
            if regex is None:
                raise ToolGrammarError(f"{where}: format {schema['format']!r} is not supported for a raw string")
            parts.append(f"/{regex}/")
        if "minLength" in schema or "maxLength" in schema:
            low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
            parts.append(f"/(?s:.){{{low},{'' if high is None else int(high)}}}/")
        body = " & ".join([*(parts or ["/(?s:.*)/"]), _NO_VALUE_END])
        self.add(f"{rule.upper()}: ({body}) {end}")
        self.add(f"{rule}: {rule.upper()}")
        return rule

    def value(self, schema: Any, defs: Mapping[str, Any], where: str) -> str:
        if not isinstance(schema, Mapping):
            raise ToolGrammarError(f"{where}: a parameter schema must be an object")
        if _is_string_schema(schema):
            return self.raw_string(schema, where)
        rule = self.name("val")
        self.add(f"{rule}: {self.json_value(schema, defs)} {_literal(ARG_VALUE_END)}")
        return rule

    def function(self, function: Mapping[str, Any]) -> str:
        name = function["name"]
        parameters = function.get("parameters") or {}
        defs = {key: parameters[key] for key in ("$defs", "definitions") if key in parameters}
        properties = parameters.get("properties") or {}
        required = set(parameters.get("required") or ())
        rule = self.name("call")
        if not properties:  # free-form: any keys, JSON values
            free = self.name("arg")
            self.add(f"{free}: {_literal(ARG_KEY_START)} /[^<]+/ {_literal(ARG_KEY_END + ARG_VALUE_START)} "
                     f"{self.json_value({}, {})} {_literal(ARG_VALUE_END)}")  # fmt: skip
            self.add(f"{rule}: {_literal(TOOL_CALL_START + name)} {free}* {_literal(TOOL_CALL_END)}")
            return rule
        missing = required - set(properties)
        if missing:
            raise ToolGrammarError(f"function {name!r}: required {sorted(missing)} are not among its properties")
        args = []
        for key, schema in properties.items():
            value = self.value(schema, defs, f"function {name!r}, parameter {key!r}")
            arg = self.name("arg")
            self.add(f"{arg}: {_literal(ARG_KEY_START + key + ARG_KEY_END + ARG_VALUE_START)} {value}")
            args.append(arg if key in required else f"{arg}?")
        self.add(f"{rule}: {_literal(TOOL_CALL_START + name)} {' '.join(args)} {_literal(TOOL_CALL_END)}")
        return rule


def _search_regex(pattern: str, where: str) -> str:
    """A JSON-schema pattern (it matches anywhere in the value unless anchored) as a whole-value Lark regex."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise ToolGrammarError(f"{where}: pattern is not a valid regex ({e})") from None
    start = pattern.startswith("^")
    end = pattern.endswith("$") and not pattern.endswith("\\$")
    core = pattern[1 if start else 0 : len(pattern) - 1 if end else len(pattern)]
    body = ("" if start else "(?s:.*)") + f"(?:{core})" + ("" if end else "(?s:.*)")
    return f"/{regex_to_lark(body)}/"


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]],
    names: Sequence[str] | None = None,
    parallel: bool = True,
    json_alternative: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> str:
    """A Lark grammar of one call (`parallel=False`) or several, of the functions named (all when None) among
    `tools` (OpenAI tool dicts). `json_alternative`: a JSON schema the whole output may follow instead (a
    `response_format` next to `tool_choice: "auto"`; `strict=False` drops its keywords the library cannot
    enforce)."""
    builder = _Builder()
    functions = [tool.get("function", tool) for tool in tools]
    chosen = [f for f in functions if names is None or f["name"] in names]
    calls = [builder.function(f) for f in chosen]
    builder.add(f"call: {' | '.join(calls)}")
    start = "call" if not parallel else "call+"
    if json_alternative is not None:
        start = f"({start}) | {builder.json_value(json_alternative, {}, strict)}"
    return "\n".join([f"start: {start}", *builder.rules])


def no_tool_call_grammar() -> str:
    """Any text without a `<tool_call>` (tool_choice "none")."""
    return f"start: TEXT\nTEXT: /(?s:.*)/ & ~/(?s:.*){regex_to_lark(TOOL_CALL_START)}(?s:.*)/"

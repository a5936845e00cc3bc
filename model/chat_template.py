"""Render a checkpoint's Jinja chat template exactly as transformers' `apply_chat_template(..., tokenize=False)` does.

Same environment (sandboxed, `trim_blocks`/`lstrip_blocks`, loop controls, a `tojson` filter that does not escape
HTML and keeps non-ASCII by default, `raise_exception`, `strftime_now`) and the same input preparation (message
objects become plain dicts, keys whose value is None are dropped, `reasoning_content` is filled from `thinking` or
`reasoning`). One addition, as vLLM does: tool-call `arguments` given as a JSON string (the OpenAI wire format) are
parsed into a dict, because GLM's template iterates `arguments.items()`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict

TEMPLATE_FILE = "chat_template.jinja"
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the first is the one templates read


class ChatTemplateError(ValueError):
    """Messages or tools the template cannot render, or a template that raised; the message says which."""


class _NamedTemplate(BaseModel):
    name: str
    template: str


class _TokenizerConfigTemplate(BaseModel):
    """The one field of `tokenizer_config.json` this module reads."""

    model_config = ConfigDict(extra="ignore")

    chat_template: str | list[_NamedTemplate] | None = None


def load_chat_template(checkpoint_dir: str | Path) -> str | None:
    """The template source of a checkpoint: `chat_template.jinja`, else tokenizer_config.json's `chat_template`."""
    checkpoint_dir = Path(checkpoint_dir)
    template_file = checkpoint_dir / TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    config_file = checkpoint_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    field = _TokenizerConfigTemplate.model_validate_json(config_file.read_bytes()).chat_template
    if isinstance(field, list):  # named templates: serving uses the default one
        named = {t.name: t.template for t in field}
        if "default" not in named:
            raise ChatTemplateError(f"{config_file}: chat_template lists {sorted(named)} but no 'default' template")
        return named["default"]
    return field


class ChatTemplate:
    """A compiled chat template. `render` takes OpenAI-style messages and returns the prompt text."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        self.source = source
        # transformers passes the tokenizer's special tokens (eos_token, ...) as template variables
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _compile(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not parse: {e}") from e

    @classmethod
    def from_pretrained(
        cls, checkpoint_dir: str | Path, special_tokens: Mapping[str, str] | None = None
    ) -> ChatTemplate:
        source = load_chat_template(checkpoint_dir)
        if source is None:
            raise ChatTemplateError(f"{checkpoint_dir} has no {TEMPLATE_FILE} and no chat_template in tokenizer_config")
        return cls(source, special_tokens)

    def render(
        self,
        messages: Sequence[Any],
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text. GLM templates read `enable_thinking`, `clear_thinking` and `reasoning_effort`; any
        keyword is passed through, and only what is passed is defined (the template tests `is defined`)."""
        chat = [_prepare_message(i, m) for i, m in enumerate(messages)]
        variables = {**self.special_tokens, **_plain(template_kwargs, "template_kwargs")}
        try:
            return self._template.render(
                messages=chat,
                tools=None if tools is None else _plain(list(tools), "tools"),
                documents=None if documents is None else _plain(list(documents), "documents"),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e


def _prepare_message(index: int, message: Any) -> dict:
    """A plain dict without None values, reasoning aliased, JSON-string tool-call arguments parsed."""
    message = _plain(message, f"messages[{index}]")
    if not isinstance(message, dict):
        raise ChatTemplateError(f"messages[{index}] must be an object, got {type(message).__name__}")
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    for j, call in enumerate(message.get("tool_calls") or ()):
        holder = call.get("function", call) if isinstance(call, dict) else None
        if isinstance(holder, dict) and isinstance(holder.get("arguments"), str):
            holder["arguments"] = _parse_arguments(holder["arguments"], f"messages[{index}].tool_calls[{j}]")
    return message


def _parse_arguments(text: str, where: str) -> dict:
    try:
        arguments = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise ChatTemplateError(f"{where}.function.arguments is not valid JSON: {e}") from e
    if not isinstance(arguments, dict):
        raise ChatTemplateError(f"{where}.function.arguments must be a JSON object, got {type(arguments).__name__}")
    return arguments


def _plain(value: Any, where: str) -> Any:
    """Plain JSON-like data only, so a template sees no object whose methods the sandbox does not know."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, numpy scalars) back to their base type
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), where) for f in dataclasses.fields(value)}
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(), where)
    raise ChatTemplateError(f"{where} holds a {type(value).__name__}, which a chat template cannot render")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; serving just renders it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so a template cannot reach Python internals through it."""

    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]  # Jinja's trick, so `namespace(self=...)` still works
        for name in dict(*args, **kwargs):
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, *args, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


class _DictFactory:
    """The template's `dict`: builds dicts, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # transformers' semantics: plain json.dumps (Jinja's own filter would HTML-escape and force ASCII)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictFactory(), namespace=_Namespace
    )
    return env.from_string(source)

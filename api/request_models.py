"""Request bodies of `/v1/chat/completions` and `/v1/completions` (OpenAI fields, vLLM extras, Z.AI fields), and
their translation into chat-template inputs and vLLM-named sampling parameters.

Validation policy:
- Unknown fields are ignored: OpenAI SDKs and agent frameworks send many we do not use (`store`, `metadata`,
  `best_of`, ...), and refusing them would break those clients. Fields that would change the output and are not
  implemented (`logit_bias` on either endpoint, `suffix` on completions) are refused when set, naming the field.
- Known fields are strict: no "5" for 5, no 1 for true, no 2.0 for an integer (ints are fine for floats), so a bad
  value is a 400 naming the field. Checks that involve two fields run in the later field's validator, so the error
  still names a field (`top_logprobs`, `tool_choice`); `min_tokens` against `max_tokens` is SamplingParams' check.
- null means "not set" for every field (OpenAI clients send `"n": null`, `"stop": null`).
- `stream_options` without `stream` is accepted and has no effect.
- Only text content is accepted; content given as a list of text parts is joined into one string, as the GLM
  template would do.
- Structured output is enforced (`structured_output()`, compiled by `engine.grammar`): chat's `response_format`
  (`json_object`, `json_schema` with `strict`), and on both endpoints vLLM's `structured_outputs` and its older
  `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`, at most one of them per request. A required or
  named `tool_choice` is a grammar over GLM's tool-call text (`tool_grammar`), `parallel_tool_calls: false` holds it
  to one call, and `"none"` (with tools) forbids a call. With thinking on, the grammar starts after `</think>`: the
  reasoning before it is free. A forced tool call has no message content, so `response_format` does not apply to
  it; next to `tool_choice: "auto"` the output is then either tool calls or the JSON.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from glmserve.engine.structured_outputs import MAX_CHOICES, MAX_SPEC_CHARS, StructuredOutputParams

from .reasoning_parser import THINK_END
from .tool_grammar import ToolGrammarError, no_tool_call_grammar, tool_call_grammar

MAX_TOP_LOGPROBS = 20
# the request fields that can ask for structured output, in the order they are declared (each is checked against
# the ones before it, so a conflict names the later field)
_STRUCTURED_FIELDS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")

# Neutral sampling values, used where neither the request nor the model's generation defaults set one.
SAMPLING_DEFAULTS: dict[str, float | int] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,  # -1: no top-k cut
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}


class _StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_unset(cls, data: Any) -> Any:
        # OpenAI's spec makes most fields nullable and clients send null for "not set": the default applies
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data


class FunctionCallSpec(_StrictModel):
    """`function` of a tool call in an assistant message of the history."""

    name: str
    arguments: str  # a JSON object, as text (OpenAI's wire format); a JSON object itself is accepted too

    @field_validator("arguments", mode="before")
    @classmethod
    def _object_to_text(cls, value: Any) -> Any:
        return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else value

    @field_validator("arguments")
    @classmethod
    def _must_be_json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"must be a JSON object as text, got invalid JSON ({e})") from e
        if not isinstance(parsed, dict):
            raise ValueError(f"must be a JSON object, got {type(parsed).__name__}")
        return value


class ToolCallSpec(_StrictModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallSpec


class ChatMessage(_StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = Field(None, validate_default=True)
    reasoning_content: str | None = None
    tool_calls: list[ToolCallSpec] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, content: Any) -> Any:
        if not isinstance(content, list):
            return content
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"part {i} is a {kind!r} part; only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)

    @field_validator("content")
    @classmethod
    def _required_unless_assistant(cls, content: str | None, info: ValidationInfo) -> str | None:
        role = info.data.get("role")
        if content is None and role is not None and role != "assistant":
            raise ValueError(f"is required for role {role!r}")
        return content

    @field_validator("tool_calls")
    @classmethod
    def _assistant_only(cls, tool_calls: list[ToolCallSpec] | None, info: ValidationInfo) -> list | None:
        role = info.data.get("role")
        if tool_calls and role is not None and role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, this one has role {role!r}")
        return tool_calls

    def template_message(self) -> dict[str, Any]:
        """The message as the chat template reads it: developer is system, tool-call arguments are dicts."""
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.content or "",
        }
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)},
                }
                for call in self.tool_calls
            ]
        return message


class FunctionDefinition(_StrictModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ToolDefinition(_StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_StrictModel):
    name: str


class NamedToolChoice(_StrictModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(_StrictModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = Field(None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _present_for_json_schema(cls, spec: JsonSchemaSpec | None, info: ValidationInfo) -> JsonSchemaSpec | None:
        if spec is None and info.data.get("type") == "json_schema":
            raise ValueError('is required when type is "json_schema"')
        return spec


class StreamOptions(_StrictModel):
    include_usage: bool = False


class ThinkingOptions(_StrictModel):
    """Z.AI `thinking`."""

    type: Literal["enabled", "disabled"] = "enabled"
    clear_thinking: bool | None = None  # False keeps earlier turns' reasoning in the prompt


class ChatTemplateOptions(_StrictModel):
    """vLLM's `chat_template_kwargs`, as GLM users send it through vLLM today; only the keys GLM reads are used."""

    enable_thinking: bool | None = None
    clear_thinking: bool | None = None
    reasoning_effort: Literal["max", "high"] | None = None


class GenerationRequest(_StrictModel, abc.ABC):
    """Fields both endpoints share."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logit_bias: dict[str, float] | None = None  # refused when non-empty: not implemented
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1)  # 0 and -1: no top-k cut
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputParams | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, min_length=1, max_length=MAX_SPEC_CHARS)
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    guided_grammar: str | None = Field(None, min_length=1, max_length=MAX_SPEC_CHARS)
    # Z.AI
    do_sample: bool | None = None  # False: greedy
    request_id: str | None = None
    user_id: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias:
            raise ValueError("logit_bias is not supported")
        return bias

    @field_validator("stop", mode="before")
    @classmethod
    def _single_stop_to_list(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else stop

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str] | None) -> list[str] | None:
        if stop is not None and "" in stop:
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("guided_json")
    @classmethod
    def _json_text(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | None:
        if isinstance(value, str):
            if len(value) > MAX_SPEC_CHARS:
                raise ValueError(f"the schema is longer than {MAX_SPEC_CHARS} characters")
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"is not valid JSON ({e})") from None
            if not isinstance(value, dict):
                raise ValueError("must be a JSON schema object")
        return value

    @field_validator(*_STRUCTURED_FIELDS[1:])
    @classmethod
    def _one_structured_output(cls, value: Any, info: ValidationInfo) -> Any:
        earlier = _STRUCTURED_FIELDS[: _STRUCTURED_FIELDS.index(info.field_name)]
        clash = [name for name in earlier if info.data.get(name) is not None]
        if value is not None and clash:
            raise ValueError(f"conflicts with {clash[0]}: ask for one kind of structured output")
        return value

    def _guided(self) -> tuple[StructuredOutputParams, str] | None:
        """The structured output asked for by vLLM's fields, and the field that asked."""
        if self.structured_outputs is not None:
            return self.structured_outputs, "structured_outputs"
        if self.guided_json is not None:
            return StructuredOutputParams(json=self.guided_json), "guided_json"
        if self.guided_regex is not None:
            return StructuredOutputParams(regex=self.guided_regex), "guided_regex"
        if self.guided_choice is not None:
            return StructuredOutputParams(choice=self.guided_choice), "guided_choice"
        if self.guided_grammar is not None:
            return StructuredOutputParams(grammar=self.guided_grammar), "guided_grammar"
        return None

    def structured_output(self) -> tuple[StructuredOutputParams | None, str | None]:
        """What the output must match, and the request field that asked for it (named by a 400 when the grammar
        library cannot compile it)."""
        return self._guided() or (None, None)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    @abc.abstractmethod
    def logprobs_count(self) -> int | None:
        """Top alternatives to return per generated token; None: no logprobs at all."""

    def sampling_params(self, default_max_tokens: int, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Sampling parameters with vLLM's names. `default_max_tokens` applies when the request sets no limit;
        `defaults` (e.g. the checkpoint's generation_config) replace SAMPLING_DEFAULTS where the request is silent."""
        params: dict[str, Any] = dict(SAMPLING_DEFAULTS)
        params.update({key: value for key, value in (defaults or {}).items() if key in SAMPLING_DEFAULTS})
        params.update({key: getattr(self, key) for key in SAMPLING_DEFAULTS if getattr(self, key) is not None})
        if self.do_sample is False:
            params["temperature"] = 0.0
        if params["top_k"] == 0:
            params["top_k"] = -1
        params.update(
            seed=self.seed,
            stop=list(self.stop or ()),
            stop_token_ids=list(self.stop_token_ids or ()),
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs_count(),
            skip_special_tokens=self.skip_special_tokens,
            n=self.n,
            structured_outputs=self.structured_output()[0],
        )
        return params


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # False: a forced tool_choice makes exactly one call
    response_format: ResponseFormat | None = None
    # Z.AI
    thinking: ThinkingOptions | None = None
    reasoning_effort: Literal["max", "high"] | None = None
    tool_stream: bool = False  # stream tool-call arguments as fragments
    # vLLM
    chat_template_kwargs: ChatTemplateOptions | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return top_logprobs

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, choice: Any) -> Any:
        # checked here so a wrong shape gets one clear message instead of one per union member
        if choice is None or choice in ("none", "auto", "required"):
            return choice
        function = choice.get("function") if isinstance(choice, dict) else None
        if isinstance(function, dict) and choice.get("type") == "function" and isinstance(function.get("name"), str):
            return choice
        raise ValueError('must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')

    @field_validator("tool_choice")
    @classmethod
    def _chosen_tool_exists(cls, choice: Any, info: ValidationInfo) -> Any:
        names = {tool.function.name for tool in info.data.get("tools") or ()}
        if choice == "required" and not names:
            raise ValueError('"required" needs tools')
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"names tool {choice.function.name!r}, which is not in tools")
        if choice == "required" or isinstance(choice, NamedToolChoice):
            try:  # the forced call's grammar: a parameter schema it cannot hold a raw value to is refused here
                tool_call_grammar(_tool_dicts(info.data.get("tools")), _forced_names(choice))
            except ToolGrammarError as e:
                raise ValueError(f"cannot force a call: {e}") from None
        return choice

    @field_validator("response_format")
    @classmethod
    def _one_structured_format(cls, response_format: ResponseFormat | None, info: ValidationInfo) -> Any:
        clash = [name for name in _STRUCTURED_FIELDS if info.data.get(name) is not None]
        if response_format is not None and response_format.type != "text" and clash:
            raise ValueError(f"conflicts with {clash[0]}: ask for one kind of structured output")
        return response_format

    def _response_format_spec(self) -> StructuredOutputParams | None:
        response_format = self.response_format
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return StructuredOutputParams(json_object=True)
        spec = response_format.json_schema
        # strict: false (OpenAI's "best effort") drops the keywords the grammar cannot enforce instead of refusing
        return StructuredOutputParams(json=spec.schema_ or {}, strict=spec.strict is not False)

    def structured_output(self) -> tuple[StructuredOutputParams | None, str | None]:
        reasoning_end = THINK_END if self.thinking_enabled else None  # the grammar starts after the reasoning
        tools = _tool_dicts(self.tools)
        parallel = self.parallel_tool_calls is not False
        if self.tools and (self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)):
            grammar = tool_call_grammar(tools, _forced_names(self.tool_choice), parallel)
            return StructuredOutputParams(grammar=grammar, reasoning_end=reasoning_end), "tool_choice"
        spec, param = self._guided() or (self._response_format_spec(), "response_format")
        if self.tools and self.tool_choice == "none" and spec is None:
            return StructuredOutputParams(grammar=no_tool_call_grammar(), reasoning_end=reasoning_end), "tool_choice"
        if spec is None:
            return None, None
        if self.parses_tool_calls and spec.kind in ("json", "json_object"):
            schema = {"type": "object"} if spec.kind == "json_object" else spec.json_schema
            grammar = tool_call_grammar(tools, None, parallel, json_alternative=schema, strict=spec.strict)
            return StructuredOutputParams(grammar=grammar, reasoning_end=reasoning_end), param
        return spec.model_copy(update={"reasoning_end": reasoning_end}), param

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def thinking_enabled(self) -> bool:
        """Whether the prompt opens a `<think>` block (so the output starts inside reasoning). Default: yes."""
        if self.thinking is not None:
            return self.thinking.type == "enabled"
        options = self.chat_template_kwargs
        return options is None or options.enable_thinking is not False

    @property
    def parses_tool_calls(self) -> bool:
        """Whether tools are offered to the model (so its output is parsed for calls)."""
        return bool(self.tools) and self.tool_choice != "none"

    def template_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the chat template render: messages, tools (OpenAI dicts, None when not offered),
        add_generation_prompt, and GLM's enable_thinking, clear_thinking (default True) and reasoning_effort
        (default "max"). Z.AI's top-level fields win over vLLM's `chat_template_kwargs`."""
        options = self.chat_template_kwargs or ChatTemplateOptions()
        clear_thinking = self.thinking.clear_thinking if self.thinking is not None else None
        if clear_thinking is None:
            clear_thinking = options.clear_thinking
        return {
            "messages": [message.template_message() for message in self.messages],
            "tools": [tool.model_dump(exclude_none=True) for tool in self.tools] if self.parses_tool_calls else None,
            "add_generation_prompt": True,
            "enable_thinking": self.thinking_enabled,
            "clear_thinking": clear_thinking is not False,
            "reasoning_effort": self.reasoning_effort or options.reasoning_effort or "max",
        }


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None  # refused when non-empty: not implemented (no fill-in-the-middle)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix is not supported")
        return suffix

    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        # checked here so a wrong shape gets one clear message instead of one per union member
        if isinstance(prompt, str):
            return prompt
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of such lists")
        if all(isinstance(p, str) for p in prompt) or _is_token_ids(prompt):
            return prompt
        if all(isinstance(p, list) for p in prompt):
            for i, ids in enumerate(prompt):
                if not ids or not _is_token_ids(ids):
                    raise ValueError(f"prompt {i} must be a non-empty list of token ids (integers >= 0)")
            return prompt
        raise ValueError("a list prompt must hold only strings, only token ids (integers >= 0), or only such lists")

    def prompts(self) -> list[str | list[int]]:
        """The prompts to complete: one per string or token-id list."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def logprobs_count(self) -> int | None:
        return self.logprobs


def _tool_dicts(tools: list[ToolDefinition] | None) -> list[dict[str, Any]]:
    return [tool.model_dump(exclude_none=True) for tool in tools or ()]


def _forced_names(choice: Any) -> list[str] | None:
    """The functions a forced tool_choice allows: the named one, or (required) all."""
    return [choice.function.name] if isinstance(choice, NamedToolChoice) else None


def _is_token_ids(values: list) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)

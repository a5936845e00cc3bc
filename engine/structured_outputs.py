"""What a request's output must match: a JSON schema, any JSON object, a regex, one of a few strings, or a grammar
(vLLM's `StructuredOutputsParams`, by its field names). `engine.grammar` compiles it; the sampler enforces it.

Exactly one of `json`, `json_object`, `regex`, `choice`, `grammar` is set. JSON is written compactly, with the
separators Python's `json.dumps` uses (", " and ": ") and no other whitespace, unless `disable_any_whitespace` is
False, and an object with declared `properties` takes no others unless its schema says `additionalProperties`
(`disable_additional_properties`, what OpenAI's strict mode asks schemas to say). Both defaults are the opposite of
vLLM's: free whitespace and free extra keys let a model wander (in blank space, or adding keys) until max_tokens;
the output validates against the schema either way.
`strict=False` drops the schema keywords the grammar library cannot enforce instead of refusing the schema.
`reasoning_end` lets free text up to and including its first occurrence come first (GLM's `</think>`): the chat
API sets it when thinking is on, so the model reasons freely and the grammar starts after its reasoning.
"""

from __future__ import annotations

import json as _json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SPEC_CHARS = 1 << 18  # a schema, regex or grammar; bounds the compile work one request can ask for
MAX_CHOICES = 1024
_KINDS = ("json", "json_object", "regex", "choice", "grammar")


class StructuredOutputParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # a JSON schema, as an object or as JSON text ("json" shadows a BaseModel method, hence the alias)
    json_schema: dict[str, Any] | None = Field(None, alias="json")
    json_object: bool = False  # any JSON object
    regex: str | None = Field(None, min_length=1, max_length=MAX_SPEC_CHARS)  # the whole output matches it
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(None, min_length=1, max_length=MAX_SPEC_CHARS)  # Lark (llguidance's) or GBNF
    disable_any_whitespace: bool = True
    disable_additional_properties: bool = True
    strict: bool = True
    reasoning_end: str | None = Field(None, min_length=1, max_length=64)

    @field_validator("json_schema", mode="before")
    @classmethod
    def _parse_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            if len(value) > MAX_SPEC_CHARS:
                raise ValueError(f"the schema is longer than {MAX_SPEC_CHARS} characters")
            try:
                return _json.loads(value)
            except ValueError as e:
                raise ValueError(f"is not valid JSON: {e}") from None
        return value

    @field_validator("json_schema")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if isinstance(value, dict) and len(_json.dumps(value)) > MAX_SPEC_CHARS:
            raise ValueError(f"the schema is longer than {MAX_SPEC_CHARS} characters")
        return value

    @field_validator("choice")
    @classmethod
    def _choices_bounded(cls, choice: list[str] | None) -> list[str] | None:
        if choice is not None and sum(map(len, choice)) > MAX_SPEC_CHARS:
            raise ValueError(f"the choices add up to more than {MAX_SPEC_CHARS} characters")
        return choice

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputParams:
        given = [kind for kind in _KINDS if self._value(kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"set exactly one of {', '.join(_KINDS)} (got {', '.join(given) or 'none'})")
        return self

    def _value(self, kind: str) -> Any:
        return self.json_schema if kind == "json" else getattr(self, kind)

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if self._value(kind) not in (None, False))

    def cache_key(self) -> str:
        """Equal for requests that compile to the same grammar."""
        return self.model_dump_json(by_alias=True)

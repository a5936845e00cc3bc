"""Per-request sampling parameters, with vLLM's names and defaults so users carry their settings over.

Invalid values raise a pydantic `ValidationError` whose location is the offending field, so the API layer can
answer with an OpenAI-shaped 400 naming it (`param`).
"""

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .structured_outputs import StructuredOutputParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(1, ge=1, le=16)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int = Field(16, ge=1)
    min_tokens: int = Field(0, ge=0)  # validated against max_tokens below, so it must come after it
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top alternatives; the sampled token always comes
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    num_speculative_tokens: int | None = Field(None, ge=0)  # lowers the engine's MTP draft length for this request
    # what the output must match (engine.grammar enforces it); eos is then allowed only where the grammar can end,
    # min_tokens does not hold eos back, and a grammar that is complete ends the sequence ("stop")
    structured_outputs: StructuredOutputParams | None = None

    @field_validator("stop", "stop_token_ids", mode="before")
    @classmethod
    def _listify(cls, value):
        """vLLM accepts a single stop string, and None for either list."""
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _non_negative_ids(cls, ids: list[int]) -> list[int]:
        if any(t < 0 for t in ids):
            raise ValueError(f"token ids must be >= 0, got {[t for t in ids if t < 0]}")
        return ids

    @field_validator("min_tokens")
    @classmethod
    def _min_below_max(cls, min_tokens: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")  # absent when max_tokens itself failed
        if max_tokens is not None and min_tokens > max_tokens:
            raise ValueError(f"min_tokens ({min_tokens}) must be <= max_tokens ({max_tokens})")
        return min_tokens

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def argmax_only(self, num_output_tokens: int) -> bool:
        """Whether the next token is the raw logits' argmax: greedy, no penalties, no logprobs, no grammar, and
        min_tokens reached (no stop token masked)."""
        return (
            self.is_greedy
            and self.structured_outputs is None
            and self.presence_penalty == 0
            and self.frequency_penalty == 0
            and self.repetition_penalty == 1
            and self.logprobs is None
            and num_output_tokens >= self.min_tokens
        )

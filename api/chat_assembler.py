"""Turns one choice's generated text, delta by delta, into chat deltas: reasoning split off, tool calls parsed."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from glmserve.engine.outputs import Logprob

from .reasoning_parser import ReasoningStreamParser
from .response_models import ChatDelta, ChatTokenLogprob, DeltaFunctionCall, DeltaToolCall, TopLogprob
from .tool_parser import ToolCall, ToolCallStreamParser


@dataclass
class ChoiceAssembler:
    """One choice of a chat completion. `feed` each text delta; `finish` at the end; the totals stay available
    for the non-streamed response."""

    starts_in_reasoning: bool
    tools: Sequence[Mapping[str, Any]] | None
    tool_stream: bool
    reasoning: str = ""
    content: str = ""
    _reasoning: ReasoningStreamParser = field(init=False)
    _tools: ToolCallStreamParser | None = field(init=False)

    def __post_init__(self) -> None:
        self._reasoning = ReasoningStreamParser(self.starts_in_reasoning)
        self._tools = ToolCallStreamParser(self.tools, stream_arguments=self.tool_stream) if self.tools else None

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self._tools.tool_calls if self._tools else []

    def feed(self, text: str) -> ChatDelta:
        reasoning, content = self._reasoning.feed(text)
        return self._delta(reasoning, content, final=False)

    def finish(self) -> ChatDelta:
        reasoning, content = self._reasoning.finish()
        return self._delta(reasoning, content, final=True)

    def _delta(self, reasoning: str, content: str, final: bool) -> ChatDelta:
        self.reasoning += reasoning
        calls: list[DeltaToolCall] = []
        if self._tools is not None:
            parsed = self._tools.feed(content)
            if final:
                tail = self._tools.finish()
                parsed.content += tail.content
                parsed.tool_calls += tail.tool_calls
            content = parsed.content
            calls = [
                DeltaToolCall(
                    index=c.index,
                    id=c.id,
                    type="function" if c.id else None,
                    function=DeltaFunctionCall(name=c.name, arguments=c.arguments),
                )
                for c in parsed.tool_calls
            ]
        self.content += content
        return ChatDelta(reasoning_content=reasoning or None, content=content or None, tool_calls=calls or None)


def finish_reason(engine_reason: str | None, assembler: ChoiceAssembler) -> str | None:
    if engine_reason == "stop" and assembler.tool_calls:
        return "tool_calls"
    return "stop" if engine_reason == "abort" else engine_reason


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[dict[int, Logprob]], top: int) -> list[ChatTokenLogprob]:
    """OpenAI's chat shape: the sampled token with its logprob, then the `top` most likely alternatives."""
    out = []
    for token, entry in zip(token_ids, entries, strict=True):
        alternatives = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:top]
        out.append(
            ChatTokenLogprob(
                token=entry[token].decoded_token or "",
                logprob=entry[token].logprob,
                bytes=list((entry[token].decoded_token or "").encode()),
                top_logprobs=[
                    TopLogprob(
                        token=lp.decoded_token or "", logprob=lp.logprob, bytes=list((lp.decoded_token or "").encode())
                    )
                    for _, lp in alternatives
                ],
            )
        )
    return out

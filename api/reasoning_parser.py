"""Split GLM output into reasoning (`reasoning_content`) and answer (`content`), whole or streamed.

With thinking enabled GLM-5's prompt ends in `<|assistant|><think>`, so generation starts inside the reasoning and
leaves it at the first `</think>`; everything after is content. With thinking disabled the template already wrote
`</think>` and the whole output is content. The starting state is therefore a flag, not something read from the
output. A model that repeats the opening `<think>` as its very first text gets it dropped. Text is never trimmed,
so the streamed pieces add up exactly to the whole-text split.
"""

from __future__ import annotations

from .tag_scan import partial_tag_length

THINK_START = "<think>"
THINK_END = "</think>"


def split_reasoning(text: str, starts_in_reasoning: bool) -> tuple[str | None, str]:
    """(reasoning, content) of a finished output; reasoning is None when thinking was off."""
    if not starts_in_reasoning:
        return None, text
    text = text.removeprefix(THINK_START)
    reasoning, _, content = text.partition(THINK_END)
    return reasoning, content


class ReasoningStreamParser:
    """Feed text deltas (split anywhere, even inside a tag); get (reasoning_delta, content_delta) back.

    Only text that could be the start of a tag is held back, and only until the next delta decides it; `finish`
    releases it when the output ends.
    """

    def __init__(self, starts_in_reasoning: bool):
        self._in_reasoning = starts_in_reasoning
        self._at_start = starts_in_reasoning  # a `<think>` here is a repeat of the prompt's and is dropped
        self._held = ""

    def feed(self, delta: str) -> tuple[str, str]:
        if not self._in_reasoning:
            return "", delta
        text = self._held + delta
        if self._at_start:
            if len(text) < len(THINK_START) and THINK_START.startswith(text):
                self._held = text
                return "", ""
            text = text.removeprefix(THINK_START)
            self._at_start = False
        end = text.find(THINK_END)
        if end >= 0:
            self._in_reasoning = False
            self._held = ""
            return text[:end], text[end + len(THINK_END) :]
        keep = partial_tag_length(text, THINK_END)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], ""

    def finish(self) -> tuple[str, str]:
        """The held-back text, which turned out not to be a tag."""
        held, self._held = self._held, ""
        return (held, "") if self._in_reasoning else ("", held)

    @property
    def in_reasoning(self) -> bool:
        return self._in_reasoning

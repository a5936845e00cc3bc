"""Streaming detokenization: token ids in, new text out, equal in sum to decoding all ids at once.

Each step decodes only a short window (vLLM's prefix/read offsets): the tokens already emitted last time (context
for decoders whose output depends on what precedes, like SentencePiece's leading space) plus the unread ones. A
window whose text ends in U+FFFD may end inside a multi-byte character whose other bytes are still to come, so
it is held back until a later token completes it; `flush` releases what is held when the stream ends.
"""

from __future__ import annotations

from collections.abc import Iterable

from glmserve.model.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas in O(1) amortized work per token.

    Text is held only while the window ends in U+FFFD, so a run of bytes that never forms valid UTF-8 keeps the
    window growing until a valid character follows (as in vLLM); model output does not sustain that for long.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # emitted context tokens, then unread ones
        self._read = 0  # index in the window of the first unread token
        self._prefix_text = ""  # decode(window[:read])

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Feed one or several ids; returns the text they complete (possibly empty)."""
        if isinstance(token_ids, int):
            self._window.append(token_ids)
        else:
            self._window.extend(token_ids)
        if self._read == len(self._window):
            return ""
        text = self._decode(self._window)
        if text.endswith(REPLACEMENT_CHAR):
            return ""  # maybe a character still being spelled out: wait for more bytes
        delta = text[len(self._prefix_text) :]
        # the tokens just read become the context of the next window
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        return delta

    def flush(self) -> str:
        """At the end of the stream: the held-back text, with U+FFFD for bytes that never formed a character."""
        delta = self._decode(self._window)[len(self._prefix_text) :]
        self._window, self._read, self._prefix_text = [], 0, ""
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

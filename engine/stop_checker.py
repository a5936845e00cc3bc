"""When a sequence stops, and which text may be streamed so far.

Fed each new token with its text delta from the incremental detokenizer, or several tokens at once under
speculative decoding (tokens after a stop are then dropped, and never reach the detokenizer). A sequence stops on
an eos id (unless ignore_eos), a stop token id or a stop string ("stop"), or at max_tokens or the model's length
("length"); nothing but the length stops it before min_tokens outputs. A stop string may span several deltas: the
end of the text that could begin one (at most max(len(stop)) - 1 chars) is held back, so a stream never shows part
of a stop string, and the stop string and all after it are cut unless include_stop_str_in_output.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .sampling_params import SamplingParams


@dataclass
class StopDecision:
    text: str  # text that may be emitted now
    finish_reason: str | None = None  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop token id or stop string
    num_tokens: int = 1  # of the tokens offered, how many the sequence keeps (those after a stop are dropped)


def check_stop_token_ids(stop_token_ids: Iterable[int], vocab_size: int) -> None:
    bad = [t for t in stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids {bad} lie outside the vocabulary [0, {vocab_size})")


class StopChecker:
    def __init__(
        self,
        params: SamplingParams,
        eos_token_ids: Iterable[int],
        max_model_len: int,
        prompt_len: int,
        vocab_size: int | None = None,
    ):
        if vocab_size is not None:
            check_stop_token_ids(params.stop_token_ids, vocab_size)
        self.params = params
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.stop_ids = set(params.stop_token_ids)
        self.max_output = min(params.max_tokens, max_model_len - prompt_len)
        self.max_hold = max((len(s) for s in params.stop), default=1) - 1
        self.num_output = 0
        self.pending = ""  # text received but not yet emitted (its end may begin a stop string)

    def check(self, token: int, text: str) -> StopDecision:
        """One new token and its text delta."""
        self.num_output += 1
        may_stop = self.num_output >= self.params.min_tokens
        if may_stop and (token in self.eos or token in self.stop_ids):
            kept = text if self.params.include_stop_str_in_output else ""
            return StopDecision(self._release() + kept, "stop", token)
        self.pending += text
        if may_stop and self.params.stop:
            hit = self._find_stop_string()
            if hit is not None:
                return hit
        if self.num_output >= self.max_output:
            return StopDecision(self._release(), "length")
        cut = len(self.pending) - self._held_length()
        emit, self.pending = self.pending[:cut], self.pending[cut:]
        return StopDecision(emit)

    def check_tokens(self, token_ids: Sequence[int], detokenize: Callable[[list[int]], str]) -> StopDecision:
        """Several new tokens at once (speculative decoding). `detokenize` (e.g. the incremental detokenizer's
        `add`) turns ids into a text delta; it is called per token, and not for tokens after a stop."""
        texts = []
        for n, token in enumerate(token_ids, 1):
            decision = self.check(token, detokenize([token]))
            texts.append(decision.text)
            if decision.finish_reason is not None:
                return StopDecision("".join(texts), decision.finish_reason, decision.stop_reason, n)
        return StopDecision("".join(texts), num_tokens=len(token_ids))

    def flush(self) -> str:
        """The held text, once the stream ended for another reason (abort)."""
        return self._release()

    def _find_stop_string(self) -> StopDecision | None:
        """The stop string that begins first in the pending text, if any."""
        found = [(at, s) for s in self.params.stop if (at := self.pending.find(s)) >= 0]
        if not found:
            return None
        at, s = min(found, key=lambda hit: hit[0])
        end = at + len(s) if self.params.include_stop_str_in_output else at
        text = self.pending[:end]
        self.pending = ""
        return StopDecision(text, "stop", s)

    def _held_length(self) -> int:
        """Length of the longest end of the pending text that is the start of some stop string."""
        for n in range(min(self.max_hold, len(self.pending)), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.params.stop):
                return n
        return 0

    def _release(self) -> str:
        text, self.pending = self.pending, ""
        return text

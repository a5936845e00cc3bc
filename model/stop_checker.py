"""When a sequence stops, and which text may be streamed so far.

Fed one token at a time (several per step under speculative decoding: tokens after a stop are then dropped),
with that token's text delta from the incremental detokenizer. Text that could be the start of a stop string is
held back, so a stream never shows part of a stop string.
"""

from dataclasses import dataclass

from .sampling_params import SamplingParams


@dataclass
class StopDecision:
    text: str  # text that may be emitted now
    finish_reason: str | None = None  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop token id or stop string


class StopChecker:
    def __init__(self, params: SamplingParams, eos_token_ids: list[int], max_model_len: int, prompt_len: int):
        self.params = params
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.stop_ids = set(params.stop_token_ids)
        self.max_output = min(params.max_tokens, max_model_len - prompt_len)
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.num_output = 0
        self.pending = ""  # text received but not yet emitted (may begin a stop string)

    def check(self, token: int, text: str) -> StopDecision:
        self.num_output += 1
        # the sampler masks stop tokens until min_tokens, so a stop token here always ends the sequence
        if token in self.eos or token in self.stop_ids:
            kept = text if (self.params.include_stop_str_in_output and token in self.stop_ids) else ""
            return StopDecision(self._release() + kept, "stop", token)
        self.pending += text
        if self.params.stop and self.num_output >= self.params.min_tokens:
            hit = self._find_stop()
            if hit is not None:
                return hit
        if self.num_output >= self.max_output:
            return StopDecision(self._release(), "length")
        cut = len(self.pending) - self.hold
        if cut <= 0:
            return StopDecision("")
        emit, self.pending = self.pending[:cut], self.pending[cut:]
        return StopDecision(emit)

    def flush(self) -> str:
        """The held text, once the stream ended for another reason (abort)."""
        return self._release()

    def _find_stop(self) -> StopDecision | None:
        best = None
        for s in self.params.stop:
            at = self.pending.find(s)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return None
        at, s = best
        end = at + len(s) if self.params.include_stop_str_in_output else at
        text = self.pending[:end]
        self.pending = ""
        return StopDecision(text, "stop", s)

    def _release(self) -> str:
        text, self.pending = self.pending, ""
        return text

"""Bounds on what one request may make a replica do, checked before the expensive work (tokenization, template
rendering, the engine). Each refusal is a 4xx naming the field, decided in microseconds.

The prompt-length bound is exact-safe: a text of C characters has at least C / m tokens, where m is the longest
text any single token decodes to (a character split over several byte tokens decodes as one replacement character
per token, so the per-token lengths only over-count), so C > max_model_len * m means the prompt cannot fit and is
refused without tokenizing it. Prompts under the bound are tokenized (off the event loop when they are long) and then
checked exactly by the engine.
"""

from dataclasses import dataclass

from glmserve.model.tokenizer import Tokenizer

from .errors import InvalidRequestError
from .request_models import ChatCompletionRequest, GenerationRequest

INLINE_CHARS = 512  # prompts up to this are rendered and tokenized on the event loop (< 0.5 ms); longer ones not


@dataclass(frozen=True)
class RequestLimits:
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 256

    def check(self, req: GenerationRequest) -> None:
        stop = req.stop or ()
        if len(stop) > self.max_stop_strings:
            raise InvalidRequestError(f"at most {self.max_stop_strings} stop strings, got {len(stop)}", param="stop")
        longest = max(map(len, stop), default=0)
        if longest > self.max_stop_string_chars:
            raise InvalidRequestError(
                f"stop strings may have at most {self.max_stop_string_chars} characters, one has {longest}",
                param="stop",
            )
        ids = req.stop_token_ids or ()
        if len(ids) > self.max_stop_token_ids:
            raise InvalidRequestError(
                f"at most {self.max_stop_token_ids} stop_token_ids, got {len(ids)}", param="stop_token_ids"
            )


def max_chars_per_token(tokenizer: Tokenizer) -> int:
    """The longest text one token decodes to (special tokens included, as a rendered chat writes them)."""
    return max((len(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)), default=1) or 1


def chat_prompt_chars(req: ChatCompletionRequest) -> int:
    """Characters the rendered prompt certainly contains: the content of system, user and tool messages (assistant
    turns may be rewritten by the template, e.g. earlier reasoning cleared)."""
    return sum(len(m.content or "") for m in req.messages if m.role != "assistant")

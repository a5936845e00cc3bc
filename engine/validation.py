"""Checks a request must pass before it reaches an engine; the error names the offending field."""

from collections.abc import Container

from glmserve.engine.sampling_params import SamplingParams
from glmserve.model.tokenizer import Tokenizer


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def validate_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    if not prompt_token_ids:
        raise InvalidRequest("the prompt is empty", "prompt")
    if any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise InvalidRequest(f"prompt token ids must lie in [0, {vocab_size})", "prompt")
    if len(prompt_token_ids) >= max_model_len:
        raise InvalidRequest(
            f"the prompt has {len(prompt_token_ids)} tokens; this model serves at most {max_model_len} tokens "
            "(prompt plus at least one generated token)",
            "prompt",
        )
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"stop_token_ids {bad} lie outside the vocabulary [0, {vocab_size})", "stop_token_ids")


def check_new_request(
    request_id: str,
    prompt: str | list[int],
    params: SamplingParams,
    tokenizer: Tokenizer,
    running: Container[str],
    vocab_size: int,
    max_model_len: int,
) -> list[int]:
    """The prompt's token ids, once the request is known to be acceptable next to the `running` request ids."""
    if request_id in running:
        raise InvalidRequest(f"request id {request_id!r} is already running", "request_id")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    validate_request(ids, params, vocab_size, max_model_len)
    return ids

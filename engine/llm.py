"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, sampling_params)`."""

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from glmserve.engine.sampling_params import SamplingParams

from .engine_args import EngineArgs
from .llm_engine import LLMEngine
from .outputs import RequestOutput

Prompt = str | dict[str, Any]  # text, or {"prompt_token_ids": [...]}


def _prompt_input(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"])
    if isinstance(prompt, dict) and "prompt" in prompt:
        return prompt["prompt"]
    raise TypeError("a prompt is a string, {'prompt': str} or {'prompt_token_ids': [int, ...]}")


class LLM:
    """Offline batched generation with the full engine (continuous batching, prefix caching, chunked prefill).

    `LLM()` loads the embedded glm5-tiny; engine arguments use vLLM's names (`max_model_len`, `max_num_seqs`,
    `max_num_batched_tokens`, `enable_prefix_caching`, `gpu_memory_utilization`, `block_size`, `dtype`, `device`).
    """

    def __init__(self, model: str | None = None, **engine_args: Any):
        self.engine = LLMEngine(EngineArgs(model=model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _add(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None):
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        for prompt, p in zip(prompts, params, strict=True):
            rid = str(next(self._ids))
            self.engine.add_request(rid, _prompt_input(prompt), p)
            ids.append(rid)
        return ids

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of `prompts`."""
        order = self._add(prompts, sampling_params)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while len(done) < len(order):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update()
        return [done[rid] for rid in order]

    def generate_stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield each request's progress as it happens: `new_token_ids` / `new_text` hold what the step added."""
        pending = set(self._add(prompts, sampling_params))
        while pending:
            for out in self.engine.step():
                yield out
                if out.finished:
                    pending.discard(out.request_id)

"""What `AsyncEngine` and `DecodeWorker` need of an engine: `LLMEngine` in this process, or a replica whose ranks
run in other processes (`glmserve.cluster.parallel_engine.ParallelEngine`)."""

from typing import Protocol

from glmserve.engine.sampling_params import SamplingParams
from glmserve.model.config import GlmConfig
from glmserve.model.tokenizer import Tokenizer

from .outputs import Logprob, RequestOutput
from .remote import RemotePrefill


class Engine(Protocol):
    config: GlmConfig
    tokenizer: Tokenizer

    @property
    def has_work(self) -> bool: ...

    @property
    def idle(self) -> bool: ...

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        remote_prefill_min_tokens: int | None = None,
    ) -> RemotePrefill | None: ...

    def complete_remote(
        self, request_id: str, first_token: int, logprob: dict[int, Logprob] | None
    ) -> RequestOutput: ...

    def fail_remote(self, request_id: str, recompute: bool) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def stats(self) -> dict[str, float]: ...

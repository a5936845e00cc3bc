"""What the engine returns, shaped like vLLM's outputs so offline users find what they expect.

Each step yields, per request that advanced, the deltas of that step (what a stream sends); the cumulative outputs
are attached once, when the request finishes, so no step copies a whole sequence.
"""

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None  # per generated token: {token id: Logprob}
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    spec: "SpecStats | None" = None  # speculative decoding counters, when it ran

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SpecStats:
    num_steps: int  # verification steps
    num_draft_tokens: int
    num_accepted_tokens: int

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification step (accepted drafts + the target's own token)."""
        return (self.num_accepted_tokens + self.num_steps) / self.num_steps if self.num_steps else 1.0


@dataclass
class CompletionDelta:
    """What one output gained in one step."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int
    deltas: list[CompletionDelta]
    finished: bool
    outputs: list[CompletionOutput] = field(default_factory=list)  # cumulative; filled when finished
    prompt_token_ids: list[int] | None = None  # filled when finished
    prompt: str | None = None
    scheduled_at: float | None = None  # perf_counter() when its prefill began (queue time ends there)

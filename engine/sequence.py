"""One request's state inside an engine: its tokens, how many have KV in the cache, and where that KV lives."""

import enum
from dataclasses import dataclass, field

import torch

from glmserve.engine.grammar import GrammarMatcher
from glmserve.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    REMOTE_PREFILL = "remote_prefill"  # blocks reserved; a prefill worker is filling them
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str  # the request's; its n sequences share it
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # FCFS order
    index: int = 0  # which of the request's n sequences
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks published to the prefix cache
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache on first admission
    scheduled_at: float | None = None  # perf_counter() when its prefill first got blocks (here or remote)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None  # per-request seeded sampling
    grammar: GrammarMatcher | None = None  # structured output: advanced with every token the sequence keeps
    num_preemptions: int = 0
    # speculative decoding: drafts proposed by the MTP layer, verified in the next step
    drafts: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None  # [len(drafts), vocab]; None for greedy requests
    num_spec_steps: int = 0  # verification steps
    num_drafted: int = 0
    num_accepted: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

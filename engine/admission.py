"""Admission control: whether a replica takes one more request, decided before any work is done for it.

A request holds a `Ticket` from the moment its body is parsed (before the chat template is rendered or the prompt
tokenized, so a burst cannot make a replica render what it then refuses) until it ends. Two of the limits are
vLLM's: `max_num_queued_reqs` bounds the requests in flight (waiting and running; n > 1 counts n) and
`max_num_queued_tokens` bounds the prompt tokens of requests still before their first token. The third predicts
the new request's time to first token: the prompt tokens ahead of it plus its own, over the replica's measured
prefill rate, so queueing counts and not only the prefill itself.

The prefill rate is measured from what the replica sees, whoever does the prefill (this engine, or a prefill worker
over the transfer service): prompt tokens cleared (their request's first token came out) per second during which
the backlog was not empty, averaged with a decay so the estimate follows the load. Until something was cleared
there is no estimate, and no prediction refuses anything.

Everything here runs on the replica's event loop (no locks). A refusal raises `Overloaded`, which the API answers
with 503 and Retry-After.
"""

import math
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

RATE_MEMORY_S = 30.0  # the prefill-rate estimate forgets with this time constant
MAX_RETRY_AFTER_S = 60.0


class AdmissionLimits(BaseModel):
    """Per replica; None = no limit."""

    model_config = ConfigDict(extra="forbid")

    max_num_queued_reqs: int | None = Field(None, gt=0)
    max_num_queued_tokens: int | None = Field(None, gt=0)
    max_predicted_ttft_s: float | None = Field(None, gt=0)


class Overloaded(Exception):
    """The replica refuses a request before doing any work for it; retrying after `retry_after` s may succeed."""

    def __init__(self, reason: str, message: str, retry_after: float):
        super().__init__(message)
        self.reason = reason  # the metric label: queued_requests, queued_tokens, predicted_ttft, draining
        self.retry_after = retry_after


class PrefillRate:
    """Prompt tokens cleared per busy second, with exponential forgetting."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.tokens = 0.0
        self.busy_s = 0.0
        self._last = clock()

    def advance(self, busy: bool) -> None:
        """Account the time since the last call (busy or not), decaying the history."""
        now = self.clock()
        elapsed, self._last = now - self._last, now
        decay = math.exp(-elapsed / RATE_MEMORY_S)
        self.tokens *= decay
        self.busy_s = self.busy_s * decay + (elapsed if busy else 0.0)

    def cleared(self, tokens: int) -> None:
        self.tokens += tokens

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.busy_s if self.tokens > 0 and self.busy_s > 0 else None


class Admission:
    def __init__(self, limits: AdmissionLimits | None = None, clock: Callable[[], float] = time.monotonic):
        self.limits = limits or AdmissionLimits()
        self.rate = PrefillRate(clock)
        self.in_flight = 0  # sequences of admitted requests not yet ended
        self.queued_tokens = 0  # prompt tokens of admitted requests before their first token
        self.draining = False

    def reserve(self, num_seqs: int = 1) -> "Ticket":
        """A place for a request of `num_seqs` sequences, or Overloaded."""
        if self.draining:
            raise Overloaded("draining", "this replica is shutting down; retry", 1.0)
        cap = self.limits.max_num_queued_reqs
        if cap is not None and self.in_flight + num_seqs > cap:
            raise Overloaded(
                "queued_requests",
                f"the server is overloaded: {self.in_flight} requests in flight on this replica "
                f"(max_num_queued_reqs={cap}); retry later",
                self._retry_after(self.queued_tokens),
            )
        self.in_flight += num_seqs
        return Ticket(self, num_seqs)

    def _admit_prompt(self, tokens: int) -> None:
        cap = self.limits.max_num_queued_tokens
        if cap is not None and self.queued_tokens + tokens > cap:
            raise Overloaded(
                "queued_tokens",
                f"the server is overloaded: {self.queued_tokens} prompt tokens wait for prefill on this replica "
                f"(max_num_queued_tokens={cap}); retry later",
                self._retry_after(self.queued_tokens + tokens - cap),
            )
        ttft = self.predicted_ttft_s(tokens)
        bound = self.limits.max_predicted_ttft_s
        if bound is not None and ttft is not None and ttft > bound:
            rate = self.rate.tokens_per_s or 1.0
            raise Overloaded(
                "predicted_ttft",
                f"the server is overloaded: the predicted time to first token is {ttft:.1f} s "
                f"(max_predicted_ttft_s={bound:g}); retry later",
                self._retry_after(self.queued_tokens + tokens - bound * rate),
            )
        self._change_backlog(tokens)

    def predicted_ttft_s(self, tokens: int) -> float | None:
        """When a request of `tokens` prompt tokens admitted now would get its first token, by the measured rate."""
        rate = self.rate.tokens_per_s
        return (self.queued_tokens + tokens) / rate if rate else None

    def _change_backlog(self, tokens: int) -> None:
        self.rate.advance(busy=self.queued_tokens > 0)
        self.queued_tokens += tokens

    def _retry_after(self, excess_tokens: float) -> float:
        """How long until `excess_tokens` of backlog have cleared, at the measured rate (1 s when unknown)."""
        rate = self.rate.tokens_per_s
        if not rate:
            return 1.0
        return min(MAX_RETRY_AFTER_S, max(1.0, excess_tokens / rate))

    def stats(self) -> dict[str, float]:
        self.rate.advance(busy=self.queued_tokens > 0)
        return {
            "num_requests_admitted": self.in_flight,
            "queued_prompt_tokens": self.queued_tokens,
            "prefill_tokens_per_s": self.rate.tokens_per_s or 0.0,
        }


class Ticket:
    """One admitted request's place. `admit_prompt` once its length is known (may refuse), `first_token` when it
    leaves the prefill backlog, `release` when it ends (each idempotent, so every exit path may call them)."""

    def __init__(self, admission: Admission, num_seqs: int):
        self.admission = admission
        self.num_seqs = num_seqs
        self.prompt_tokens = 0
        self.released = False

    def admit_prompt(self, tokens: int) -> None:
        """Raises Overloaded, releasing the ticket, if the prompt would overload the replica."""
        try:
            self.admission._admit_prompt(tokens)
        except Overloaded:
            self.release()
            raise
        self.prompt_tokens = tokens

    def first_token(self) -> None:
        if self.prompt_tokens:
            self.admission._change_backlog(-self.prompt_tokens)
            self.admission.rate.cleared(self.prompt_tokens)
            self.prompt_tokens = 0

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.prompt_tokens:  # ended (aborted, failed) before its first token: nothing was cleared
            self.admission._change_backlog(-self.prompt_tokens)
            self.prompt_tokens = 0
        self.admission.in_flight -= self.num_seqs

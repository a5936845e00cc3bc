"""Per-API-key quotas: requests and tokens per minute, as token buckets, answered with 429 and Retry-After.

A key's requests bucket is charged one per request when it is admitted; its tokens bucket the prompt's tokens then
and the completion's when the request ends (usage is only known then, so a long completion can take the bucket
below zero and delay the key's next requests: the key pays for what it used). A request is refused while its
bucket holds less than it needs, unless the bucket is full (a prompt bigger than the whole minute's allowance
still runs, alone, instead of never).

Quotas are enforced by each decode replica, on its share of the key's allowance: the configured rate divided by the
number of decode replicas serving (refreshed from the stats board), so a key gets about its quota over the whole
deployment while the router spreads its requests.
"""

import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from .errors import RateLimitError


class ApiKey(BaseModel):
    """One client's key; `name` labels it in logs and metrics (the key itself never leaves the config)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    key: SecretStr = Field(min_length=8)
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)


class TokenBucket:
    def __init__(self, per_minute: float, clock: Callable[[], float]):
        self.per_minute = per_minute
        self.clock = clock
        self.level = per_minute
        self._last = clock()

    def _refill(self, share: float) -> float:
        """The bucket's level now, for a replica holding `share` of the key's allowance."""
        now = self.clock()
        capacity = self.per_minute * share
        self.level = min(capacity, self.level + (now - self._last) * capacity / 60.0)
        self._last = now
        return capacity

    def wait_s(self, amount: float, share: float) -> float:
        """0 if `amount` may be taken now, else the seconds until it may."""
        capacity = self._refill(share)
        if self.level >= min(amount, capacity):
            return 0.0
        return (min(amount, capacity) - self.level) * 60.0 / capacity

    def take(self, amount: float, share: float) -> None:
        self._refill(share)
        self.level -= amount


class _KeyBuckets:
    def __init__(self, key: ApiKey, clock: Callable[[], float]):
        self.requests = TokenBucket(key.requests_per_minute, clock) if key.requests_per_minute else None
        self.tokens = TokenBucket(key.tokens_per_minute, clock) if key.tokens_per_minute else None


class Quotas:
    def __init__(self, keys: list[ApiKey], clock: Callable[[], float] = time.monotonic):
        self._buckets = {k.name: _KeyBuckets(k, clock) for k in keys if k.requests_per_minute or k.tokens_per_minute}
        self.share = 1.0  # of each key's allowance held by this replica

    def set_replicas(self, count: int) -> None:
        self.share = 1.0 / max(1, count)

    def admit(self, key_name: str | None, prompt_tokens: int) -> None:
        """Charge one request and its prompt to the key, or raise RateLimitError (charging nothing)."""
        buckets = self._buckets.get(key_name or "")
        if buckets is None:
            return
        for bucket, amount, what in ((buckets.requests, 1, "requests"), (buckets.tokens, prompt_tokens, "tokens")):
            if bucket is not None and (wait := bucket.wait_s(amount, self.share)) > 0:
                raise RateLimitError(
                    f"the API key {key_name!r} is over its {what}-per-minute quota; retry in {wait:.1f} s",
                    retry_after=wait,
                    code=f"{what}_per_minute_exceeded",
                )
        if buckets.requests is not None:
            buckets.requests.take(1, self.share)
        if buckets.tokens is not None:
            buckets.tokens.take(prompt_tokens, self.share)

    def used(self, key_name: str | None, completion_tokens: int) -> None:
        buckets = self._buckets.get(key_name or "")
        if buckets is not None and buckets.tokens is not None:
            buckets.tokens.take(completion_tokens, self.share)

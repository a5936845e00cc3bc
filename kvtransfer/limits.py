"""The bounds a KV receiver holds its peers to, and the checks a completion must pass before anyone reads it."""

import math
from dataclasses import dataclass

from .completion import Completion


@dataclass(frozen=True)
class ReceiverLimits:
    """Every resource a peer can make the receiver spend is bounded here.

    Data plane: at most `max_connections` sockets (and as many threads) at once, beyond that a connection is closed as
    soon as it is accepted; a connection must finish its hello within `hello_timeout_s`; once a frame has begun, each
    read must make progress within `read_timeout_s` (a truncated header or payload closes the connection); a session
    with no live transfer and no frame for `idle_timeout_s` is closed (its sender reconnects when it needs to); a frame
    carries at most `max_frame_bytes` (and never more rows than its transfer registered), so a receive buffer is at
    most that big. Control plane: `rpc_workers` threads, at most `max_concurrent_rpcs` calls in flight (beyond that,
    RESOURCE_EXHAUSTED), at most `max_sessions` handshaken sessions."""

    max_connections: int = 64
    max_sessions: int = 64
    hello_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    idle_timeout_s: float = 600.0
    max_frame_bytes: int = 64 << 20
    rpc_workers: int = 8
    max_concurrent_rpcs: int = 64

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_sessions", "max_frame_bytes", "rpc_workers", "max_concurrent_rpcs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("hello_timeout_s", "read_timeout_s", "idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")


@dataclass(frozen=True)
class CompletionCheck:
    """What a completion from a prefill worker must look like for this decode worker's model: token ids in the
    vocabulary, a bounded number of finite logprobs, a hidden state of the model's width."""

    vocab_size: int
    hidden_size: int | None = None
    max_top_logprobs: int = 64

    def problem(self, completion: Completion) -> str | None:
        """Why the completion must not be used, or None."""
        if not 0 <= completion.first_token < self.vocab_size:
            return f"first token {completion.first_token} outside the vocabulary [0, {self.vocab_size})"
        if not _is_logprob(completion.logprob):
            return f"first token logprob {completion.logprob!r} is not a log-probability"
        if len(completion.top_logprobs) > self.max_top_logprobs:
            return f"{len(completion.top_logprobs)} top logprobs, at most {self.max_top_logprobs}"
        for token, logprob in completion.top_logprobs:
            if not 0 <= token < self.vocab_size:
                return f"top logprob token {token} outside the vocabulary [0, {self.vocab_size})"
            if not _is_logprob(logprob):
                return f"top logprob {logprob!r} is not a log-probability"
        hidden = completion.hidden
        if hidden is not None and self.hidden_size is not None and tuple(hidden.shape) != (self.hidden_size,):
            return f"hidden state of shape {tuple(hidden.shape)}, the model's is ({self.hidden_size},)"
        return None


def _is_logprob(value: float) -> bool:
    return not math.isnan(value) and value <= 1e-6  # -inf is a valid log-probability (top-k masking)

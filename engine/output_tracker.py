"""What each request has produced so far: per sequence its text, logprobs and stop state; per step the deltas.

The scheduler knows sequences; users know requests (one per `n` sequences, answered together). The tracker is the
join: the engine appends tokens as a step makes them, and asks for the request's `RequestOutput` when the step ends.
"""

import logging
from dataclasses import dataclass, field

import torch

from glmserve.model.tokenizer import Tokenizer

from .detokenizer import IncrementalDetokenizer
from .outputs import CompletionDelta, CompletionOutput, Logprob, RequestOutput, SpecStats
from .sequence import Sequence
from .stop_checker import StopChecker

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Track:
    """One sequence's output state (what the scheduler does not need)."""

    seq: Sequence
    detok: IncrementalDetokenizer
    stop: StopChecker
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    stop_reason: int | str | None = None
    # what the current step added, sent as a delta
    new_tokens: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[dict[int, Logprob]] = field(default_factory=list)


@dataclass(eq=False)
class _Request:
    tracks: list[_Track]
    prompt: str | None

    @property
    def finished(self) -> bool:
        return all(t.seq.is_finished for t in self.tracks)


class OutputTracker:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, spec_stats: bool):
        """`spec_stats`: finished outputs carry speculative-decoding counters (the engine drafts)."""
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.spec_stats = spec_stats
        self._requests: dict[str, _Request] = {}
        self._tracks: dict[Sequence, _Track] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __bool__(self) -> bool:
        return bool(self._requests)

    def add(self, prompt: str | list[int], seqs: list[Sequence]) -> None:
        """Track a new request's sequences (all share its id and prompt)."""
        tracks = []
        for seq in seqs:
            params = seq.params
            track = _Track(
                seq,
                IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens),
                StopChecker(params, self.tokenizer.eos_token_ids, self.max_model_len, seq.num_prompt_tokens),
                logprobs=[] if params.logprobs is not None else None,
            )
            tracks.append(track)
            self._tracks[seq] = track
        self._requests[seqs[0].request_id] = _Request(tracks, prompt if isinstance(prompt, str) else None)

    def sequences(self, request_id: str) -> list[Sequence]:
        return [t.seq for t in self._requests[request_id].tracks]

    def remove(self, request_id: str) -> list[Sequence]:
        """Stop tracking a request (aborted); returns its sequences, none if it is unknown."""
        request = self._requests.pop(request_id, None)
        for track in request.tracks if request else ():
            del self._tracks[track.seq]
        return [t.seq for t in request.tracks] if request else []

    def commit(self, seq: Sequence, tokens: list[int], logits: torch.Tensor | None) -> str | None:
        """Append a step's new tokens to one sequence, up to the first that finishes it (its reason is returned).
        `logits`: the sequence's rows of the step, one per new token (needed only for logprobs)."""
        for j, token in enumerate(tokens):
            entry = None
            if seq.params.logprobs is not None:
                entry = self._logprob_entry(logits[j], token, seq.params.logprobs)
            reason = self.append(seq, token, entry)
            if reason is not None:
                return reason
        return None

    def append(self, seq: Sequence, token: int, logprob: dict[int, Logprob] | None) -> str | None:
        """Add one token to a sequence and run the stop checks; returns the finish reason, if any (the caller
        retires the sequence once the step is done with it)."""
        track = self._tracks[seq]
        seq.token_ids.append(token)
        track.new_tokens.append(token)
        if logprob is not None and track.logprobs is not None:
            track.logprobs.append(logprob)
            track.new_logprobs.append(logprob)
        grammar_end = None  # "stop": the grammar is complete and allows nothing more; "abort": it was broken
        if seq.grammar is not None:
            if not seq.grammar.accept(token):
                # the sampler only draws allowed tokens; a token from elsewhere (a prefill worker) that breaks the
                # grammar ends the sequence rather than let it go on unconstrained
                log.error("request %s: token %d is not allowed by its grammar; ending it", seq.request_id, token)
                grammar_end = "abort"
            elif seq.grammar.is_stopped:
                grammar_end = "stop"
        decision = track.stop.check(token, track.detok.add(token))
        text = decision.text
        if grammar_end is not None and decision.finish_reason in (None, "length"):
            # the output ends here, all of it released (the stop checker may hold text back)
            if decision.finish_reason is None:
                text += track.stop.flush()
            text += track.detok.flush()
            decision.finish_reason, track.stop_reason = grammar_end, None
        elif decision.finish_reason is not None:
            if decision.finish_reason == "length":
                text += track.detok.flush()
            track.stop_reason = decision.stop_reason
        track.text += text
        track.new_text += text
        return decision.finish_reason

    def _logprob_entry(self, logits: torch.Tensor, token: int, k: int) -> dict[int, Logprob]:
        """The chosen token's logprob and rank under the raw logits (vLLM's default), then the k most likely."""
        logprobs = logits.float().log_softmax(-1)
        chosen = float(logprobs[token])
        rank = int((logprobs > chosen).sum()) + 1
        entry = {token: Logprob(chosen, rank, self.tokenizer.decode([token]))}
        top = logprobs.topk(k)
        for r, (tid, lp) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True)):
            entry.setdefault(tid, Logprob(lp, r + 1, self.tokenizer.decode([tid])))
        return entry

    def emit(self, request_id: str) -> RequestOutput:
        """The request's deltas since the last emit; once it has finished, its whole outputs, and it is forgotten."""
        request = self._requests[request_id]
        deltas = []
        for t in request.tracks:
            if t.new_tokens or t.seq.is_finished:
                deltas.append(
                    CompletionDelta(
                        t.seq.index,
                        t.new_tokens,
                        t.new_text,
                        t.new_logprobs if t.logprobs is not None else None,
                        t.seq.finish_reason,
                        t.stop_reason,
                    )
                )
                t.new_tokens, t.new_text, t.new_logprobs = [], "", []
        first = request.tracks[0].seq
        out = RequestOutput(
            request_id,
            first.num_prompt_tokens,
            first.num_cached_tokens or 0,
            deltas,
            request.finished,
            prompt=request.prompt,
            scheduled_at=first.scheduled_at,
        )
        if out.finished:
            out.prompt_token_ids = first.prompt_token_ids
            out.outputs = [self._final(t) for t in request.tracks]
            self.remove(request_id)
        return out

    def _final(self, t: _Track) -> CompletionOutput:
        seq = t.seq
        spec = SpecStats(seq.num_spec_steps, seq.num_drafted, seq.num_accepted) if self.spec_stats else None
        return CompletionOutput(
            seq.index, t.text, seq.output_token_ids, t.logprobs, seq.finish_reason, t.stop_reason, spec
        )

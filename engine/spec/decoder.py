"""MTP speculative decoding inside an engine step: how many drafts, verifying them, and drafting the next ones.

A decoding sequence carries the drafts proposed last step; the engine schedules them as extra tokens, and this
collaborator turns the target's logits over them into accepted tokens (rolling the rest back), then runs the MTP
layer's catch-up over the accepted positions and drafts again. Where a whole step is greedy pure decode, on CUDA,
all of it is one graph replay (`graphs.SpecDecodeGraphs`).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from glmserve.model.model_runner import ModelRunner, SeqChunk, StepOutput
from glmserve.model.mtp_drafter import MTPDrafter

from ..sampler import Sampler, SamplingBatch, draw
from ..scheduler import Scheduler
from ..sequence import Sequence
from .graphs import SpecDecodeGraphs
from .policy import SpeculationPolicy
from .verify import verify_drafts

# Sequences -> their sampling batch; `extra[i]` are tokens row i's penalties count beyond its outputs (drafts).
BatchOf = Callable[[list[Sequence], list[list[int]] | None], SamplingBatch]


@dataclass
class GraphStep:
    """A speculative step run as one replay: per ready sequence, its new tokens and their hidden states."""

    tokens: list[list[int]]
    hidden: torch.Tensor  # [n, K+1, hidden]
    drafts: list[list[int]]  # the next drafts, before each sequence's cap
    captured: bool  # this step captured its graph (its time is not a replay's)


class SpeculativeDecoder:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        sampler: Sampler,
        batch_of: BatchOf,
        num_speculative_tokens: int,
        max_model_len: int,
    ):
        self.scheduler = scheduler
        self.sampler = sampler
        self.batch_of = batch_of
        self.max_model_len = max_model_len
        self.drafter = MTPDrafter(runner)
        self.graphs = None
        if runner.graphs is not None:
            plain = runner.graphs
            self.graphs = SpecDecodeGraphs(
                runner, self.drafter, plain.max_batch, num_speculative_tokens, plain.graphs.capture
            )
        # with step graphs, K is all or nothing: a graph per K would multiply captures for little gain
        choices = (0, num_speculative_tokens) if self.graphs is not None else None
        self.policy = SpeculationPolicy(num_speculative_tokens, choices=choices)

    def k_for(self, seq: Sequence, k_policy: int) -> int:
        """Drafts for `seq`: the policy's K, lowered by the request's cap and by the room left before max_model_len
        (draft i sits at position num_tokens + i - 1; the sequence ends at max_model_len anyway)."""
        cap = seq.params.num_speculative_tokens
        k = k_policy if cap is None else min(cap, k_policy)
        return max(0, min(k, self.max_model_len - seq.num_tokens))

    @staticmethod
    def drop_drafts(seq: Sequence, n: int) -> None:
        """Take the last n drafts back out of the sequence (not scheduled, or verified)."""
        if n <= 0:
            return
        del seq.token_ids[-n:]
        seq.drafts = seq.drafts[: len(seq.drafts) - n]
        seq.draft_probs = None if seq.draft_probs is None else seq.draft_probs[: len(seq.drafts)]

    # ---- one replay per step ----
    def graph_drafts(self, scheduled, ready: list[Sequence], chunks: list[SeqChunk], k: int) -> int | None:
        """How many drafts to make if this step can run as one speculative-step graph (a pure decode step of
        argmax-only requests, with blocks for the next drafts), else None."""
        if self.graphs is None or len(ready) != len(scheduled) or not self.graphs.accepts(chunks):
            return None
        # outputs so far: token_ids holds the drafts under verification too
        if not all(seq.params.argmax_only(seq.num_tokens - seq.num_prompt_tokens - len(seq.drafts)) for seq in ready):
            return None
        num_drafts = max(self.k_for(seq, k) for seq in ready)
        verified = max(len(c.token_ids) for c in chunks)
        for seq, chunk in zip(ready, chunks, strict=True):
            needed = chunk.start_pos + verified - 1 + num_drafts  # tokens, up to the last draft pass's position
            if needed > self.max_model_len or not self.scheduler.ensure_blocks(seq, needed):
                return None  # near the end of the context: the eager path drafts fewer for this sequence
        return num_drafts

    def graph_step(self, ready: list[Sequence], chunks: list[SeqChunk], num_drafts: int) -> GraphStep:
        """Verify, catch up and draft in one replay; the verification is counted and rolled back here."""
        out = self.graphs.run(chunks, num_drafts)
        tokens = []
        for i, seq in enumerate(ready):
            kept = out.target[i][: out.accepted[i] + 1]
            if seq.drafts:
                self._accept(seq, len(self._take_drafts(seq)[0]), kept)
            seq.draft_probs = None
            tokens.append(kept)
        return GraphStep(tokens, out.hidden, out.drafts, out.captured)

    # ---- eager ----
    def verify(self, seq: Sequence, logits: torch.Tensor) -> list[int]:
        """Accept a prefix of the drafts and add one target token (`logits`: the rows of the verified positions)."""
        drafts, draft_probs = self._take_drafts(seq)
        k = len(drafts)
        # row i's penalties count the outputs and the drafts before it
        batch = self.batch_of([seq] * (k + 1), [drafts[:i] for i in range(k + 1)])
        target = self.sampler.probs(logits, batch)
        tokens = verify_drafts(target, drafts, draft_probs, batch.generators[0], seq.params.is_greedy)
        self._accept(seq, k, tokens)
        return tokens

    def draft(self, scheduled, chunks: list[SeqChunk], result: StepOutput, finishing: dict, k_policy: int) -> None:
        """MTP catch-up on every position whose next token is now known, then drafts for decoding sequences."""
        mtp_chunks, rows, drafting = [], [], []
        offset = 0
        # In a step with prompt chunks, with step graphs, drafts come cheaper from the next (captured) decode step,
        # padded beside sequences that have drafts, than from eager draft passes over the whole batch now.
        defer = self.graphs is not None and any(len(c.token_ids) > c.num_logits for c in chunks)
        for (seq, n), chunk in zip(scheduled, chunks, strict=True):
            start = chunk.start_pos
            valid = min(n, seq.num_computed_tokens - start)  # rejected drafts are not valid positions
            end = start + valid
            if valid > 0 and seq.num_tokens > end:  # the next token of the last valid position is known
                want = (
                    0
                    if seq in finishing or seq.num_computed_tokens < seq.num_tokens - 1 or defer
                    else self.k_for(seq, k_policy)
                )
                ok = want > 0 and self.scheduler.ensure_blocks(seq, seq.num_tokens + want)
                next_tokens = seq.token_ids[start + 1 : end + 1]
                mtp_chunks.append(SeqChunk(next_tokens, start, seq.block_table, int(ok), seq.request_id))
                rows.append(torch.arange(offset, offset + valid))
                if ok:
                    drafting.append((seq, want, len(mtp_chunks) - 1))
            offset += n
        for seq, _ in scheduled:
            seq.drafts, seq.draft_probs = [], None
        if not mtp_chunks:
            return
        out = self.drafter.run(mtp_chunks, result.all_hidden[torch.cat(rows).to(result.all_hidden.device)])
        if not drafting:
            return
        remaining = {s: want for s, want, _ in drafting}
        active = [s for s, _, _ in drafting]
        # IndexShare for MTP: every draft step reuses the picks of the catch-up pass (None: each step picks anew)
        picks = self.drafter.reusable(out)
        if picks is not None:
            picks = [picks[i] for _, _, i in drafting]
        hidden, logits = out.hidden, out.logits
        while True:
            batch = self.batch_of(active, [s.drafts for s in active])
            probs = self.sampler.probs(logits, batch)
            for i, s in enumerate(active):
                token = int(probs[i].argmax()) if s.params.is_greedy else int(draw(probs[i], batch.generators[i]))
                s.drafts.append(token)
                if not s.params.is_greedy:
                    q = probs[i : i + 1]
                    s.draft_probs = q if s.draft_probs is None else torch.cat((s.draft_probs, q))
            keep = [i for i, s in enumerate(active) if len(s.drafts) < remaining[s]]
            if not keep:
                return
            active = [active[i] for i in keep]
            picks = None if picks is None else [picks[i] for i in keep]
            step_chunks = [
                # draft i sits at sequence position num_tokens + i - 1, so MTP position num_tokens + i - 2 reads it
                SeqChunk([s.drafts[-1]], s.num_tokens - 2 + len(s.drafts), s.block_table, 1, s.request_id)
                for s in active
            ]
            out = self.drafter.run(step_chunks, hidden[keep], picks)
            hidden, logits = out.hidden, out.logits

    def _take_drafts(self, seq: Sequence) -> tuple[list[int], torch.Tensor | None]:
        """Remove the verified drafts from the sequence; returns them and their probabilities."""
        drafts, probs = seq.drafts, seq.draft_probs
        self.drop_drafts(seq, len(drafts))
        return drafts, probs

    def _accept(self, seq: Sequence, k: int, tokens: list[int]) -> None:
        """Count a verification of k drafts that kept `tokens` (accepted drafts, then one target token). The
        positions after them hold KV of rejected tokens: they are recomputed (and their MTP entries rewritten)
        before anything reads them, so rolling back is forgetting them."""
        self.policy.record_verification(k, len(tokens) - 1)
        seq.num_spec_steps += 1
        seq.num_drafted += k
        seq.num_accepted += len(tokens) - 1
        seq.num_computed_tokens = seq.num_tokens + len(tokens) - 1

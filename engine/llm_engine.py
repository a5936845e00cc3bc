"""The inference engine: scheduler + model runner + sampler + detokenization and stop checks, one step at a time.

`LLMEngine.step()` schedules a batch, runs one forward over it, samples where prompts are complete, and returns
what each request gained. It is synchronous and single-threaded; the offline `LLM` and the decode/prefill workers
drive it.
"""

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from glmserve.engine.block_manager import BlockManager
from glmserve.engine.detokenizer import IncrementalDetokenizer
from glmserve.engine.sampler import Sampler, SamplingBatch, draw, draw_skip
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.stop_checker import StopChecker
from glmserve.kvtransfer.layout import KVLayout
from glmserve.model.glm import GlmForCausalLM
from glmserve.model.kv_cache import KVCacheSpec, PagedKVCache, gpu_kv_budget, num_blocks_for_budget
from glmserve.model.loader import load_model, resolve_dtype
from glmserve.model.model_runner import ModelRunner, SeqChunk, StepOutput
from glmserve.model.mtp_drafter import MTPDrafter
from glmserve.model.tokenizer import Tokenizer

from .engine_args import EngineArgs
from .outputs import CompletionDelta, CompletionOutput, Logprob, RequestOutput, SpecStats
from .remote import RemotePrefill, transfer_layout
from .scheduler import Scheduler
from .sequence import Sequence
from .spec.graphs import SpecDecodeGraphs
from .spec.policy import SpeculationPolicy
from .spec.verify import verify_drafts
from .validation import check_new_request

log = logging.getLogger(__name__)

CPU_KV_BUDGET = 256 << 20


@dataclass(eq=False)
class _Track:
    """Per-sequence output state the scheduler does not need."""

    seq: Sequence
    index: int  # which of the request's n outputs
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
    request_id: str
    tracks: list[_Track]
    prompt: str | None

    @property
    def finished(self) -> bool:
        return all(t.seq.is_finished for t in self.tracks)


def _load_rank_share(args: EngineArgs, dtype: torch.dtype, device: torch.device) -> GlmForCausalLM:
    """This rank's share of a tensor/expert-parallel replica; the ranks already form the default process group."""
    from glmserve.model.default_checkpoint import default_checkpoint
    from glmserve.model.parallel import ParallelConfig, ParallelContext, load_parallel_model

    if not torch.distributed.is_initialized():
        raise ValueError(
            "tensor_parallel_size / expert_parallel_size > 1: start the replica's ranks in one torch.distributed "
            "process group first (glmserve.model.parallel.init_parallel)"
        )
    config = ParallelConfig(tp_size=args.tensor_parallel_size, ep_size=args.expert_parallel_size)
    return load_parallel_model(args.model or default_checkpoint(), ParallelContext.create(config), dtype, device)


class LLMEngine:
    def __init__(self, args: EngineArgs | None = None, **kwargs):
        args = args or EngineArgs(**kwargs)
        self.args = args
        device = torch.device(
            "cuda"
            if args.device == "auto" and torch.cuda.is_available()
            else ("cpu" if args.device == "auto" else args.device)
        )
        dtype = resolve_dtype(
            ("bfloat16" if device.type == "cuda" else "float32") if args.dtype == "auto" else args.dtype
        )
        self.device = device
        if args.tensor_parallel_size > 1 or args.expert_parallel_size > 1:
            self.model = _load_rank_share(args, dtype, device)
        else:
            self.model = load_model(args.model, dtype=dtype, device=device)
        self.config = self.model.config
        from glmserve.model.default_checkpoint import default_checkpoint

        self.tokenizer = Tokenizer.from_pretrained(args.model or default_checkpoint())
        spec = KVCacheSpec.from_config(self.config, dtype, args.block_size)
        if args.num_gpu_blocks_override:
            num_blocks = args.num_gpu_blocks_override
        elif args.kv_cache_memory_bytes:
            num_blocks = num_blocks_for_budget(spec, args.kv_cache_memory_bytes)
        elif device.type == "cuda":
            num_blocks = num_blocks_for_budget(spec, gpu_kv_budget(device, args.gpu_memory_utilization))
        else:
            num_blocks = num_blocks_for_budget(spec, CPU_KV_BUDGET)
        if num_blocks < 1:
            raise ValueError(
                f"no room for a KV cache ({num_blocks} blocks): gpu_memory_utilization={args.gpu_memory_utilization} "
                "of the GPU is already in use (another engine in this process?); set kv_cache_memory_bytes"
            )
        self.cache = PagedKVCache(spec, num_blocks, device)
        self.max_model_len = min(args.max_model_len or self.config.max_position_embeddings, self.cache.max_tokens)
        log.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.1f KiB/token); max_model_len %d",
            num_blocks,
            args.block_size,
            self.cache.max_tokens,
            spec.bytes_per_token / 1024,
            self.max_model_len,
        )
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.cache)
        self.drafter = MTPDrafter(self.runner) if args.num_speculative_tokens > 0 else None
        self.spec_graphs = None
        if self.drafter is not None and self.runner.graphs is not None:
            graphs = self.runner.graphs
            self.spec_graphs = SpecDecodeGraphs(
                self.runner, self.drafter, graphs.max_batch, args.num_speculative_tokens, graphs.graphs.capture
            )
        k = args.num_speculative_tokens
        choices = (0, k) if self.spec_graphs is not None else None
        self.policy = SpeculationPolicy(k, choices=choices)
        self.sampler = Sampler()
        self.default_generator = torch.Generator(device="cpu").manual_seed(args.seed)
        self._arrival = itertools.count()
        self._requests: dict[str, _Request] = {}
        self._tracks: dict[Sequence, _Track] = {}
        # Gets (request id, final hidden state) of every sampled position; prefill workers send it on for MTP.
        self.hidden_hook: Callable[[str, torch.Tensor], None] | None = None

    # ---- requests ----
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        remote_prefill_min_tokens: int | None = None,
    ) -> RemotePrefill | None:
        """Queue a request. Bad input raises InvalidRequest naming the field; nothing else is affected.

        With `remote_prefill_min_tokens`, a prompt with at least that many uncached tokens is not queued: its blocks
        are reserved and the returned plan says which of them a prefill worker must fill (`complete_remote` or
        `fail_remote` follows).
        """
        params = params or SamplingParams()
        ids = check_new_request(
            request_id, prompt, params, self.tokenizer, self._requests, self.config.vocab_size, self.max_model_len
        )
        tracks = []
        for i in range(params.n):
            seq = Sequence(f"{request_id}#{i}", ids, params, arrival=next(self._arrival))
            if params.seed is not None:
                seq.generator = torch.Generator(device="cpu").manual_seed(params.seed + i)
            track = _Track(
                seq,
                i,
                IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens),
                StopChecker(params, self.tokenizer.eos_token_ids, self.max_model_len, len(ids)),
                logprobs=[] if params.logprobs is not None else None,
            )
            tracks.append(track)
            self._tracks[seq] = track
        request = _Request(request_id, tracks, prompt if isinstance(prompt, str) else None)
        self._requests[request_id] = request
        if remote_prefill_min_tokens is not None and params.n == 1:
            plan = self._reserve_remote(tracks[0].seq, remote_prefill_min_tokens)
            if plan is not None:
                return plan
        for track in tracks:
            self.scheduler.add(track.seq)
        return None

    # ---- disaggregated prefill ----
    def _reserve_remote(self, seq: Sequence, min_tokens: int) -> RemotePrefill | None:
        if seq.num_tokens - self.scheduler.cached_prefix_tokens(seq) < min_tokens:
            return None  # short enough to prefill here
        if not self.scheduler.reserve_remote(seq):
            return None  # no room for the whole prompt now: queue it here, the scheduler will make room
        return RemotePrefill(
            seq.request_id.rpartition("#")[0],
            list(seq.block_table),
            seq.num_computed_tokens,
            seq.num_tokens - seq.num_computed_tokens,
        )

    def complete_remote(self, request_id: str, first_token: int, logprob: dict[int, Logprob] | None) -> RequestOutput:
        """The prefill worker filled the reserved blocks and sampled the first token: decode from here."""
        request = self._requests[request_id]
        track = request.tracks[0]
        self.scheduler.resume_remote(track.seq)
        if track.seq.generator is not None:
            draw_skip(track.seq.generator, self.config.vocab_size)  # the prefill worker made this request's 1st draw
        self._append(track, first_token, logprob if track.logprobs is not None else None)
        return self._emit(request)

    def fail_remote(self, request_id: str, recompute: bool) -> None:
        """The remote prefill failed. Recompute here (blocks freed, queued first) or end the request."""
        request = self._requests.get(request_id)
        if request is None:
            return
        seq = request.tracks[0].seq
        if recompute:
            self.scheduler.requeue(seq)
        else:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        for track in request.tracks if request else ():
            if not track.seq.is_finished:
                self.scheduler.finish(track.seq, "abort")
            del self._tracks[track.seq]

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def has_work(self) -> bool:
        """Whether a step would run anything (requests waiting on a remote prefill do not count)."""
        return self.scheduler.has_work

    @property
    def idle(self) -> bool:
        """Nothing queued or running and every KV block free (tests use it to check that nothing leaked)."""
        return not self.scheduler.has_work and self.block_manager.num_free_blocks == self.block_manager.num_blocks

    def transfer_layout(self) -> tuple[KVLayout, list[torch.Tensor], dict[int, torch.Tensor]]:
        """The KV a remote prefill moves, and its pools: every main layer, and the MTP layer's when speculation is on
        (otherwise nobody computes it)."""
        return transfer_layout(self.cache, self.config.num_hidden_layers + (1 if self.drafter is not None else 0))

    def stats(self) -> dict[str, float]:
        """Counters for metrics and routing, under the names /metrics exports them by."""
        blocks, policy = self.block_manager, self.policy
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": blocks.usage,
            "prefix_cache_queries": blocks.prefix_queries,
            "prefix_cache_hits": blocks.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "spec_decode_num_draft_tokens": sum(policy.drafted),
            "spec_decode_num_accepted_tokens": sum(policy.accepted),
            **{f"spec_decode_accepted_pos{i}": n for i, n in enumerate(policy.accepted)},
            **{f"spec_decode_drafted_pos{i}": n for i, n in enumerate(policy.drafted)},
        }

    # ---- stepping ----
    def step(self) -> list[RequestOutput]:
        """One scheduling step and one forward; returns the requests that advanced, with this step's deltas.

        With speculation on, decoding sequences carry the drafts proposed last step: they are scheduled as extra
        tokens, verified against the target's logits, the rejected ones rolled back, and the MTP layer then catches
        up on the accepted positions and drafts the next ones."""
        k = 0
        if self.drafter is not None:
            k = self.policy.choose(len(self.scheduler.running)) if self.args.adaptive_speculation else self.policy.max_k
        for seq in self.scheduler.running:
            seq.token_ids += seq.drafts  # to be verified; removed again below if not scheduled
        plan = self.scheduler.schedule()
        for seq in plan.preempted:
            self._drop_drafts(seq, len(seq.drafts))
        chunks, ready = [], []
        for seq, n in plan.scheduled:
            unscheduled = seq.num_tokens - seq.num_computed_tokens
            self._drop_drafts(seq, min(unscheduled, len(seq.drafts)))  # drafts the budget left out
            start = seq.num_computed_tokens - n
            done = seq.num_computed_tokens == seq.num_tokens
            num_logits = 1 + len(seq.drafts) if done else 0
            chunks.append(
                SeqChunk(seq.token_ids[start : start + n], start, seq.block_table, num_logits, seq.request_id)
            )
            if done:
                ready.append(seq)
        if not chunks:
            return []
        t0 = time.perf_counter()
        num_drafts = self._spec_graph_drafts(plan.scheduled, ready, chunks, k)
        captured = False
        if num_drafts is not None:
            finishing, captured = self._spec_graph_step(ready, chunks, k, num_drafts)
        else:
            result = self.runner.forward(chunks, keep_all_hidden=self.drafter is not None)
            finishing = self._sample_or_verify(ready, result)
        for seq, _ in plan.scheduled:
            self.scheduler.publish_full_blocks(seq)
        if self.drafter is not None:
            if num_drafts is None:
                self._draft(plan.scheduled, chunks, result, finishing, k)
            # a pure decode step times the verify + draft cost of k (not one that captured its graph, nor one that
            # ended prompts: every sequence is then ready too, but the step was a prefill)
            decoding = all(c.num_logits == len(c.token_ids) for c in chunks)
            if decoding and not captured:
                self.policy.record_step(len(ready), k, time.perf_counter() - t0)
        for seq, reason in finishing.items():
            self.scheduler.finish(seq, reason)
        advanced = dict.fromkeys(seq.request_id.rpartition("#")[0] for seq in ready)
        return [self._emit(self._requests[rid]) for rid in advanced]

    def _drop_drafts(self, seq: Sequence, n: int) -> None:
        if n <= 0:
            return
        del seq.token_ids[-n:]
        seq.drafts = seq.drafts[: len(seq.drafts) - n]
        seq.draft_probs = None if seq.draft_probs is None else seq.draft_probs[: len(seq.drafts)]

    def _sampling_batch(self, seqs: list[Sequence], extra: list[list[int]] | None = None) -> SamplingBatch:
        """One row per sequence; `extra[i]` are tokens the row's penalties count beyond its outputs (drafts)."""
        return SamplingBatch(
            params=[s.params for s in seqs],
            prompt_token_ids=[s.prompt_token_ids for s in seqs],
            output_token_ids=[s.output_token_ids + (extra[i] if extra else []) for i, s in enumerate(seqs)],
            generators=[s.generator or self.default_generator for s in seqs],
            eos_token_ids=tuple(self.tokenizer.eos_token_ids),
        )

    def _sample_or_verify(self, ready: list[Sequence], result: StepOutput) -> dict[Sequence, str]:
        """Turn each ready sequence's logits rows into new tokens; returns the sequences that finished."""
        first_row, row = {}, 0
        for seq in ready:
            first_row[seq] = row
            row += 1 + len(seq.drafts)
        plain = [s for s in ready if not s.drafts]
        new_tokens: dict[Sequence, list[int]] = {}
        if plain:
            sampled = self.sampler.sample(result.logits[[first_row[s] for s in plain]], self._sampling_batch(plain))
            new_tokens.update(zip(plain, ([t] for t in sampled.tolist()), strict=True))
        for seq in ready:
            if seq.drafts:
                rows = result.logits[first_row[seq] : first_row[seq] + 1 + len(seq.drafts)]
                new_tokens[seq] = self._verify(seq, rows)
        finishing: dict[Sequence, str] = {}
        for seq in ready:
            rows = slice(first_row[seq], first_row[seq] + len(new_tokens[seq]))
            reason = self._commit(seq, new_tokens[seq], result.logits[rows], result.hidden[rows])
            if reason is not None:
                finishing[seq] = reason
        return finishing

    def _spec_graph_drafts(self, scheduled, ready: list[Sequence], chunks: list[SeqChunk], k: int) -> int | None:
        """How many drafts to make if this step can run as one speculative-step graph (a pure decode step of
        argmax-only requests, with blocks for the next drafts), else None."""
        if self.spec_graphs is None or len(ready) != len(scheduled) or not self.spec_graphs.accepts(chunks):
            return None
        # outputs so far: token_ids holds the drafts under verification too
        if not all(seq.params.argmax_only(seq.num_tokens - seq.num_prompt_tokens - len(seq.drafts)) for seq in ready):
            return None
        num_drafts = max(self._k_for(seq, k) for seq in ready)
        verified = max(len(c.token_ids) for c in chunks)
        for seq, chunk in zip(ready, chunks, strict=True):
            needed = chunk.start_pos + verified - 1 + num_drafts  # tokens, up to the last draft pass's position
            if needed > self.max_model_len or not self.scheduler.ensure_blocks(seq, needed):
                return None  # near the end of the context: the eager path drafts fewer for this sequence
        return num_drafts

    def _spec_graph_step(
        self, ready: list[Sequence], chunks: list[SeqChunk], k: int, num_drafts: int
    ) -> tuple[dict[Sequence, str], bool]:
        """Verify, catch up and draft in one replay; then the same bookkeeping as the eager path. Returns the
        finished sequences and whether the graph was captured in this step."""
        out = self.spec_graphs.run(chunks, num_drafts)
        finishing: dict[Sequence, str] = {}
        for i, seq in enumerate(ready):
            tokens = out.target[i][: out.accepted[i] + 1]
            if seq.drafts:
                self._accept(seq, len(self._take_drafts(seq)[0]), tokens)
            reason = self._commit(seq, tokens, None, out.hidden[i])
            seq.draft_probs = None
            if reason is None:
                seq.drafts = out.drafts[i][: self._k_for(seq, k)]
            else:
                finishing[seq], seq.drafts = reason, []
        return finishing, out.captured

    def _commit(
        self, seq: Sequence, tokens: list[int], logits: torch.Tensor | None, hidden: torch.Tensor
    ) -> str | None:
        """Append a step's new tokens to one sequence, up to the first that finishes it (its reason is returned).
        `logits` / `hidden`: the sequence's rows of the step, one per new token (logits only for logprobs)."""
        reason = None
        for j, token in enumerate(tokens):
            entry = None
            if seq.params.logprobs is not None:
                entry = self._logprob_entry(logits[j], token, seq.params.logprobs)
            reason = self._append(self._tracks[seq], token, entry)
            if reason is not None:
                break
        if self.hidden_hook is not None:
            self.hidden_hook(seq.request_id.rpartition("#")[0], hidden[len(tokens) - 1])
        return reason

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> list[int]:
        """Accept a prefix of the drafts and add one target token."""
        drafts, draft_probs = self._take_drafts(seq)
        k = len(drafts)
        # row i's penalties count the outputs and the drafts before it
        batch = self._sampling_batch([seq] * (k + 1), [drafts[:i] for i in range(k + 1)])
        target = self.sampler.probs(logits, batch)
        tokens = verify_drafts(target, drafts, draft_probs, batch.generators[0], seq.params.is_greedy)
        self._accept(seq, k, tokens)
        return tokens

    def _take_drafts(self, seq: Sequence) -> tuple[list[int], torch.Tensor | None]:
        """Remove the verified drafts from the sequence; returns them and their probabilities."""
        drafts, probs = seq.drafts, seq.draft_probs
        self._drop_drafts(seq, len(drafts))
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

    def _append(self, track: _Track, token: int, logprob: dict[int, Logprob] | None) -> str | None:
        """Add one token to a sequence and run the stop checks; returns the finish reason, if any (the caller
        retires the sequence once the step is done with it)."""
        seq = track.seq
        seq.token_ids.append(token)
        track.new_tokens.append(token)
        if logprob is not None:
            track.logprobs.append(logprob)
            track.new_logprobs.append(logprob)
        decision = track.stop.check(token, track.detok.add(token))
        text = decision.text
        if decision.finish_reason is not None:
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

    def _draft(self, scheduled, chunks: list[SeqChunk], result: StepOutput, finishing: dict, k_policy: int) -> None:
        """MTP catch-up on every position whose next token is now known, then drafts for decoding sequences."""
        mtp_chunks, rows, drafting = [], [], []
        offset = 0
        # In a step with prompt chunks, with step graphs, drafts come cheaper from the next (captured) decode step,
        # padded beside sequences that have drafts, than from eager draft passes over the whole batch now.
        defer = self.spec_graphs is not None and any(len(c.token_ids) > c.num_logits for c in chunks)
        for (seq, n), chunk in zip(scheduled, chunks, strict=True):
            start = chunk.start_pos
            valid = min(n, seq.num_computed_tokens - start)  # rejected drafts are not valid positions
            end = start + valid
            if valid > 0 and seq.num_tokens > end:  # the next token of the last valid position is known
                want = (
                    0
                    if seq in finishing or seq.num_computed_tokens < seq.num_tokens - 1 or defer
                    else self._k_for(seq, k_policy)
                )
                ok = want > 0 and self.scheduler.ensure_blocks(seq, seq.num_tokens + want)
                mtp_chunks.append(
                    SeqChunk(seq.token_ids[start + 1 : end + 1], start, seq.block_table, int(ok), seq.request_id)
                )
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
            batch = self._sampling_batch(active, [s.drafts for s in active])
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

    def _k_for(self, seq: Sequence, k_policy: int) -> int:
        """Drafts for `seq`: the policy's K, lowered by the request's cap and by the room left before max_model_len
        (draft i sits at position num_tokens + i - 1; the sequence ends at max_model_len anyway)."""
        cap = seq.params.num_speculative_tokens
        k = k_policy if cap is None else min(cap, k_policy)
        return max(0, min(k, self.max_model_len - seq.num_tokens))

    def _emit(self, request: _Request) -> RequestOutput:
        deltas = []
        for t in request.tracks:
            if t.new_tokens or t.seq.is_finished:
                deltas.append(
                    CompletionDelta(
                        t.index,
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
            request.request_id,
            first.num_prompt_tokens,
            first.num_cached_tokens or 0,
            deltas,
            request.finished,
            prompt=request.prompt,
        )
        if out.finished:
            out.prompt_token_ids = first.prompt_token_ids
            out.outputs = [
                CompletionOutput(
                    t.index,
                    t.text,
                    t.seq.output_token_ids,
                    t.logprobs,
                    t.seq.finish_reason,
                    t.stop_reason,
                    SpecStats(t.seq.num_spec_steps, t.seq.num_drafted, t.seq.num_accepted) if self.drafter else None,
                )
                for t in request.tracks
            ]
            del self._requests[request.request_id]
            for t in request.tracks:
                del self._tracks[t.seq]
        return out

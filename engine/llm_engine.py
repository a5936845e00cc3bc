"""The inference engine: scheduler + model runner + sampler + detokenization and stop checks, one step at a time.

`LLMEngine.step()` schedules a batch, runs one forward over it, samples where prompts are complete, and returns
what each request gained. It is synchronous and single-threaded; the offline `LLM` and the decode/prefill workers
drive it.
"""

import itertools
import logging
import time
from collections.abc import Callable

import torch

from glmserve.kvtransfer.layout import KVLayout
from glmserve.model.config import GlmConfig
from glmserve.model.cuda_graphs import DecodeGraphs
from glmserve.model.fusion import fusable, graph_safe
from glmserve.model.glm import GlmForCausalLM
from glmserve.model.kv_cache import KVCacheSpec, PagedKVCache
from glmserve.model.loader import load_model, resolve_dtype
from glmserve.model.model_runner import ModelRunner, SeqChunk, StepOutput
from glmserve.model.tokenizer import Tokenizer

from .block_manager import BlockManager
from .engine_args import EngineArgs
from .grammar import GrammarCompiler
from .kv_sizing import num_kv_blocks
from .output_tracker import OutputTracker
from .outputs import Logprob, RequestOutput
from .remote import RemotePrefill, transfer_layout
from .sampler import Sampler, SamplingBatch, draw_skip
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .spec.decoder import SpeculativeDecoder
from .validation import check_new_request

log = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 128  # decode steps of up to this many sequences replay as CUDA graphs


def _load_rank_share(args: EngineArgs, dtype: torch.dtype, device: torch.device, fused: bool) -> GlmForCausalLM:
    """This rank's share of a tensor/expert-parallel replica; the ranks already form the default process group."""
    from glmserve.model.default_checkpoint import default_checkpoint
    from glmserve.model.parallel import ParallelConfig, ParallelContext, load_parallel_model

    if not torch.distributed.is_initialized():
        raise ValueError(
            "tensor_parallel_size / expert_parallel_size > 1: start the replica's ranks in one torch.distributed "
            "process group first (glmserve.model.parallel.init_parallel)"
        )
    config = ParallelConfig(tp_size=args.tensor_parallel_size, ep_size=args.expert_parallel_size)
    context = ParallelContext.create(config)
    return load_parallel_model(args.model or default_checkpoint(), context, dtype, device, fused)


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
        from glmserve.model.default_checkpoint import default_checkpoint

        checkpoint = args.model or default_checkpoint()
        fused = fusable(GlmConfig.from_pretrained(checkpoint), device)
        if device.type == "cuda" and not fused:
            log.warning("model dims do not suit the Triton kernels (powers of two >= 16): running plain torch")
        if args.tensor_parallel_size > 1 or args.expert_parallel_size > 1:
            self.model = _load_rank_share(args, dtype, device, fused)
        else:
            self.model = load_model(checkpoint, dtype=dtype, device=device, fused=fused)
        self.config = self.model.config
        self.tokenizer = Tokenizer.from_pretrained(checkpoint)
        spec = KVCacheSpec.from_config(self.config, dtype, args.block_size)
        num_blocks = num_kv_blocks(args, spec, device)
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
        if fused and graph_safe(self.model):
            self.runner.graphs = DecodeGraphs(self.runner, MAX_GRAPH_BATCH)
        self.sampler = Sampler()
        # structured output: grammars compiled once per spec (the API may compile them first, off this thread)
        self.grammars = GrammarCompiler(self.tokenizer, self.config.vocab_size)
        self.default_generator = torch.Generator(device="cpu").manual_seed(args.seed)
        self.spec = None
        if args.num_speculative_tokens > 0:
            self.spec = SpeculativeDecoder(
                self.runner,
                self.scheduler,
                self.sampler,
                self._sampling_batch,
                args.num_speculative_tokens,
                self.max_model_len,
            )
        self.outputs = OutputTracker(self.tokenizer, self.max_model_len, spec_stats=self.spec is not None)
        self._arrival = itertools.count()
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
            request_id, prompt, params, self.tokenizer, self.outputs, self.config.vocab_size, self.max_model_len
        )
        grammar = None if params.structured_outputs is None else self.grammars.compile(params.structured_outputs)
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id, ids, params, arrival=next(self._arrival), index=i)
            if params.seed is not None:
                seq.generator = torch.Generator(device="cpu").manual_seed(params.seed + i)
            if grammar is not None:
                seq.grammar = grammar.matcher()
            seqs.append(seq)
        self.outputs.add(prompt, seqs)
        if remote_prefill_min_tokens is not None and params.n == 1:
            plan = self._reserve_remote(seqs[0], remote_prefill_min_tokens)
            if plan is not None:
                return plan
        for seq in seqs:
            self.scheduler.add(seq)
        return None

    # ---- disaggregated prefill ----
    def _reserve_remote(self, seq: Sequence, min_tokens: int) -> RemotePrefill | None:
        if seq.num_tokens - self.scheduler.cached_prefix_tokens(seq) < min_tokens:
            return None  # short enough to prefill here
        if not self.scheduler.reserve_remote(seq):
            return None  # no room for the whole prompt now: queue it here, the scheduler will make room
        return RemotePrefill(
            seq.request_id,
            list(seq.block_table),
            seq.num_computed_tokens,
            seq.num_tokens - seq.num_computed_tokens,
        )

    def complete_remote(self, request_id: str, first_token: int, logprob: dict[int, Logprob] | None) -> RequestOutput:
        """The prefill worker filled the reserved blocks and sampled the first token (under the request's grammar,
        if it has one: the worker's engine enforces the same params): decode from here."""
        seq = self.outputs.sequences(request_id)[0]
        self.scheduler.resume_remote(seq)
        if seq.generator is not None:
            draw_skip(seq.generator, self.config.vocab_size)  # the prefill worker made this request's 1st draw
        reason = self.outputs.append(seq, first_token, logprob)
        if reason is not None:  # e.g. the first token completed the grammar
            self.scheduler.finish(seq, reason)
        return self.outputs.emit(request_id)

    def fail_remote(self, request_id: str, recompute: bool) -> None:
        """The remote prefill failed. Recompute here (blocks freed, queued first) or end the request."""
        if request_id not in self.outputs:
            return
        if recompute:
            self.scheduler.requeue(self.outputs.sequences(request_id)[0])
        else:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        for seq in self.outputs.remove(request_id):
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs)

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
        return transfer_layout(self.cache, self.config.num_hidden_layers + (1 if self.spec is not None else 0))

    def stats(self) -> dict[str, float]:
        """Counters for metrics and routing, under the names /metrics exports them by."""
        blocks = self.block_manager
        stats = {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": blocks.usage,
            "prefix_cache_queries": blocks.prefix_queries,
            "prefix_cache_hits": blocks.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "spec_decode_num_draft_tokens": 0,
            "spec_decode_num_accepted_tokens": 0,
        }
        if self.spec is not None:
            policy = self.spec.policy
            stats["spec_decode_num_draft_tokens"] = sum(policy.drafted)
            stats["spec_decode_num_accepted_tokens"] = sum(policy.accepted)
            stats.update({f"spec_decode_accepted_pos{i}": n for i, n in enumerate(policy.accepted)})
            stats.update({f"spec_decode_drafted_pos{i}": n for i, n in enumerate(policy.drafted)})
        return stats

    # ---- stepping ----
    def step(self) -> list[RequestOutput]:
        """One scheduling step and one forward; returns the requests that advanced, with this step's deltas.

        With speculation on, decoding sequences carry the drafts proposed last step: they are scheduled as extra
        tokens, verified against the target's logits, the rejected ones rolled back, and the MTP layer then catches
        up on the accepted positions and drafts the next ones."""
        spec, k = self.spec, 0
        if spec is not None:
            k = spec.policy.choose(len(self.scheduler.running)) if self.args.adaptive_speculation else spec.policy.max_k
        for seq in self.scheduler.running:
            seq.token_ids += seq.drafts  # to be verified; removed again below if not scheduled
        plan = self.scheduler.schedule()
        for seq in plan.preempted:
            SpeculativeDecoder.drop_drafts(seq, len(seq.drafts))
        chunks, ready = [], []
        for seq, n in plan.scheduled:
            unscheduled = seq.num_tokens - seq.num_computed_tokens
            SpeculativeDecoder.drop_drafts(seq, min(unscheduled, len(seq.drafts)))  # drafts the budget left out
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
        num_drafts = spec.graph_drafts(plan.scheduled, ready, chunks, k) if spec is not None else None
        captured = False
        if num_drafts is not None:
            finishing, captured = self._graph_step(ready, chunks, k, num_drafts)
        else:
            result = self.runner.forward(chunks, keep_all_hidden=spec is not None)
            finishing = self._sample_or_verify(ready, result)
        for seq, _ in plan.scheduled:
            self.scheduler.publish_full_blocks(seq)
        if spec is not None:
            if num_drafts is None:
                spec.draft(plan.scheduled, chunks, result, finishing, k)
            # a pure decode step times the verify + draft cost of k (not one that captured its graph, nor one that
            # ended prompts: every sequence is then ready too, but the step was a prefill)
            decoding = all(c.num_logits == len(c.token_ids) for c in chunks)
            if decoding and not captured:
                spec.policy.record_step(len(ready), k, time.perf_counter() - t0)
        for seq, reason in finishing.items():
            self.scheduler.finish(seq, reason)
        return [self.outputs.emit(rid) for rid in dict.fromkeys(seq.request_id for seq in ready)]

    def _sampling_batch(self, seqs: list[Sequence], extra: list[list[int]] | None = None) -> SamplingBatch:
        """One row per sequence; `extra[i]` are tokens the row comes after beyond the sequence's outputs (drafts):
        its penalties count them, and its grammar mask is the state after them."""
        bitmask = None
        if any(s.grammar is not None for s in seqs):
            bitmask = torch.full((len(seqs), self.grammars.words), -1, dtype=torch.int32)
            for i, s in enumerate(seqs):
                if s.grammar is not None:
                    s.grammar.fill(bitmask[i], extra[i] if extra else ())
        return SamplingBatch(
            params=[s.params for s in seqs],
            prompt_token_ids=[s.prompt_token_ids for s in seqs],
            output_token_ids=[s.output_token_ids + (extra[i] if extra else []) for i, s in enumerate(seqs)],
            generators=[s.generator or self.default_generator for s in seqs],
            eos_token_ids=tuple(self.tokenizer.eos_token_ids),
            bitmask=bitmask,
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
                new_tokens[seq] = self.spec.verify(seq, rows)
        finishing: dict[Sequence, str] = {}
        for seq in ready:
            rows = slice(first_row[seq], first_row[seq] + len(new_tokens[seq]))
            reason = self._commit(seq, new_tokens[seq], result.logits[rows], result.hidden[rows])
            if reason is not None:
                finishing[seq] = reason
        return finishing

    def _graph_step(
        self, ready: list[Sequence], chunks: list[SeqChunk], k: int, num_drafts: int
    ) -> tuple[dict[Sequence, str], bool]:
        """A speculative step as one replay, then the eager path's bookkeeping. Returns the finished sequences and
        whether the graph was captured in this step."""
        out = self.spec.graph_step(ready, chunks, num_drafts)
        finishing: dict[Sequence, str] = {}
        for i, seq in enumerate(ready):
            reason = self._commit(seq, out.tokens[i], None, out.hidden[i])
            if reason is None:
                seq.drafts = out.drafts[i][: self.spec.k_for(seq, k)]
            else:
                finishing[seq], seq.drafts = reason, []
        return finishing, out.captured

    def _commit(
        self, seq: Sequence, tokens: list[int], logits: torch.Tensor | None, hidden: torch.Tensor
    ) -> str | None:
        """Hand a step's new tokens to the output tracker (see `OutputTracker.commit`), and the last one's hidden
        state to the hook."""
        reason = self.outputs.commit(seq, tokens, logits)
        if self.hidden_hook is not None:
            self.hidden_hook(seq.request_id, hidden[len(tokens) - 1])
        return reason

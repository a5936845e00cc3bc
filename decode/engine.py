"""The inference engine: scheduler + model runner + sampler + detokenization and stop checks, one step at a time.

`LLMEngine.step()` schedules a batch, runs one forward over it, samples where prompts are complete, and returns
what each request gained. It is synchronous and single-threaded; the offline `LLM` and the decode/prefill workers
drive it.
"""

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from glmserve.model.block_manager import BlockManager
from glmserve.model.detokenizer import IncrementalDetokenizer
from glmserve.model.kv_cache import KVCacheSpec, PagedKVCache, gpu_kv_budget, num_blocks_for_budget
from glmserve.model.loader import load_model, resolve_dtype
from glmserve.model.model_runner import ModelRunner, SeqChunk
from glmserve.model.sampler import Sampler, SamplerOutput, SamplingBatch, draw_skip
from glmserve.model.sampling_params import SamplingParams
from glmserve.model.stop_checker import StopChecker
from glmserve.model.tokenizer import Tokenizer

from .engine_args import EngineArgs
from .outputs import CompletionDelta, CompletionOutput, Logprob, RequestOutput
from .scheduler import Scheduler
from .sequence import Sequence
from .validation import InvalidRequest, validate_request

log = logging.getLogger(__name__)

CPU_KV_BUDGET = 256 << 20


@dataclass
class RemotePrefill:
    """Which reserved blocks a prefill worker must fill: tokens [start_token, start_token + num_tokens)."""

    request_id: str
    dst_block_ids: list[int]
    start_token: int
    num_tokens: int


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
        if request_id in self._requests:
            raise InvalidRequest(f"request id {request_id!r} is already running", "request_id")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        validate_request(ids, params, self.config.vocab_size, self.max_model_len)
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
        first = seq.num_computed_tokens // self.block_manager.block_size
        return RemotePrefill(
            seq.request_id.rpartition("#")[0],
            seq.block_table[first:],
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

    # ---- stepping ----
    def step(self) -> list[RequestOutput]:
        """One scheduling step and one forward; returns the requests that advanced, with this step's deltas."""
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        chunks, ready = [], []
        for seq, n in plan.scheduled:
            start = seq.num_computed_tokens - n
            done = seq.num_computed_tokens == seq.num_tokens
            chunks.append(SeqChunk(seq.token_ids[start : start + n], start, seq.block_table, int(done), seq.request_id))
            if done:
                ready.append(seq)
        result = self.runner.forward(chunks)
        for seq, _ in plan.scheduled:
            self.scheduler.publish_full_blocks(seq)
        if not ready:
            return []
        batch = SamplingBatch(
            params=[s.params for s in ready],
            prompt_token_ids=[s.prompt_token_ids for s in ready],
            output_token_ids=[s.output_token_ids for s in ready],
            generators=[s.generator or self.default_generator for s in ready],
            eos_token_ids=tuple(self.tokenizer.eos_token_ids),
        )
        sampled = self.sampler.sample(result.logits, batch)
        if self.hidden_hook is not None:
            for i, seq in enumerate(ready):
                self.hidden_hook(seq.request_id.rpartition("#")[0], result.hidden[i])
        advanced: dict[str, _Request] = {}
        for i, seq in enumerate(ready):
            k = seq.params.logprobs
            entry = self._logprob_entry(sampled, i, k) if k is not None else None
            self._append(self._tracks[seq], int(sampled.token_ids[i]), entry)
            rid = seq.request_id.rpartition("#")[0]
            advanced[rid] = self._requests[rid]
        return [self._emit(request) for request in advanced.values()]

    def _append(self, track: _Track, token: int, logprob: dict[int, Logprob] | None) -> None:
        """Add one sampled token to a sequence, run the stop checks, retire it if it finished."""
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
            self.scheduler.finish(seq, decision.finish_reason)
        track.text += text
        track.new_text += text

    def _logprob_entry(self, sampled: SamplerOutput, i: int, k: int) -> dict[int, Logprob]:
        """The sampled token's logprob and rank, then the k most likely tokens."""
        token = int(sampled.token_ids[i])
        entry = {token: Logprob(float(sampled.logprobs[i]), int(sampled.ranks[i]), self.tokenizer.decode([token]))}
        for rank, (tid, lp) in enumerate(
            zip(sampled.top_ids[i, :k].tolist(), sampled.top_logprobs[i, :k].tolist(), strict=True)
        ):
            entry.setdefault(tid, Logprob(lp, rank + 1, self.tokenizer.decode([tid])))
        return entry

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
                    t.index, t.text, t.seq.output_token_ids, t.logprobs, t.seq.finish_reason, t.stop_reason
                )
                for t in request.tracks
            ]
            del self._requests[request.request_id]
            for t in request.tracks:
                del self._tracks[t.seq]
        return out

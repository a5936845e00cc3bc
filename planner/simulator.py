"""A discrete-event simulator of a glmserve deployment, request by request, on the engine's own scheduling code.

Each replica is one engine: its `BlockManager` (`engine/block_manager.py`: KV blocks, reference counts, the LRU prefix
cache) and a `Scheduler` (`engine/scheduler.py`: token budget, `max_num_seqs`, chunked prefill, admission in arrival
order, preemption by recompute, the remote-prefill reservation) driven as `LLMEngine.step` drives them; only the
hashing of token ids is replaced by the trace's block keys (`workload.SimRequest.block_key`). A step lasts what the
role's cost model says. Runs of pure decode steps between events (an arrival, a finish, a block boundary that could
run out of blocks) are advanced in one go, with the same result as stepping them one by one.

A request flows as in `decode/server.py`: the ingress routes it to a decode replica (`cluster/routers.py`'s
least-loaded order over routing stats refreshed every `routing_stats_period_s`, within `max_ongoing_requests`);
between two steps the decode engine looks up its prefix cache, and prefills locally when fewer than
`local_prefill_threshold` tokens are uncached (or there is no prefill replica, or no room to reserve the blocks);
otherwise it reserves the blocks and asks a prefill replica chosen by prefix affinity (rendezvous hashing of the
first block, unless that replica is busier by `PrefixAffinityRouter.IMBALANCE`). The prefill engine computes the
prompt in chunks (its own prefix cache), streams each layer during the last chunk and holds the blocks until the
transfer is done; the decode engine adds the sequence to its batch at its next step boundary and emits the first
token then. With MTP, decoding sequences verify K drafts per step and emit E(K) = 1 + a1 + a1 a2 + ... tokens on
average (a deterministic accumulator per sequence); an adaptive engine picks, per batch size, the K with the most
tokens per second under the cost model, as `engine/spec/policy.py` does with measured times.
"""

import heapq
import logging
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from glmserve.cluster.routers import PrefixAffinityRouter, _load, _rendezvous
from glmserve.engine.block_manager import BlockManager
from glmserve.engine.engine_args import EngineArgs
from glmserve.engine.scheduler import Scheduler
from glmserve.engine.sequence import Status
from glmserve.engine.spec.policy import SpeculationPolicy

from .cost_model import CostModel, TransferModel
from .workload import ENGINE_BLOCK, SimRequest

log = logging.getLogger(__name__)

MACRO_MAX_STEPS = 256  # a run of decode steps advanced at once is split at least this often


class SimulationError(RuntimeError):
    pass


class Overheads(BaseModel):
    """Seconds the serving path adds outside engine steps. Defaults: docs/benchmarks.md's router overhead on the
    2-core CPU machine (HTTP -> Serve proxy -> DecodeServer 11.38 ms p50 against 5.33 ms for the worker alone:
    ~6 ms, split between the way in and the way out) and a Ray handle call for the prefill RPC."""

    model_config = ConfigDict(extra="forbid")

    ingress_s: float = Field(3e-3, ge=0)  # client -> HTTP proxy -> the decode replica's engine thread
    egress_s: float = Field(3e-3, ge=0)  # an engine output -> the client's stream
    prefill_rpc_s: float = Field(3e-3, ge=0)  # decode -> prefill replica call (Ray handle, transfer registration)
    completion_s: float = Field(1e-3, ge=0)  # the transfer's completion reaching the decode engine thread


@dataclass
class RoleSpec:
    """What one replica of a role is: its engine arguments, KV blocks, cost model and size."""

    args: EngineArgs
    cost: CostModel
    num_blocks: int
    max_model_len: int
    replicas: int
    world: int = 1  # ranks per replica (GPUs)
    max_ongoing_requests: int = 256
    acceptance: tuple[float, ...] = (0.8,)  # MTP per-position acceptance rates (the last repeats)
    graph_k_choices: bool = False  # CUDA step graphs: the adaptive policy offers only 0 and K


@dataclass
class ClusterSpec:
    decode: RoleSpec
    prefill: RoleSpec | None
    local_prefill_threshold: int
    transfer: TransferModel
    transfer_bytes_per_token: float  # KV bytes a remote prefill moves per token (every transferred layer)
    transfer_layers: int
    on_failure: str = "recompute"
    overheads: Overheads = field(default_factory=Overheads)
    routing_stats_period_s: float = 1.0


@dataclass(eq=False)
class RequestState:
    req: SimRequest
    decode_replica: "Replica | None" = None
    first_token_s: float | None = None  # absolute
    chunk_times: list[float] = field(default_factory=list)  # absolute times of every output chunk
    finish_s: float | None = None
    output_tokens: int = 0
    error: str | None = None
    remote: bool = False
    cached_tokens: int = 0
    preemptions: int = 0
    local_fallback: bool = False
    missed: bool = False  # counted against the SLO (for stopping a hopeless run early)


class SimSeq:
    """What `engine/scheduler.py` reads and writes of a `Sequence`, without token ids."""

    __slots__ = (
        "request_id", "state", "req", "num_tokens", "num_computed_tokens", "block_table", "block_hashes",
        "num_cached_tokens", "status", "num_preemptions", "drafts", "acc", "target", "decoding", "prompt_len",
        "finish_reason", "scheduled_at",
    )  # fmt: skip

    def __init__(self, state: RequestState, target: int):
        self.request_id = str(state.req.index)
        self.state = state
        self.req = state.req
        self.num_tokens = state.req.input_len
        self.prompt_len = state.req.input_len
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.num_cached_tokens: int | None = None
        self.status = Status.WAITING
        self.num_preemptions = 0
        self.drafts = 0
        self.acc = (state.req.index * 0.6180339887) % 1.0  # accumulator phase: sequences emit out of step
        self.target = target  # total tokens (prompt + outputs) at which it finishes
        self.decoding = False
        self.finish_reason: str | None = None
        self.scheduled_at: float | None = None  # the scheduler stamps it; the simulator keeps its own clock


class SimScheduler(Scheduler):
    """The engine's scheduler with block keys from the trace instead of hashes of token ids."""

    def _cacheable(self, seq: SimSeq) -> list[int]:
        return seq.req.keys((seq.num_tokens - 1) // self.block_size)

    def publish_full_blocks(self, seq: SimSeq) -> None:
        full = seq.num_computed_tokens // self.block_size
        done = len(seq.block_hashes)
        if done >= full:
            return
        keys, table, cache = seq.req.keys(full), seq.block_table, self.blocks.cache_full_block
        for k in range(done, full):
            cache(table[k], keys[k])
        seq.block_hashes.extend(keys[done:full])


class _Stats:
    """What `cluster.routers._load` reads of a replica."""

    def __init__(self, replica_id: str):
        self.replica_id = replica_id
        self.routing_stats: dict[str, float] = {}


class Replica:
    def __init__(self, sim: "ClusterSimulator", role: str, index: int, spec: RoleSpec):
        self.sim, self.role, self.spec = sim, role, spec
        self.name = f"{role}-{index}"
        self.cost = spec.cost
        args = spec.args
        self.blocks = BlockManager(spec.num_blocks, ENGINE_BLOCK, args.enable_prefix_caching)
        self.sched = SimScheduler(self.blocks, args.max_num_seqs, args.max_num_batched_tokens)
        self.max_model_len = spec.max_model_len
        self.max_k = args.num_speculative_tokens
        self.policy = SpeculationPolicy(max(self.max_k, 1))
        rates = list(spec.acceptance) or [0.0]
        self.policy.accept = [rates[min(i, len(rates) - 1)] for i in range(max(self.max_k, 1))]
        self.expected = [self.policy.expected_tokens(k) for k in range(self.max_k + 1)]
        self.k_choices = (
            (0, self.max_k) if spec.graph_k_choices else tuple(range(self.max_k + 1))
        ) if args.adaptive_speculation else (self.max_k,)  # fmt: skip
        self._k_by_bucket: dict[int, int] = {}
        self.inbox: list[Callable[[float], None]] = []
        self.step_end: float | None = None  # the in-flight step's (or run's) end; None when idle
        self.version = 0
        self.pending: tuple | None = None
        self.ongoing = 0
        self.stats = _Stats(self.name)
        self.link_free_s = 0.0  # prefill: when its KV sender is free
        self.steps = 0
        self.busy_s = 0.0

    # ---- commands from outside, applied between steps ----
    def deliver(self, now: float, command: Callable[[float], None]) -> None:
        self.inbox.append(command)
        if self.step_end is None:
            self._boundary(now)
        elif self.pending is not None and self.pending[0] == "run" and now < self.step_end:
            self._truncate(now)

    def _truncate(self, now: float) -> None:
        """A run of decode steps ends with the step in flight at `now`: what arrives waits for the next boundary."""
        _, members, ends, k, start = self.pending
        m = int(np.searchsorted(ends, now, side="left"))  # the step in flight
        if m + 1 < len(ends):
            self.pending = ("run", members, ends[: m + 1], k, start)
            self.version += 1
            self.step_end = float(ends[m])
            self.sim.at(self.step_end, self._on_step_end, self.version)

    def _on_step_end(self, now: float, version: int) -> None:
        if version != self.version:
            return
        pending, self.pending = self.pending, None
        if pending[0] == "run":
            self._finish_run(pending)
        else:
            self._finish_step(now, pending)
        self._boundary(now)

    def _boundary(self, now: float) -> None:
        while self.inbox:
            self.inbox.pop(0)(now)
        if not self.sched.has_work:
            self.step_end = None
            return
        if not self._plan_run(now) and not self._plan_step(now):
            self.step_end = None  # nothing can run until something is freed or arrives
            return
        self.version += 1
        self.sim.at(self.step_end, self._on_step_end, self.version)

    # ---- speculation ----
    def _choose_k(self, batch: int, context: float) -> int:
        if self.max_k == 0 or batch == 0:
            return 0
        if len(self.k_choices) == 1:
            return self.k_choices[0]
        bucket = SpeculationPolicy.bucket(batch)
        k = self._k_by_bucket.get(bucket)
        if k is None:
            ctx = round(context)
            k = max(
                self.k_choices,
                key=lambda k: self.expected[k] / self.cost.step_time((), batch, ctx, k, self.expected[k]),
            )
            self._k_by_bucket[bucket] = k
        return k

    # ---- one step, exactly as LLMEngine.step schedules it ----
    def wake(self, now: float) -> None:
        """Something was freed outside a step: an idle engine with queued work looks again."""
        if self.step_end is None and self.sched.has_work:
            self._boundary(now)

    def _plan_step(self, now: float) -> bool:
        sched = self.sched
        decoding = [s for s in sched.running if s.decoding]
        ctx = sum(s.num_tokens for s in decoding) / len(decoding) if decoding else 0.0
        k = self._choose_k(len(decoding), ctx)
        for s in decoding:
            s.drafts = max(0, min(k, self.max_model_len - s.num_tokens))
            s.num_tokens += s.drafts
        out = sched.schedule()
        for s in out.preempted:
            self._drop_drafts(s, s.drafts)
            s.decoding = False
            s.state.preemptions += 1
        scheduled = {id(s) for s, _ in out.scheduled}
        for s in decoding:
            if id(s) not in scheduled and s.status is Status.RUNNING:
                self._drop_drafts(s, s.drafts)  # the budget left it out this step
        chunks, dec, dec_ctx = [], 0, 0
        for s, n in out.scheduled:
            self._drop_drafts(s, min(s.num_tokens - s.num_computed_tokens, s.drafts))
            if s.decoding:
                dec += 1
                dec_ctx += s.num_tokens - s.drafts
            else:
                chunks.append((n, s.num_computed_tokens - n))
        if not out.scheduled:
            return False
        mean_ctx = round(dec_ctx / dec) if dec else 0
        seconds = self.cost.step_time(tuple(chunks), dec, mean_ctx, k, self.expected[k])
        self.pending = ("step", out.scheduled, now, seconds)
        self.step_end = now + seconds
        self.steps += 1
        self.busy_s += seconds
        return True

    def _finish_step(self, now: float, pending: tuple) -> None:
        _, scheduled, start, seconds = pending
        for s, _ in scheduled:
            if s.status is not Status.RUNNING:
                continue  # aborted meanwhile
            if s.num_computed_tokens == s.num_tokens:  # every scheduled token computed: it samples
                if s.decoding:
                    d = s.drafts
                    e = self._emitted(s, d)
                    self._drop_drafts(s, d)
                    s.num_computed_tokens = s.num_tokens + e - 1
                    s.num_tokens += e
                else:  # a prompt (or a preempted sequence's recompute) is complete
                    s.num_tokens += 1
                    s.decoding = True
                    if s.num_cached_tokens is not None and s.state.first_token_s is None:
                        s.state.cached_tokens = s.num_cached_tokens
                self.sched.publish_full_blocks(s)
                self._emit(now, s, start, seconds)
            else:
                self.sched.publish_full_blocks(s)

    def _emitted(self, s: SimSeq, drafts: int) -> int:
        e_k = self.expected[drafts]
        e = math.floor(s.acc + e_k) - math.floor(s.acc)
        s.acc += e_k
        return max(1, min(e, drafts + 1))

    @staticmethod
    def _drop_drafts(s: SimSeq, n: int) -> None:
        if n > 0:
            s.num_tokens -= n
            s.drafts -= n

    def _emit(self, now: float, s: SimSeq, step_start: float, seconds: float) -> None:
        """New tokens of `s` at the end of a step: to the client (decode), or into a transfer (prefill)."""
        if self.role == "prefill":
            self.sim.prefill_done(self, s, now, step_start, seconds)
            return
        s.num_tokens = min(s.num_tokens, s.target)
        self.sim.emitted(s.state, now, s.num_tokens - s.prompt_len)
        if s.num_tokens >= s.target:
            self.finish(s, now)

    def finish(self, s: SimSeq, now: float, error: str | None = None) -> None:
        if s.status is not Status.FINISHED:
            self.sched.finish(s, "length" if error is None else "abort")
        self.sim.finished(self, s.state, now, error)

    # ---- runs of pure decode steps ----
    def _plan_run(self, now: float) -> bool:
        """Advance a run of identical decode steps at once when nothing but decoding can happen until the first
        of its sequences finishes: no prompt chunk, no admissible waiting sequence, and blocks enough for every
        step's growth. The run ends early if something arrives (`_truncate`)."""
        sched = self.sched
        running = sched.running
        if not running or any(not s.decoding for s in running):
            return False
        b = len(running)
        ctx0 = sum(s.num_tokens for s in running) / b
        k = self._choose_k(b, ctx0)
        if b * (1 + k) > sched.max_num_batched_tokens:
            return False
        if any(self.max_model_len - s.num_tokens < k for s in running):
            return False
        if sched.waiting and self._admissible(sched.waiting[0], sched.max_num_batched_tokens - b * (1 + k)):
            return False
        e_k = self.expected[k]
        steps = MACRO_MAX_STEPS
        for s in running:
            need = s.target - s.num_tokens
            steps = min(steps, max(1, math.ceil((math.floor(s.acc) + need - s.acc) / e_k - 1e-9)))
        # blocks: each sequence grows by at most k + 1 tokens per step, and needs room for k drafts ahead
        free = self.blocks.num_free_blocks
        if b * (-(-(steps * (k + 1) + k) // ENGINE_BLOCK) + 1) > free:  # not surely enough: count exactly
            tokens = np.array([s.num_tokens for s in running])
            tables = np.array([len(s.block_table) for s in running])

            def blocks_for(n: int) -> int:
                return int(np.maximum(-(-(tokens + n * (k + 1) + k) // ENGINE_BLOCK) - tables, 0).sum())

            if blocks_for(1) > free:
                return False
            if blocks_for(steps) > free:
                lo, hi = 1, steps
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if blocks_for(mid) <= free else (lo, mid - 1)
                steps = lo
        if steps < 2:
            return False
        first = self.cost.step_time((), b, round(ctx0), k, e_k)
        last = self.cost.step_time((), b, round(ctx0 + (steps - 1) * e_k), k, e_k) if steps > 1 else first
        durations = np.linspace(first, last, steps)
        ends = now + np.cumsum(durations)
        self.pending = ("run", list(running), ends, k, now)
        self.step_end = float(ends[-1])
        return True

    def _finish_run(self, pending: tuple) -> None:
        _, members, ends, k, start = pending
        n = len(ends)
        self.steps += n
        self.busy_s += float(ends[-1]) - start
        e_k = self.expected[k]
        times = ends.tolist() if self.sim.collect else [float(ends[-1])]
        for s in members:
            if s.status is not Status.RUNNING:
                continue
            gained = math.floor(s.acc + n * e_k) - math.floor(s.acc)
            s.acc += n * e_k
            s.num_tokens = min(s.num_tokens + gained, s.target)
            s.num_computed_tokens = s.num_tokens - 1
            if not self.sched._grow(s, s.num_tokens):
                raise SimulationError("a run of decode steps ran out of blocks it had counted")
            self.sched.publish_full_blocks(s)
            self.sim.emitted_run(s.state, times, s.num_tokens - s.prompt_len)
            if s.num_tokens >= s.target:
                self.finish(s, times[-1])

    def _admissible(self, seq: SimSeq, budget: int) -> bool:
        """Whether `Scheduler._admit` would take `seq` now (the same test, without taking anything)."""
        sched = self.sched
        if budget <= 0 or len(sched.running) >= sched.max_num_seqs:
            return False
        hit = self.blocks.match_prefix(sched._cacheable(seq), record=False)
        n = min(seq.num_tokens - len(hit) * ENGINE_BLOCK, budget)
        need = self.blocks.blocks_needed(len(hit) * ENGINE_BLOCK + n) - len(hit)
        reusable = sum(1 for b in hit if self.blocks.ref_count[b] == 0)
        return need <= self.blocks.num_free_blocks - reusable

    # ---- routing stats (what record_routing_stats reports) ----
    def refresh_stats(self) -> None:
        self.stats.routing_stats = {
            "num_requests_running": len(self.sched.running),
            "num_requests_waiting": len(self.sched.waiting),
            "kv_cache_usage": self.blocks.usage,
        }


class ClusterSimulator:
    def __init__(
        self,
        spec: ClusterSpec,
        requests: list[SimRequest],
        request_timeout_s: float = 600.0,
        collect_chunks: bool = True,
        stop_after_misses: int | None = None,
        slo_ttft_s: float | None = None,
        slo_tpot_s: float | None = None,
        seed: int = 0,
    ):
        """`stop_after_misses`: end the run once that many requests have missed an SLO (a search only needs to know
        the target is out of reach); the rest count as missed."""
        self.spec = spec
        self.requests = requests
        self.timeout = request_timeout_s
        self.collect = collect_chunks
        self.stop_after = stop_after_misses
        self.slo_ttft, self.slo_tpot = slo_ttft_s, slo_tpot_s
        self.rng = random.Random(seed)
        self.now = 0.0
        self._heap: list = []
        self._order = 0
        self.decode = [Replica(self, "decode", i, spec.decode) for i in range(spec.decode.replicas)]
        self.prefill = [Replica(self, "prefill", i, spec.prefill) for i in range(spec.prefill.replicas)] if (
            spec.prefill is not None
        ) else []  # fmt: skip
        self.states = [RequestState(r) for r in requests]
        self.decode_queue: deque[RequestState] = deque()  # waiting for a decode replica under max_ongoing
        self.prefill_queue: deque[tuple] = deque()
        self.last_stats = -math.inf
        self.misses = 0
        self.stopped = False
        self.remote_prefills = self.local_prefills = self.fallbacks = 0
        self.transfer_bytes = 0.0
        self.transfer_seconds = 0.0
        self.seq_of: dict[RequestState, SimSeq] = {}  # the decode-side sequence of each request in flight
        self.remote_of: dict[SimSeq, tuple[Replica, SimSeq]] = {}  # prefill sequence -> (decode replica, its seq)

    # ---- the event loop ----
    def at(self, time: float, fn: Callable, *args) -> None:
        self._order += 1
        heapq.heappush(self._heap, (time, self._order, fn, args))

    def run(self) -> list[RequestState]:
        for state in self.states:
            self.at(state.req.arrival_s, self._arrive, state)
            self.at(state.req.arrival_s + self.timeout, self._timeout, state)
            if self.stop_after is not None and self.slo_ttft is not None:
                self.at(state.req.arrival_s + self.slo_ttft + 1e-9, self._ttft_deadline, state)
        while self._heap and not self.stopped:
            time, _, fn, args = heapq.heappop(self._heap)
            self.now = time
            fn(time, *args)
        for state in self.states:
            if state.finish_s is None and state.error is None:
                state.error = "not finished (the simulation stopped early)" if self.stopped else "never finished"
        return self.states

    # ---- routing ----
    def _refresh(self, now: float) -> None:
        if now - self.last_stats >= self.spec.routing_stats_period_s:
            for r in self.decode + self.prefill:
                r.refresh_stats()
            self.last_stats = now

    def _ranked(self, replicas: list[Replica]) -> list[Replica]:
        """LeastLoadedRouter: by load, ties broken at random."""
        return sorted(replicas, key=lambda r: (_load(r.stats), self.rng.random()))

    def _arrive(self, now: float, state: RequestState) -> None:
        self.decode_queue.append(state)
        self._dispatch_decode(now)

    def _dispatch_decode(self, now: float) -> None:
        self._refresh(now)
        cap = self.spec.decode.max_ongoing_requests
        while self.decode_queue:
            free = [r for r in self._ranked(self.decode) if r.ongoing < cap]
            if not free:
                return
            state = self.decode_queue.popleft()
            if state.error is not None:
                continue  # timed out while queued
            replica = free[0]
            replica.ongoing += 1
            state.decode_replica = replica
            self.at(now + self.spec.overheads.ingress_s, self._deliver, replica, self._add_request(replica, state))

    def _deliver(self, now: float, replica: Replica, command: Callable[[float], None]) -> None:
        replica.deliver(now, command)

    def _add_request(self, replica: Replica, state: RequestState) -> Callable[[float], None]:
        def add(now: float) -> None:
            if state.error is not None:
                return
            req = state.req
            if req.input_len >= replica.max_model_len:
                self._fail(replica, state, now, f"prompt of {req.input_len} tokens >= max_model_len")
                return
            seq = SimSeq(state, min(req.input_len + req.output_len, replica.max_model_len))
            self.seq_of[state] = seq
            sched = replica.sched
            threshold = self.spec.local_prefill_threshold if self.prefill else None
            if threshold is not None and seq.num_tokens - sched.cached_prefix_tokens(seq) >= threshold:
                if sched.reserve_remote(seq):
                    state.remote = True
                    state.cached_tokens = seq.num_computed_tokens
                    self.remote_prefills += 1
                    self._send_prefill(now, replica, seq)
                    return
            self.local_prefills += 1
            sched.add(seq)

        return add

    def _send_prefill(self, now: float, decode: Replica, seq: SimSeq) -> None:
        self.prefill_queue.append((decode, seq))
        self._dispatch_prefill(now)

    def _dispatch_prefill(self, now: float) -> None:
        self._refresh(now)
        cap = self.spec.prefill.max_ongoing_requests
        while self.prefill_queue:
            candidates = [r for r in self.prefill if r.ongoing < cap]
            if not candidates:
                return
            decode, seq = self.prefill_queue.popleft()
            if seq.status is not Status.REMOTE_PREFILL:
                continue
            replica = self._affinity(candidates, seq)
            replica.ongoing += 1
            self.at(
                now + self.spec.overheads.prefill_rpc_s, self._deliver, replica, self._prefill_add(replica, decode, seq)
            )

    def _affinity(self, candidates: list[Replica], seq: SimSeq) -> Replica:
        """PrefixAffinityRouter: the home replica of the first block's key unless it is much busier."""
        by_load = self._ranked(candidates)
        if seq.prompt_len < ENGINE_BLOCK or len(candidates) < 2:
            return by_load[0]
        key = seq.req.block_key(0)
        home = max(candidates, key=lambda r: _rendezvous(key, r.name))
        if _load(home.stats) - _load(by_load[0].stats) > PrefixAffinityRouter.IMBALANCE:
            return by_load[0]
        return home

    def _prefill_add(self, replica: Replica, decode: Replica, dseq: SimSeq) -> Callable[[float], None]:
        def add(now: float) -> None:
            if dseq.status is not Status.REMOTE_PREFILL:
                self._prefill_released(replica, now)
                return
            if dseq.prompt_len >= replica.max_model_len:
                self._prefill_released(replica, now)
                self._remote_failed(now, decode, dseq, "the prompt does not fit the prefill engine")
                return
            pseq = SimSeq(dseq.state, dseq.prompt_len + 1)
            pseq.decoding = False
            self.remote_of[pseq] = (decode, dseq)
            replica.sched.add(pseq)

        return add

    # ---- prefill replica -> transfer -> decode replica ----
    def prefill_done(self, replica: Replica, pseq: SimSeq, now: float, step_start: float, seconds: float) -> None:
        decode, dseq = self.remote_of.pop(pseq)
        held = list(pseq.block_table)
        replica.blocks.acquire(held)  # KVStreams holds the blocks until the transfer has read them
        replica.sched.finish(pseq, "length")
        tokens = dseq.prompt_len - dseq.num_computed_tokens
        nbytes = tokens * self.spec.transfer_bytes_per_token * self.spec.decode.world  # one copy per decode rank
        model = self.spec.transfer
        send = model.seconds(nbytes) - model.latency_s
        layers = max(self.spec.transfer_layers, 1)
        # layers stream out as the last chunk writes them; one sender per prefill replica
        start = max(step_start + seconds / layers, replica.link_free_s)
        done = max(now + send / layers, start + send)
        replica.link_free_s = done
        done += model.latency_s
        self.transfer_bytes += nbytes
        self.transfer_seconds += done - step_start

        def landed(t: float) -> None:
            replica.blocks.free(held)
            replica.wake(t)
            self._prefill_released(replica, t)
            if dseq.status is Status.REMOTE_PREFILL:
                self.at(t + self.spec.overheads.completion_s, self._deliver, decode, self._resume(decode, dseq))

        self.at(done, landed)

    def _prefill_released(self, replica: Replica, now: float) -> None:
        replica.ongoing -= 1
        if self.prefill_queue:
            self._dispatch_prefill(now)

    def _resume(self, decode: Replica, dseq: SimSeq) -> Callable[[float], None]:
        def resume(now: float) -> None:
            if dseq.status is not Status.REMOTE_PREFILL:
                return
            decode.sched.resume_remote(dseq)
            dseq.num_tokens += 1  # the first token, sampled by the prefill worker
            dseq.decoding = True
            decode._emit(now, dseq, now, 0.0)

        return resume

    def _remote_failed(self, now: float, decode: Replica, dseq: SimSeq, reason: str) -> None:
        def fallback(t: float) -> None:
            if dseq.status is not Status.REMOTE_PREFILL:
                return
            if self.spec.on_failure == "recompute":
                self.fallbacks += 1
                dseq.state.local_fallback = True
                decode.sched.requeue(dseq)
            else:
                decode.sched.finish(dseq, "abort")
                self._fail(decode, dseq.state, t, f"remote prefill failed: {reason}")

        self.at(now + self.spec.overheads.completion_s, self._deliver, decode, fallback)

    # ---- outputs ----
    def emitted(self, state: RequestState, now: float, output_tokens: int) -> None:
        t = now + self.spec.overheads.egress_s
        if state.first_token_s is None:
            state.first_token_s = t
            if self.slo_ttft is not None and t - state.req.arrival_s > self.slo_ttft:
                self._missed(state)
        if self.collect:
            state.chunk_times.append(t)
        state.output_tokens = output_tokens

    def emitted_run(self, state: RequestState, times: list[float], output_tokens: int) -> None:
        if self.collect:
            egress = self.spec.overheads.egress_s
            state.chunk_times.extend(t + egress for t in times)
        state.output_tokens = output_tokens

    def finished(self, replica: Replica, state: RequestState, now: float, error: str | None) -> None:
        if state.finish_s is not None or (state.error is not None and error is None):
            return
        if error is None:
            state.finish_s = now + self.spec.overheads.egress_s
            if self.slo_tpot is not None and state.output_tokens > 1 and state.first_token_s is not None:
                tpot = (state.finish_s - state.first_token_s) / (state.output_tokens - 1)
                if tpot > self.slo_tpot:
                    self._missed(state)
        else:
            state.error = error
            self._missed(state)
        replica.ongoing -= 1
        self.seq_of.pop(state, None)
        if self.decode_queue:
            self._dispatch_decode(now)

    def _fail(self, replica: Replica, state: RequestState, now: float, error: str) -> None:
        self.finished(replica, state, now, error)

    def _timeout(self, now: float, state: RequestState) -> None:
        if state.finish_s is not None or state.error is not None:
            return
        replica = state.decode_replica
        seq = self.seq_of.get(state)
        if replica is None:  # still queued for a decode replica
            state.error = f"timed out after {self.timeout:g} s"
            self._missed(state)
            return
        # the client gave up: the decode worker aborts the request and frees its blocks
        if seq is not None and seq.status is not Status.FINISHED:

            def abort(t: float) -> None:
                if seq.status is not Status.FINISHED:
                    replica.sched.finish(seq, "abort")

            replica.deliver(now, abort)
        self.finished(replica, state, now, f"timed out after {self.timeout:g} s")

    def _missed(self, state: RequestState) -> None:
        if state.missed:
            return
        state.missed = True
        self.misses += 1
        if self.stop_after is not None and self.misses >= self.stop_after:
            self.stopped = True

    def _ttft_deadline(self, now: float, state: RequestState) -> None:
        if state.first_token_s is None and state.error is None:
            self._missed(state)

"""A decode replica over several devices, driven in lockstep: `ParallelEngine` has the interface `AsyncEngine` and
`DecodeWorker` use from `LLMEngine`, and runs an `EngineRank` per device of one placement group.

add_request, abort and fail_remote only queue commands here. Each `step()` sends every rank the commands queued
since the last step plus the step itself, one Ray call per rank, all ranks at once; they apply identical commands in
identical order, so their collectives line up, and rank 0's outputs come back. Requests are checked here first (as the
engine would), so a bad one is refused at once rather than failing inside a step on every rank.

Disaggregated serving needs two results before the next step: the remote-prefill plan of add_request (which blocks
to fill) and the first output of complete_remote. Those calls send the queued commands and their own to every rank
at once, without a step (`EngineRank.apply`), so the order stays the same everywhere. The KV itself lands at every
rank's receiver (`open_receivers`, `rank_receivers.py`).

A prefill replica over several devices drives its `PrefillRank`s with this engine too (`prefill_ranks.py`).
"""

import logging
import random

import ray

from glmserve.engine.async_engine import EngineDeadError
from glmserve.engine.engine_args import EngineArgs
from glmserve.engine.outputs import Logprob, RequestOutput
from glmserve.engine.remote import RemotePrefill
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.validation import check_new_request
from glmserve.model.default_checkpoint import default_checkpoint
from glmserve.model.parallel import ParallelConfig
from glmserve.model.tokenizer import Tokenizer

from .engine_rank import Command, EngineRank, RankStep
from .rank_group import RankFailed, RankGroup
from .rank_receivers import RankReceivers

log = logging.getLogger(__name__)


class RanksDiverged(RuntimeError):
    """The ranks produced different outputs: they no longer run the same computation."""


def parallel_config(args: EngineArgs) -> ParallelConfig | None:
    """The replica's split, or None when the engine runs in one process."""
    if args.tensor_parallel_size * args.expert_parallel_size == 1:
        return None
    return ParallelConfig(tp_size=args.tensor_parallel_size, ep_size=args.expert_parallel_size)


class ParallelEngine:
    def __init__(
        self,
        args: EngineArgs,
        use_gpu: bool = False,
        timeout_s: float = 300.0,
        rank_class: ray.actor.ActorClass = EngineRank,
        rank_args: tuple = (),
    ):
        """`rank_class`: an actor class of an `EngineRankProcess` subclass, started with `args` and `rank_args`."""
        parallel = parallel_config(args)
        if parallel is None:
            raise ValueError("ParallelEngine needs tensor_parallel_size or expert_parallel_size > 1")
        self.group = RankGroup(rank_class, parallel, use_gpu, timeout_s, args, *rank_args)
        try:
            info = ray.get(self.group.ranks[0].info.remote(), timeout=timeout_s)
            self.tokenizer = Tokenizer.from_pretrained(args.model or default_checkpoint())
        except BaseException:
            self.group.shutdown()
            raise
        self.config, self.max_model_len = info["config"], info["max_model_len"]
        self._commands: list[Command] = []
        self._running: set[str] = set()
        # Seeds for requests without one: each rank would otherwise sample them from its own default generator,
        # and random sampling must draw the same tokens on every rank.
        self._seeds = random.Random(args.seed)
        self._last: RankStep = self.group.call("report")[0]
        log.info("engine ready on %d ranks (%s), max_model_len %d", parallel.world_size, parallel, self.max_model_len)

    @property
    def has_work(self) -> bool:
        return bool(self._commands) or self._last.has_work

    @property
    def idle(self) -> bool:
        """As of the last step, on rank 0 (`rank_reports` has every rank's)."""
        return not self._commands and self._last.idle

    def stats(self) -> dict[str, float]:
        """Rank 0's counters as of the last step."""
        return self._last.stats

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        remote_prefill_min_tokens: int | None = None,
    ) -> RemotePrefill | None:
        """Queue a request for the next step; bad input raises InvalidRequest now, as LLMEngine.add_request does.
        Rank failures surface from `step` (RankFailed), which the engine loop reports to every request. A prompt
        that may be prefilled remotely is added on every rank now, and the plan (if any) returned."""
        params = params or SamplingParams()
        ids = check_new_request(
            request_id, prompt, params, self.tokenizer, self._running, self.config.vocab_size, self.max_model_len
        )
        if params.seed is None:
            params = params.model_copy(update={"seed": self._seeds.getrandbits(62)})
        self._running.add(request_id)
        # a prompt shorter than the threshold is prefilled here whatever the ranks have cached: no round trip
        if remote_prefill_min_tokens is not None and params.n == 1 and len(ids) >= remote_prefill_min_tokens:
            return self._apply_now(("add_request", (request_id, prompt, params, remote_prefill_min_tokens)))
        self._commands.append(("add_request", (request_id, prompt, params)))
        return None

    def complete_remote(self, request_id: str, first_token: int, logprob: dict[int, Logprob] | None) -> RequestOutput:
        """The KV landed at every rank: decode from here (rank 0's first output)."""
        out = self._apply_now(("complete_remote", (request_id, first_token, logprob)))
        if out.finished:
            self._running.discard(request_id)
        return out

    def fail_remote(self, request_id: str, recompute: bool) -> None:
        """Queued like abort: every rank ends the transfer, then requeues the prompt or ends the request."""
        if not recompute:
            self._running.discard(request_id)
        self._commands.append(("fail_remote", (request_id, recompute)))

    def abort(self, request_id: str) -> None:
        self._running.discard(request_id)
        self._commands.append(("abort", (request_id,)))

    def enqueue(self, command: Command) -> None:
        """Queue a command of the rank class's own (see `EngineRankProcess._command`) for the next step."""
        self._commands.append(command)

    def _apply_now(self, command: Command) -> object:
        """Send the queued commands and `command` to every rank without a step; rank 0's result of `command`."""
        commands, self._commands = [*self._commands, command], []
        try:
            answers: list[tuple[list | None, RankStep]] = self.group.call("apply", commands)
        except RankFailed as e:  # the replica is gone, as when a step fails: a 503 for this request too
            raise EngineDeadError(str(e)) from e
        self._agree([report for _, report in answers])
        return answers[0][0][-1]

    def _agree(self, reports: list[RankStep]) -> None:
        """Keep rank 0's report once every rank's digest matches it."""
        if len({r.digest for r in reports}) > 1:
            self.group.shutdown()
            raise RanksDiverged(f"the ranks' outputs differ (digests {[r.digest for r in reports]})")
        self._last = reports[0]

    def step(self) -> list[RequestOutput]:
        """One step on every rank; rank 0's outputs. RankFailed when a rank died or raised (the ranks are then
        released: this engine is done), RanksDiverged when their outputs differ."""
        commands, self._commands = self._commands, []
        self._agree(self.group.call("step", commands))
        for out in self._last.outputs:
            if out.finished:
                self._running.discard(out.request_id)
        return self._last.outputs

    def open_receivers(self, host: str | None = None, transport: str = "tcp") -> RankReceivers:
        """Start a KV receiver on every rank, on `host` (default: each rank's node address), for remote prefills
        over `transport`."""
        return RankReceivers(self.group.ranks, self.group.call("open_receiver", host, transport))

    def rank_reports(self) -> list[RankStep]:
        """Every rank's digest of its outputs so far and whether it is idle (tests check that they agree and that
        no rank leaked blocks). While a step runs, the ranks may answer on either side of it."""
        return self.group.call("report")

    def shutdown(self) -> None:
        self.group.shutdown()

"""A decode replica over several devices, driven in lockstep: `ParallelEngine` has the interface `AsyncEngine` and
`DecodeWorker` use from `LLMEngine`, and runs an `EngineRank` per device of one placement group.

add_request and abort only queue commands here. Each `step()` sends every rank the commands queued since the last
step plus the step itself, one Ray call per rank, all ranks at once; they apply identical commands in identical
order, so their collectives line up, and rank 0's outputs come back. Requests are checked here first (as the
engine would), so a bad one is refused at once rather than failing inside a step on every rank.
"""

import logging
import random

import ray

from glmserve.decode.engine import RemotePrefill
from glmserve.decode.engine_args import EngineArgs
from glmserve.decode.outputs import RequestOutput
from glmserve.decode.validation import check_new_request
from glmserve.model.default_checkpoint import default_checkpoint
from glmserve.model.parallel import ParallelConfig
from glmserve.model.sampling_params import SamplingParams
from glmserve.model.tokenizer import Tokenizer

from .engine_rank import Command, EngineRank, RankStep
from .rank_group import RankGroup

log = logging.getLogger(__name__)


class RanksDiverged(RuntimeError):
    """The ranks produced different outputs: they no longer run the same computation."""


def parallel_config(args: EngineArgs) -> ParallelConfig | None:
    """The replica's split, or None when the engine runs in one process."""
    if args.tensor_parallel_size * args.expert_parallel_size == 1:
        return None
    return ParallelConfig(tp_size=args.tensor_parallel_size, ep_size=args.expert_parallel_size)


class ParallelEngine:
    def __init__(self, args: EngineArgs, use_gpu: bool = False, timeout_s: float = 300.0):
        parallel = parallel_config(args)
        if parallel is None:
            raise ValueError("ParallelEngine needs tensor_parallel_size or expert_parallel_size > 1")
        self.group = RankGroup(EngineRank, parallel, use_gpu, timeout_s, args)
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
        log.info(
            "decode engine ready on %d ranks (%s), max_model_len %d", parallel.world_size, parallel, self.max_model_len
        )

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
        Rank failures surface from `step` (RankFailed), which the engine loop reports to every request."""
        if remote_prefill_min_tokens is not None:
            raise ValueError("a tensor/expert-parallel decode replica does not take remote prefills")
        params = params or SamplingParams()
        check_new_request(
            request_id, prompt, params, self.tokenizer, self._running, self.config.vocab_size, self.max_model_len
        )
        if params.seed is None:
            params = params.model_copy(update={"seed": self._seeds.getrandbits(62)})
        self._running.add(request_id)
        self._commands.append(("add_request", (request_id, prompt, params)))
        return None

    def abort(self, request_id: str) -> None:
        self._running.discard(request_id)
        self._commands.append(("abort", (request_id,)))

    def step(self) -> list[RequestOutput]:
        """One step on every rank; rank 0's outputs. RankFailed when a rank died or raised (the ranks are then
        released: this engine is done), RanksDiverged when their outputs differ."""
        commands, self._commands = self._commands, []
        reports: list[RankStep] = self.group.call("step", commands)
        if len({r.digest for r in reports}) > 1:
            self.group.shutdown()
            raise RanksDiverged(f"the ranks' outputs differ (digests {[r.digest for r in reports]})")
        self._last = reports[0]
        for out in self._last.outputs:
            if out.finished:
                self._running.discard(out.request_id)
        return self._last.outputs

    def rank_reports(self) -> list[RankStep]:
        """Every rank's digest of its outputs so far and whether it is idle (tests check that they agree and that
        no rank leaked blocks). While a step runs, the ranks may answer on either side of it."""
        return self.group.call("report")

    def shutdown(self) -> None:
        self.group.shutdown()

"""One rank of a tensor/expert-parallel decode replica: an actor hosting an `LLMEngine` shard.

Every rank must run the same sequence of add/abort/step calls, so that the collectives inside the split layers line
up; `ParallelEngine` sends each rank the same commands, which `step` applies in order before stepping.
"""

import hashlib
from dataclasses import dataclass

import ray

from glmserve.decode.engine import LLMEngine
from glmserve.decode.engine_args import EngineArgs
from glmserve.decode.outputs import RequestOutput

from .rank_group import RankProcess

# (method name, args): the engine calls that change its state between steps
Command = tuple[str, tuple]
COMMANDS = frozenset({"add_request", "abort"})


@dataclass
class RankStep:
    """What one rank reports after a step. Only rank 0 sends its outputs and counters (the ranks' are equal);
    every rank sends a digest of all the tokens it has produced, so the driver can tell that they agree."""

    digest: str
    has_work: bool
    idle: bool
    outputs: list[RequestOutput] | None = None
    stats: dict[str, float] | None = None


@ray.remote
class EngineRank(RankProcess):
    def start(self, master_addr: str, master_port: int, timeout_s: float, args: EngineArgs) -> None:
        self.join(master_addr, master_port, timeout_s)  # the engine builds its groups over this process group
        self.engine = LLMEngine(args.model_copy(update={"device": self.device.type}))
        self._digest = hashlib.blake2b(digest_size=16)

    def step(self, commands: list[Command]) -> RankStep:
        """Apply the commands queued since the last step, in order, then run one step."""
        for name, args in commands:
            if name not in COMMANDS:
                raise ValueError(f"unknown engine command {name!r}")
            getattr(self.engine, name)(*args)
        outputs = self.engine.step()
        for out in outputs:  # the step's new tokens (not the whole sequences that finished requests carry)
            for d in out.deltas:
                self._digest.update(f"{out.request_id}#{d.index}:{d.token_ids}:{d.finish_reason};".encode())
        return self.report(outputs)

    def report(self, outputs: list[RequestOutput] | None = None) -> RankStep:
        """This rank's state (and, on rank 0, `outputs` and the engine's counters)."""
        first = self.rank == 0
        return RankStep(
            self._digest.hexdigest(),
            self.engine.has_work,
            self.engine.idle,
            outputs if first else None,
            self.engine.stats() if first else None,
        )

    def info(self) -> dict:
        """What the driver needs to check requests before they reach the ranks."""
        return {"config": self.engine.config, "max_model_len": self.engine.max_model_len}
